"""Length-grouped micro-batches: each row once per epoch, less padding, a seeded order."""

import itertools

import numpy as np
import pytest

from rayalign.grouping import grouped_batches
from rayalign.train_batches import micro_batches


def padding(batches, lengths):
    """1 - real tokens / (rows x own width) over micro-batches."""
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / slots


@pytest.mark.parametrize("n,size,window", [(103, 4, 8), (64, 8, 2), (5, 8, 3), (40, 3, 1)])
def test_every_row_exactly_once_per_epoch(n, size, window):
    lengths = np.random.default_rng(0).integers(5, 300, n).tolist()
    for epoch in range(3):
        batches = grouped_batches(lengths, size, window, seed=7, epoch=epoch)
        assert sorted(itertools.chain(*batches)) == list(range(n))
        assert sum(len(b) < size for b in batches) == (n % size != 0)
        assert all(0 < len(b) <= size for b in batches)


def test_windows_are_sorted_by_length_and_the_order_is_seeded():
    lengths = np.random.default_rng(1).integers(5, 300, 96).tolist()
    size, window = 4, 6
    batches = grouped_batches(lengths, size, window, seed=3, epoch=0)
    assert batches == grouped_batches(lengths, size, window, seed=3, epoch=0)  # resumable
    assert batches != grouped_batches(lengths, size, window, seed=3, epoch=1)
    assert batches != grouped_batches(lengths, size, window, seed=4, epoch=0)
    for start in range(0, len(batches), window):  # each window: disjoint length ranges
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b))
                       for b in batches[start:start + window])
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    shuffled = grouped_batches(lengths, size, 1, seed=3, epoch=0)
    assert padding(batches, lengths) < 0.5 * padding(shuffled, lengths)
    # the windows' rows come from all over the epoch, not from consecutive positions
    first_window = sorted(itertools.chain(*batches[:window]))
    assert first_window[-1] - first_window[0] > 2 * size * window


def test_window_zero_keeps_the_given_order():
    assert grouped_batches([3, 1, 2, 5, 4], 2, 0, seed=0, epoch=5) == [[0, 1], [2, 3], [4]]


def test_loop_micro_batches_group_rows_and_balance_unpaired_labels():
    rows = [{"prompt_ids": [0] * (i % 7), "chosen_ids": [1] * (i % 5), "rejected_ids": [2] * 3,
             "row": i} for i in range(30)]
    batches = list(micro_batches(rows, "dpo", 4, window=8, seed=0, epoch=2))
    assert sorted(r["row"] for b in batches for r in b) == list(range(30))
    assert batches != list(micro_batches(rows, "dpo", 4))  # not the given order
    unpaired = [{"prompt": "p" * (i % 9), "completion": "c", "label": bool(i % 2), "row": i}
                for i in range(24)]
    for batch in micro_batches(unpaired, "aot_unpaired", 3, window=4, seed=0, epoch=0):
        assert [r["label"] for r in batch] == [True] * 3 + [False] * 3
