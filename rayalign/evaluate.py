"""Held-out evaluation of a policy's samples against gold responses.

`exact_match` is the toy task's metric, `position_accuracy` and `edit_distance` its graded
forms (a near miss scores between a hit and a gross failure); `gold_nll` is the teacher-forced negative
log-likelihood of the gold responses under the policy, the likelihood metric that works on
open-ended data; `summarize` turns one policy's scored rows into its metrics (the surface
and similarity metrics themselves are in `textmetrics`, `sentsim` and `rewardmodel`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .data import collate, encode
from .logprobs import sequence_logprobs
from .rewardmodel import win_rate
from .textmetrics import check_paired, distinct_n, duplicate_share, length_stats, loop_share


def exact_match(prediction: str, gold: str) -> bool:
    """Equal up to whitespace (the toy task's answers are space-separated tokens)."""
    return prediction.split() == gold.split()


def position_accuracy(prediction: str, gold: str) -> float:
    """Share of the gold answer's whitespace-separated words that the prediction has at the
    same position (a graded exact match: one wrong digit of six scores 5/6, a missing tail
    scores what came before it; extra words cost nothing here, `edit_distance` counts them).
    1.0 for an empty gold answer only if the prediction is empty too."""
    pred, ref = prediction.split(), gold.split()
    if not ref:
        return float(not pred)
    return sum(p == g for p, g in zip(pred, ref)) / len(ref)


def edit_distance(prediction: str, gold: str) -> int:
    """Levenshtein distance between the two answers as sequences of whitespace-separated
    words (insertions, deletions and substitutions of one word cost 1): how many digits a
    toy-task answer is away from gold."""
    pred, ref = prediction.split(), gold.split()
    previous = list(range(len(ref) + 1))
    for i, p in enumerate(pred, 1):
        current = [i]
        for j, g in enumerate(ref, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (p != g)))
        previous = current
    return previous[-1]


def text_stats(texts: Sequence[str], prompts: Sequence[str]) -> dict[str, float]:
    """The surface statistics of a set of answers to `prompts` (rayalign.textmetrics); also
    computed for the gold answers, as the reference a policy's values are read against."""
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "loop_share": loop_share(texts), "duplicate_share": duplicate_share(texts, prompts)}


def summarize(scored: Mapping[str, Sequence],
              baseline: Mapping[str, Sequence] | None = None) -> dict[str, float]:
    """The metrics of one policy from its scored held-out rows (columns of
    pipelines/evaluate.py: row, prompt, gold, sample, sample_tokens, truncated, gold_nll,
    gold_tokens, rouge_l, and where measured distance, cosine, reward).

    Means over rows, except ``gold_nll`` (per token, `nll_per_token`) and the corpus-level
    distinct-n. ``win_rate`` (with a reward and a `baseline`, theta_0's scored rows for the
    same prompts): `rayalign.rewardmodel.win_rate`, ties count half.
    """
    samples, golds = list(scored["sample"]), list(scored["gold"])
    check_paired(samples, golds)
    if not samples:
        raise ValueError("no scored rows")
    out = {"n": len(samples),
           "exact_match": float(np.mean([exact_match(p, g) for p, g in zip(samples, golds)])),
           "position_accuracy": float(np.mean([position_accuracy(p, g)
                                               for p, g in zip(samples, golds)])),
           "edit_distance": float(np.mean([edit_distance(p, g) for p, g in zip(samples, golds)])),
           "gold_nll": nll_per_token(scored["gold_nll"], scored["gold_tokens"]),
           **length_stats(scored["sample_tokens"], scored["truncated"]),
           **text_stats(samples, scored["prompt"]),
           "rouge_l": float(np.mean(scored["rouge_l"]))}
    for key, name in (("distance", "mean_distance"), ("cosine", "cosine"), ("reward", "reward")):
        values = scored.get(key)
        if values is not None and len(values) and all(v is not None for v in values):
            out[name] = float(np.mean(values))
    if "reward" in out and baseline is not None:
        if list(baseline["row"]) != list(scored["row"]):
            raise ValueError("win rate: the baseline was scored on other prompts (rows differ)")
        out["win_rate"] = win_rate(scored["reward"], baseline["reward"], samples,
                                   baseline["sample"])
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


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (scipy.stats.spearmanr: Pearson of average ranks, so ties
    share a rank); None when a side is constant, where it is undefined."""
    from scipy.stats import spearmanr

    check_paired(x, y)
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def guide_correlations(scored: Mapping[str, Mapping[str, Sequence]]
                       ) -> dict[tuple[str, str], tuple[float | None, int]]:
    """The LD-Align paper's §5.2 sanity check on held-out samples: per policy, Spearman of
    the guide's latent distance s with 1 - cosine and 1 - ROUGE-L to gold (independent
    dissimilarities; a useful guide correlates positively), where both were measured.
    `scored`: policy -> columns of its scored file. Values: (rho, number of samples)."""
    out = {}
    for policy, cols in scored.items():
        s = cols.get("distance")
        if s is None or not len(s) or any(v is None for v in s):
            continue
        for measure in ("cosine", "rouge_l"):
            m = cols.get(measure)
            if m is not None and len(m) and all(v is not None for v in m):
                out[(policy, measure)] = (spearman(list(s), [1 - v for v in m]), len(s))
    return out
