"""LD-Align per-pair weights from latent distances (DESIGN.md, "LD-Align weights").

``s_i = || phi(x_i, y_i) - phi(x_i, y'_i) ||_2`` is the guide distance between the gold
response and the policy's sample; the weight of pair i is ``w_i = s_i / mean_j s_j`` with the
mean over the *whole iteration's dataset* (LD-Align paper, Algorithm 1 line 10: the distance
normalised by its expectation S_phi(D, p_ref)), so the weights have mean exactly 1 and the
weighted DPO loss keeps the scale of plain DPO.

The pipeline computes the mean once over every row (`distance_mean`) and then weights each
batch with it (`ld_align_weights(batch, mean)`); the two steps are separate so that no
batch-local mean can slip in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class WeightError(ValueError):
    """Distances that cannot be normalised into weights; the message says which and why."""


def _as_distances(distances: Sequence[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(distances, dtype=np.float64)
    if s.ndim != 1:
        raise WeightError(f"distances must be one-dimensional, got shape {s.shape}")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise WeightError(f"{bad.size} non-finite distance(s), first at index {bad[0]}: "
                          f"{s[bad[0]]}; the guide scorer produced NaN/inf")
    negative = np.flatnonzero(s < 0)
    if negative.size:
        raise WeightError(f"distance at index {negative[0]} is negative ({s[negative[0]]}); "
                          "an L2 distance is >= 0")
    return s


def distance_mean(distances: Sequence[float] | np.ndarray) -> float:
    """mean_j s_j over the whole dataset, after checking every distance is finite and >= 0.

    A zero mean means every sample is at distance 0 from its gold response (the policy
    reproduces the SFT data in latent space), so ``s_i / mean`` is undefined: that is an
    error, not a silent fallback to uniform weights.
    """
    s = _as_distances(distances)
    if s.size == 0:
        raise WeightError("no distances: the dataset is empty")
    mean = float(s.mean())
    if mean <= 0.0:
        raise WeightError(f"all {s.size} distances are 0, so s_i / mean(s) is undefined; "
                          "use uniform weights (SPIN) for this iteration")
    return mean


def ld_align_weights(
    distances: Sequence[float] | np.ndarray, mean: float | None = None
) -> np.ndarray:
    """``w_i = s_i / mean`` (float64), with `mean` = `distance_mean` of the whole dataset.

    Pass the dataset-wide `mean` when `distances` is one batch of it; without it the mean of
    `distances` itself is used (they are then the whole dataset).
    """
    s = _as_distances(distances)
    if mean is None:
        mean = distance_mean(s)
    elif not (np.isfinite(mean) and mean > 0):
        raise WeightError(f"the dataset mean distance must be finite and > 0, got {mean}")
    return s / mean
