"""One forward per preference pair: the shared prompt is computed once for chosen and rejected.

A pair's two sequences a = prompt + chosen and b = prompt' + rejected (prompt' = prompt unless
truncation cut them differently) share their longest common prefix of k tokens: the prompt,
and any leading response tokens the two have in common. `pack_pairs` lays each pair out as
one row a ++ b[k:] with

- position ids 0 .. |a|-1 for a and k .. |b|-1 for b's suffix: every token sits at the
  position it has in its own sequence;
- a [L, L] attention mask: a's tokens attend causally within a; b's suffix tokens attend to
  a's first k tokens (which are b's own prefix) and causally within the suffix, never to a's
  tokens after the prefix. Padding keys are masked; padding queries see key 0 only.

Every token of a and of b[k:] then attends to exactly the tokens, at the same positions, that
it attends to in its own sequence, so its hidden states are those of the two-row forward up to
float rounding (the same sums in another shape); b's tokens t < k are a's tokens t, and their
hidden states are read from a's. `pair_logprobs` scores both responses from that one forward
and returns the layout of `rayalign.data.collate_pairs` + `rayalign.logprobs.sequence_logprobs`:
(2B,) summed response log-probs and token counts, chosen first. Position t predicts token t+1,
so b's first response token is scored from the prompt's last hidden state, shared with a.

Why: the prompt's forward, backward and activation memory once per pair instead of twice. On
the real dialog pairs of bench/results/training.md the prompt is ~60% of each sequence; the
linear layers (most of the work) shrink by k tokens per pair, attention becomes one masked
[L, L] product with L = |a| + |b| - k.

Which models (`supports_pair_packing`): the layout needs a model that places tokens by
``position_ids`` and applies a custom 4-D mask as given, i.e. transformers' eager or SDPA
attention on the Llama-style (RoPE) and GPT-2 (learned positions) families without a sliding
window. Others (ALiBi, sliding windows, flash-attention's varlen kernels) keep the two-row
forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .logprobs import DEFAULT_CHUNK_ROWS, gathered_logprobs

PACKABLE_MODEL_TYPES = ("llama", "gpt2", "qwen2", "qwen3", "mistral")
PACKABLE_ATTENTION = ("eager", "sdpa")

Ids = Sequence[int]


@dataclass(frozen=True)
class PairPack:
    """B preference pairs as B packed rows (module docstring)."""

    input_ids: Tensor  # [B, L] long, right-padded
    position_ids: Tensor  # [B, L] long
    allowed: Tensor  # [B, 1, L, L] bool: query (dim 2) may attend key (dim 3)
    rows: Tensor  # [N] long: packed row of the hidden state that predicts scored token n
    cols: Tensor  # [N] long: its position in that row
    targets: Tensor  # [N] long: token n
    slots: Tensor  # [N] long: its sequence, 0..B-1 chosen, B..2B-1 rejected
    num_tokens: Tensor  # (2B,) long: scored response tokens per sequence
    lengths: Tensor  # (B,) long: non-padding positions of each packed row
    sequence_lengths: Tensor  # (2B,) long: tokens of each unpacked sequence

    def to(self, device: torch.device | str) -> "PairPack":
        return PairPack(*(getattr(self, f.name).to(device) for f in fields(self)))


def _common_prefix(a: Ids, b: Ids) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def _scored(prompt_len: int, length: int) -> range:
    """Positions t whose hidden state predicts a response token t + 1 (as sequence_logprobs)."""
    return range(max(prompt_len - 1, 0), length - 1)


def pack_pairs(chosen: Sequence[tuple[Ids, Ids]], rejected: Sequence[tuple[Ids, Ids]],
               pad_id: int) -> PairPack:
    """Pack (prompt_ids, response_ids) of each pair's chosen and rejected sequence."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"need as many chosen as rejected sequences (>= 1), got "
                         f"{len(chosen)} and {len(rejected)}")
    b_count = len(chosen)
    packed, positions, meta, index = [], [], [], ([], [], [], [])
    for i, ((pa, ra), (pb, rb)) in enumerate(zip(chosen, rejected)):
        a, b = list(pa) + list(ra), list(pb) + list(rb)
        k = _common_prefix(a, b)
        packed.append(a + b[k:])
        positions.append(list(range(len(a))) + list(range(k, len(b))))
        meta.append((len(a), k, len(packed[-1])))
        for t in _scored(len(pa), len(a)):
            for store, value in zip(index, (i, t, a[t + 1], i)):
                store.append(value)
        for t in _scored(len(pb), len(b)):  # b's prefix positions are a's
            for store, value in zip(index, (i, t if t < k else len(a) + t - k, b[t + 1],
                                            b_count + i)):
                store.append(value)
    width = max(n for *_, n in meta)
    input_ids = torch.full((b_count, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b_count, width), dtype=torch.long)
    for i, (ids, pos) in enumerate(zip(packed, positions)):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[i, :len(pos)] = torch.tensor(pos, dtype=torch.long)
    len_a, k, n = (torch.tensor(c, dtype=torch.long)[:, None, None] for c in zip(*meta))
    q = torch.arange(width)[None, :, None]
    j = torch.arange(width)[None, None, :]
    allowed = (j <= q) & (q < n) & ((q < len_a) | (j < k) | (j >= len_a))
    allowed |= (q >= n) & (j == 0)  # padding queries: one key, so no row is all masked
    slots = torch.tensor(index[3], dtype=torch.long)
    lengths = torch.tensor([len(p) + len(r) for p, r in list(chosen) + list(rejected)])
    return PairPack(input_ids, position_ids, allowed[:, None], torch.tensor(index[0]),
                    torch.tensor(index[1]), torch.tensor(index[2]), slots,
                    torch.bincount(slots, minlength=2 * b_count), n.flatten(), lengths)


def _config(model: torch.nn.Module):
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return inner.config, inner


def supports_pair_packing(model: torch.nn.Module) -> bool:
    """Whether `pair_logprobs` is exact for ``model`` (module docstring, "Which models")."""
    config, _ = _config(model)
    return (config.model_type in PACKABLE_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in PACKABLE_ATTENTION
            and getattr(config, "sliding_window", None) is None)


def pair_logprobs(model: torch.nn.Module, pack: PairPack,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """Summed response log-probs (2B,), at least float32, and response token counts (2B,),
    chosen first: `sequence_logprobs` of the two-row batch, from one forward per pair."""
    config, inner = _config(model)
    if not supports_pair_packing(model):
        raise ValueError(f"{config.model_type} with {config._attn_implementation} attention "
                         f"cannot take packed pairs (rayalign.pairpack: use the two-row batch)")
    mask = pack.allowed
    if config._attn_implementation == "eager":  # eager attention adds the mask to its scores
        dtype = inner.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min)
    sums = gathered_logprobs(model, (pack.rows, pack.cols), pack.targets, pack.slots,
                             pack.num_tokens.shape[0], chunk_rows, input_ids=pack.input_ids,
                             attention_mask=mask, position_ids=pack.position_ids,
                             use_cache=False)
    return sums, pack.num_tokens
