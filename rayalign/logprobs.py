"""Per-sequence response log-probs from one forward pass.

log p(y | x) = sum over response tokens t of  logit[t, y_t] - logsumexp_v logit[t, v]
(DESIGN.md, "Sequence log-probs"). The label logit is gathered and a float32 logsumexp is
taken a chunk of rows at a time, in a custom autograd function whose backward recomputes the
softmax chunk by chunk, so no float32 [B, T, V] log-softmax ever exists, forward or backward:
with a 150k vocabulary and bf16 logits that copy alone would be 4x the logits.
"""

from __future__ import annotations

import torch

from .data import SequenceBatch

DEFAULT_CHUNK_ROWS = 1024


class _LabelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for start in range(0, logits.shape[0], chunk_rows):
            lse[start:start + chunk_rows] = torch.logsumexp(
                logits[start:start + chunk_rows].to(acc), dim=-1
            )
        picked = logits.gather(-1, labels[:, None]).squeeze(-1).to(acc)
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk_rows = chunk_rows
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            end = start + ctx.chunk_rows
            g = grad[start:end, None].to(lse.dtype)
            chunk = -(logits[start:end].to(lse.dtype) - lse[start:end, None]).exp() * g
            chunk.scatter_add_(-1, labels[start:end, None], g)
            grad_logits[start:end] = chunk.to(logits.dtype)
        return grad_logits, None, None


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """log-softmax(logits)[..., label] for logits [..., V], labels [...]; at least float32."""
    flat = _LabelLogProb.apply(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), chunk_rows
    )
    return flat.view(labels.shape)


def sequence_logprobs(
    model: torch.nn.Module, batch: SequenceBatch, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs (B,), at least float32, and response token counts (B,).

    Position t's logits predict token t+1, so labels and mask are shifted left by one (the
    last position predicts nothing); shifting the labels instead of slicing the logits keeps
    the logits contiguous, so they are never copied.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = torch.nn.functional.pad(batch.response_mask[:, 1:], (0, 1), value=False)
    labels = torch.nn.functional.pad(batch.input_ids[:, 1:], (0, 1)).masked_fill(~mask, 0)
    logps = token_logprobs(logits, labels, chunk_rows)
    return (logps * mask).sum(-1), mask.sum(-1)
