"""Held-out evaluation of a policy's samples against gold responses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
