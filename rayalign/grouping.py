"""Length-grouped micro-batches: less padding, data order still random at the epoch scale.

Every micro-batch is padded to its own longest sequence (`rayalign.data.collate`), so rows
of similar length belong together. One epoch's order (`grouped_batches`):

1. a permutation of all rows, seeded by (seed, epoch): a new random order every epoch, the
   same one again on resume;
2. windows of ``window * size`` consecutive rows of that order; inside a window the rows are
   sorted by length (stable, so ties keep the random order) and cut into micro-batches of
   ``size``;
3. the window's micro-batches in a seeded random order, so the long ones do not always come
   first or last.

Each row is in exactly one micro-batch per epoch; one micro-batch of the last window is
short when ``size`` does not divide the row count (at the same index on every rank, since the
ranks' shards have equal sizes and share the seed). ``window = 1`` is a plain per-epoch shuffle, ``window = 0`` keeps the given order
(no shuffle, no grouping). The window is the trade-off HF Trainer's ``group_by_length``
makes with its "mega-batches" of 50 batches: larger windows pad less but make micro-batch
composition less random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def grouped_batches(lengths: Sequence[int], size: int, window: int, seed: int,
                    epoch: int) -> list[list[int]]:
    """Row indices of one epoch's micro-batches (module docstring); ``lengths[i]`` is the
    padded width row i needs."""
    if size < 1 or window < 0:
        raise ValueError(f"need size >= 1 and window >= 0, got size={size}, window={window}")
    n = len(lengths)
    if window == 0:
        return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    rng = np.random.default_rng((seed, epoch))
    order = rng.permutation(n)
    span = window * size
    batches: list[list[int]] = []
    for start in range(0, n, span):
        rows = order[start:start + span]
        rows = rows[np.argsort(np.asarray(lengths)[rows], kind="stable")]
        chunk = [rows[i:i + size].tolist() for i in range(0, len(rows), size)]
        batches += [chunk[i] for i in rng.permutation(len(chunk))]
    return batches

