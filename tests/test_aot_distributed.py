"""Distributed AOT equals single-process AOT on the global batch (2 CPU processes, gloo).

A tiny linear "policy" maps fixed per-response features to summed log-probs. Each rank
holds one half of the global batch. The parent test computes loss and parameter gradient
on the whole batch in one process; each rank checks that the gathered loss equals it, that
its all-reduce *average* of gradients equals it, and that the all-reduce *sum* is
world_size times it (the documented reason gradients must be averaged).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from rayalign.aot import aot_loss
from conftest import spawn_ranks

WORLD = 2
N_PER_RANK = 4  # chosen responses per rank
M_PER_RANK = {True: 4, False: 3}  # rejected responses per rank, by `paired`
DIM = 3
F64 = torch.float64
TOL = dict(rtol=0.0, atol=1e-10)

# (paired, loss, label_smoothing)
CASES = [
    (True, "logistic", 0.0),
    (True, "logistic", 0.1),
    (True, "hinge", 0.0),
    (True, "squared", 0.0),
    (False, "logistic", 0.1),
    (False, "squared", 0.0),
]


def _policy() -> torch.nn.Linear:
    model = torch.nn.Linear(DIM, 1, dtype=F64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.7, -1.3, 0.4]], dtype=F64))
        model.bias.fill_(-12.0)
    return model


def _global_batch(paired: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, m = WORLD * N_PER_RANK, WORLD * M_PER_RANK[paired]
    return {
        "x_chosen": 3 * torch.randn(n, DIM, dtype=F64, generator=g),
        "x_rejected": 3 * torch.randn(m, DIM, dtype=F64, generator=g),
        "ref_chosen": -12 + 2 * torch.randn(n, dtype=F64, generator=g),
        "ref_rejected": -12 + 2 * torch.randn(m, dtype=F64, generator=g),
    }


def _loss_and_grad(case, rank: int | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and d(loss)/d(params) on rank's shard, or on the whole batch if rank is None."""
    paired, loss, label_smoothing = case
    batch = _global_batch(paired)
    if rank is not None:
        n, m = N_PER_RANK, M_PER_RANK[paired]
        chosen, rejected = slice(rank * n, (rank + 1) * n), slice(rank * m, (rank + 1) * m)
        batch = {
            k: v[chosen] if k.endswith("chosen") else v[rejected] for k, v in batch.items()
        }
    model = _policy()
    value = aot_loss(
        model(batch["x_chosen"]).squeeze(-1),
        model(batch["x_rejected"]).squeeze(-1),
        batch["ref_chosen"],
        batch["ref_rejected"],
        beta=0.1,
        paired=paired,
        loss=loss,
        label_smoothing=label_smoothing,
        **kwargs,
    )
    value.backward()
    return value.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def _worker(rank: int, init_file: str, expected: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
    )
    try:
        for case, (want_loss, want_grad) in zip(CASES, expected):
            for kwargs in ({}, {"group": dist.group.WORLD}):
                loss, grad = _loss_and_grad(case, rank, **kwargs)
                torch.testing.assert_close(loss, want_loss, **TOL)
                dist.all_reduce(grad)
                torch.testing.assert_close(grad, WORLD * want_grad, **TOL)
                torch.testing.assert_close(grad / WORLD, want_grad, **TOL)

        n = N_PER_RANK - rank
        x = torch.zeros(n, dtype=F64)
        try:
            aot_loss(x, x, x, x, beta=0.1)
        except ValueError as err:
            assert "equal per-rank batch sizes" in str(err)
        else:
            raise AssertionError("unequal per-rank sizes were accepted")
    finally:
        dist.destroy_process_group()


def test_distributed_aot_equals_single_process(tmp_path):
    assert not dist.is_initialized()
    expected = [_loss_and_grad(case, rank=None) for case in CASES]
    # The sharded, non-gathered loss is different, so the comparison below has teeth.
    local = _loss_and_grad(CASES[0], rank=0)[0]
    assert abs(local - expected[0][0]) > 1e-3
    spawn_ranks(_worker, WORLD, str(tmp_path / "pg_init"), expected)
