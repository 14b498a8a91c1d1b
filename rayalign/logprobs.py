"""Per-sequence response log-probs from the last hidden states, never from [B, T, V] logits.

log p(y | x) = sum over response tokens t of  z[t, y_t] - logsumexp_v z[t, v]   (DESIGN.md,
"Sequence log-probs"), with z the output head's logits. The public API:

- `sequence_logprobs(model, batch)`: summed response log-probs (B,) and response token
  counts (B,) of a `SequenceBatch`. The trainer's policy and reference forward, the reference
  log-prob pipeline stage, Hbat's held-out NLL and evaluation all call it.
- `logprobs_at(model, targets, scored, **inputs)`: the same for any model inputs
  (``inputs_embeds`` with a prefix, as the guide's decoder), summed over the positions
  ``scored`` marks, where position t predicts ``targets[:, t]``.

How. One forward of the model with ``output_hidden_states`` and ``logits_to_keep=1`` (the
head runs on the last position only), then the head on the final hidden states of the scored
positions alone (response tokens and the EOS; prompt and padding never meet the vocabulary),
``chunk_rows`` positions at a time, in a custom autograd function (`_HeadLogProb`) that keeps
only the [N, d] hidden states and a logsumexp per position and recomputes each chunk's logits
in the backward. Peak extra memory is one [chunk_rows, V] block, forward and backward: for a
128k vocabulary at 4k tokens the [T, V] float32 logits of one sequence alone are 2 GB.

Exactness. The head is ``z = c * tanh(s * (h W^T + b) / c)`` (c = ``final_logit_softcapping``,
Gemma 2/3; s = ``logit_scale``, Cohere, or ``1 / logits_scaling``, Granite; b the head's bias,
GPT-J/Phi; W tied or not), and every call checks it against the model's own logits at the last
position (`HeadMismatchError`), so a head of another form (LoRA on ``lm_head``, a family's
extra scaling) fails loudly instead of scoring wrongly. The head runs inside the head module's
own call, so DeepSpeed ZeRO-3 gathers its weight for the forward and again for the backward.

Liger-Kernel's fused linear cross-entropy is not used: its backward multiplies by one scalar
upstream gradient (it is built for a mean loss), while DPO-style losses give every sequence
its own gradient; its DPO kernel fuses the loss, which would take the losses out of
`rayalign.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data import SequenceBatch

DEFAULT_CHUNK_ROWS = 512


class HeadMismatchError(RuntimeError):
    """The model's own logits differ from ``c * tanh(s * (h W^T + b) / c)`` on its hidden states."""


@dataclass(frozen=True)
class Head:
    """The output head as this module computes it (module docstring)."""

    weight: Tensor  # [V, d]
    bias: Tensor | None  # [V]
    scale: float
    softcap: float | None

    def logits(self, h: Tensor, acc: torch.dtype) -> Tensor:
        """z for hidden states h [N, d] in the accumulation dtype ``acc``."""
        z = torch.nn.functional.linear(h, self.weight, self.bias).to(acc)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _head_of(model: torch.nn.Module) -> tuple[torch.nn.Linear, float, float | None]:
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    head, config = inner.get_output_embeddings(), inner.config
    if type(head) is not torch.nn.Linear:
        raise HeadMismatchError(f"{type(inner).__name__}'s output head is a {type(head).__name__}, "
                                f"not a plain torch.nn.Linear (LoRA on lm_head?)")
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    return head, scale, getattr(config, "final_logit_softcapping", None)


