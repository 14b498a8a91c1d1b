"""Held-out evaluation of a policy's samples against gold responses.

`exact_match` is the toy task's metric; `gold_nll` is the teacher-forced negative
log-likelihood of the gold responses under the policy, the likelihood metric that works on
open-ended data (the surface and similarity metrics are in `textmetrics`, `sentsim` and
`rewardmodel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import collate, encode
from .logprobs import sequence_logprobs
from .textmetrics import check_paired


def exact_match(prediction: str, gold: str) -> bool:
    """Equal up to whitespace (the toy task's answers are space-separated tokens)."""
    return prediction.split() == gold.split()


def summarize(predictions: Sequence[str], golds: Sequence[str],
              distances: Sequence[float] | None = None) -> dict[str, float]:
    """Exact-match rate and, when a guide scored the samples, mean latent distance to gold."""
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"need equally many predictions and golds, got {len(predictions)} "
                         f"and {len(golds)}")
    out = {"n": len(golds),
           "exact_match": float(np.mean([exact_match(p, g) for p, g in zip(predictions, golds)]))}
    if distances is not None:
        out["mean_distance"] = float(np.mean(distances))
    return out


@torch.no_grad()
def gold_nll(model: torch.nn.Module, tokenizer, prompts: Sequence[str], golds: Sequence[str],
             max_prompt_length: int, max_length: int,
             batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Per row: -log p(gold + EOS | prompt) under `model` (teacher-forced, summed over the
    response tokens that `rayalign.data.encode` keeps under the truncation limits) and that
    token count. The per-token NLL of a set is `nll_per_token` of the two lists."""
    check_paired(prompts, golds)
    device = next(model.parameters()).device
    nll: list[float] = []
    tokens: list[int] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [encode(tokenizer, p, g, max_prompt_length, max_length)
                for p, g in zip(prompts[start:start + batch_size], golds[start:start + batch_size])]
        logps, counts = sequence_logprobs(model, collate(seqs, tokenizer.pad_token_id).to(device))
        nll += (-logps).double().tolist()
        tokens += counts.tolist()
    return nll, tokens


def nll_per_token(nll: Sequence[float], tokens: Sequence[int]) -> float:
    """Token-weighted mean NLL: sum of per-row NLLs over the sum of their token counts (a long
    gold answer weighs by its length, as in a perplexity)."""
    check_paired(nll, tokens)
    total = sum(tokens)
    if total <= 0:
        raise ValueError("no response tokens to average over")
    return float(sum(nll) / total)
