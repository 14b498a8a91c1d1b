"""LD-Align's §5.2 sanity check of the latent distance against independent signals.

The paper validates its guide by asking whether a larger s(x, y, y') goes with a sample that
is further from the gold answer by an outside judge (GPT-4 in the paper). Here the judges are
free and local: 1 - ROUGE-L F (word overlap with gold, `rayalign.textmetrics.rouge_l`) and
1 - cosine similarity of sentence embeddings (`rayalign.sentsim`, e.g. all-MiniLM-L6-v2).
The figure is Spearman's rank correlation between s and each dissimilarity over one
iteration's pairs: near 0 means the weights ignore what the sample says; >= 0.3 is a
distance that tracks dissimilarity to gold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .textmetrics import check_paired, rouge_l


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (ties share their mean
    rank); NaN with fewer than 3 pairs or a constant side."""
    from scipy.stats import rankdata

    check_paired(a, b)
    if len(a) < 3:
        return math.nan
    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def distance_sanity(distances: Sequence[float], golds: Sequence[str], samples: Sequence[str],
                    cosines: Sequence[float] | None = None) -> dict[str, float]:
    """Spearman(s, 1 - ROUGE-L(sample, gold)) and, given the per-pair sentence-embedding
    cosines, Spearman(s, 1 - cosine)."""
    check_paired(distances, golds)
    check_paired(golds, samples)
    out = {"spearman_rouge": spearman(distances, [1 - r for r in rouge_l(samples, golds)])}
    if cosines is not None:
        check_paired(distances, cosines)
        out["spearman_cosine"] = spearman(distances, [1 - c for c in cosines])
    return out