class _HeadLogProb(torch.autograd.Function):
    """log-softmax(z(h))[label] per row of h [N, d], chunk by chunk (module docstring).

    Backward per chunk, with g the upstream gradient and p = softmax(z):
    dz = g * (onehot(label) - p); through the soft-cap dz *= 1 - (z / c)^2; through the scale
    da = s * dz; then grad_h = da W, grad_W += da^T h, grad_b += sum_rows da.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                scale: float, softcap: float | None, chunk_rows: int) -> Tensor:
        head = Head(weight, bias, scale, softcap)
        acc = torch.promote_types(h.dtype, torch.float32)
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        lse = torch.empty_like(out)
        for start in range(0, h.shape[0], chunk_rows):
            end = start + chunk_rows
            z = head.logits(h[start:end], acc)
            lse[start:end] = torch.logsumexp(z, dim=-1)
            out[start:end] = z.gather(-1, labels[start:end, None]).squeeze(-1) - lse[start:end]
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.scale, ctx.softcap, ctx.chunk_rows = scale, softcap, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, bias, labels, lse = ctx.saved_tensors
        head = Head(weight, bias, ctx.scale, ctx.softcap)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=lse.dtype) if need_b else None
        for start in range(0, h.shape[0], ctx.chunk_rows):
            end = start + ctx.chunk_rows
            z = head.logits(h[start:end], lse.dtype)
            g = grad[start:end, None].to(lse.dtype)
            dz = (z - lse[start:end, None]).exp_().mul_(-g)
            dz.scatter_add_(-1, labels[start:end, None], g)
            if ctx.softcap is not None:
                dz.mul_(1.0 - (z / ctx.softcap).square())
            if ctx.scale != 1.0:
                dz.mul_(ctx.scale)
            if need_h:
                grad_h[start:end] = dz.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(dz.T, h[start:end].to(lse.dtype))
            if need_b:
                grad_b += dz.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _check_head(head: Head, hidden_last: Tensor, logits_last: Tensor, model_name: str) -> None:
    """Raise `HeadMismatchError` unless the head reproduces the model's last-position logits.

    The tolerance is rounding: a few units of the logits' dtype epsilon relative to their size.
    """
    with torch.no_grad():
        theirs = logits_last.to(torch.promote_types(logits_last.dtype, torch.float32))
        mine = head.logits(hidden_last, theirs.dtype)
        tol = 16 * torch.finfo(logits_last.dtype).eps * (1.0 + float(theirs.abs().max()))
        err = float((mine - theirs).abs().max())
    if not err <= tol:
        raise HeadMismatchError(f"{model_name}: the head computed from hidden states differs from "
                                f"the model's own logits by {err:.3g} (> {tol:.3g}); its output "
                                f"layer is not z = c*tanh(s*(hW^T+b)/c)")


def logprobs_at(model: torch.nn.Module, targets: Tensor, scored: Tensor,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, **inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row sums of log p(targets[:, t] | position t) over positions ``scored`` [B, T] marks,
    at least float32, and the counts of scored positions (B,); ``inputs`` go to the model."""
    rows = scored.nonzero(as_tuple=True)
    sums = gathered_logprobs(model, rows, targets[rows], rows[0], scored.shape[0], chunk_rows,
                             **inputs)
    return sums, scored.sum(-1)


def gathered_logprobs(model: torch.nn.Module, index: tuple[Tensor, Tensor], targets: Tensor,
                      slots: Tensor, num_slots: int, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                      **inputs: Tensor) -> Tensor:
    """Sums (num_slots,), at least float32, of log p(targets[n] | the final hidden state at
    (index[0][n], index[1][n])) into slot ``slots[n]``, from one forward of ``inputs``.

    The general form of `logprobs_at`: a hidden state may score several targets and a slot
    may collect tokens of several rows (`rayalign.pairpack` scores two responses of one row).
    """
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    head_module, scale, softcap = _head_of(model)

    def fused(h: Tensor) -> Tensor:  # runs as head_module's forward (module docstring)
        head = Head(head_module.weight, head_module.bias, scale, softcap)
        _check_head(head, hidden[:, -1].detach(), out.logits[:, -1], type(model).__name__)
        return _HeadLogProb.apply(h, head.weight, head.bias, targets, scale, softcap,
                                  chunk_rows)

    head_module.forward = fused
    try:
        token_logps = head_module(hidden[index])
    finally:
        del head_module.forward  # back to torch.nn.Linear.forward
    return token_logps.new_zeros(num_slots).index_add_(0, slots, token_logps)


def sequence_logprobs(model: torch.nn.Module, batch: SequenceBatch,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """Sum of response-token log-probs (B,), at least float32, and response token counts (B,).

    Position t predicts token t+1, so the scored positions are the response mask shifted left
    by one (the last position predicts nothing).
    """
    scored = torch.nn.functional.pad(batch.response_mask[:, 1:], (0, 1), value=False)
    targets = torch.nn.functional.pad(batch.input_ids[:, 1:], (0, 1))
    return logprobs_at(model, targets, scored, chunk_rows, input_ids=batch.input_ids,
                       attention_mask=batch.attention_mask)
