"""AOT: distributional preference alignment via 1-D optimal transport (Melnyk et al., NeurIPS
2024; DESIGN.md "AOT"), paired and unpaired, sorted over the global batch.

A pure function of per-sequence summed response log-probs, like the losses of
`rayalign.losses` (whose `PreferenceTerms`, input checks and ``*_loss`` wrapper it shares):
`aot_terms` returns the per-quantile losses and the detached rewards, `aot_loss` their
scalar.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .losses import (
    PreferenceTerms,
    check_beta,
    check_label_smoothing,
    check_logps,
    check_paired,
    logistic,
    scalar_loss,
)

__all__ = ["AOT_LOSSES", "aot_loss", "aot_terms"]


def _hinge(z: Tensor, label_smoothing: float) -> Tensor:
    return F.relu(1 - z)


def _squared(z: Tensor, label_smoothing: float) -> Tensor:
    return (1 - z) ** 2


AOT_LOSSES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "logistic": logistic,
    "hinge": _hinge,
    "squared": _squared,
}


def aot_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    paired: bool = True,
    loss: str = "logistic",
    label_smoothing: float = 0.0,
    group: dist.ProcessGroup | None = None,
) -> PreferenceTerms:
    """Per-quantile AOT losses over the global batch (DESIGN.md "AOT").

    AOT (Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal
    Transport", NeurIPS 2024) asks the chosen-side distribution to first-order
    stochastically dominate the rejected-side one. The violation is a 1-D optimal
    transport cost whose closed form compares the two *sorted* samples quantile by
    quantile:

    - paired (``paired=True``, TRL ``loss_type="aot"``):
      ``delta = sort(pc - pr) - sort(rc - rr)``, all four of shape (B,);
    - unpaired (``paired=False``, TRL ``loss_type="aot_pair"``):
      ``delta = sort(pc - rc) - sort(pr - rr)``, chosen (N,) and rejected (M,).

    and the loss is the mean over quantiles of ``l(beta * delta)`` with ``l`` from
    :data:`AOT_LOSSES`: logistic ``-(1-eps) logsig(z) - eps logsig(-z)`` (default),
    hinge ``relu(1 - z)``, squared ``(1 - z)**2``. Label smoothing applies to the
    logistic loss only. Both sorts are ascending, as in TRL's ``torch.sort`` (descending on
    both sides gives the same quantile pairs).

    Unpaired with N != M: the quantile functions of the two empirical distributions are
    step functions on [0, 1) with steps at k/N and k/M; the loss is the exact integral
    ``int_0^1 l(beta * (Qc(t) - Qr(t))) dt``, i.e. one entry per interval between merged
    steps, weighted by its length (``mass``). This is the mean over ``lcm(N, M)`` quantiles
    with every chosen value repeated ``lcm/N`` times and every rejected one ``lcm/M``
    times, and it reduces to the plain mean when N == M.

    Distributed: if ``group`` is given, or ``torch.distributed`` is initialized with world
    size > 1 and ``group`` is None, the four tensors are all-gathered over the group
    *with autograd* (``torch.distributed.nn.functional.all_gather``) and sorted over the
    global batch, because quantiles of a micro-batch are not quantiles of the batch. This
    is a collective: every rank of the group must call it, with equal per-rank sizes.
    Every rank then holds the same global loss L, and the gather's backward sums the
    gradient arriving from all W ranks, so each rank's local inputs receive ``W * dL/dx``.
    Gradients must therefore be *averaged* across ranks (as DDP and DeepSpeed do) to equal
    the gradient of one process holding the whole global batch; summing them would
    multiply it by W.

    Returns:
        ``PreferenceTerms`` with per-quantile ``losses`` over the global batch and the
        *local* (not gathered) rewards ``beta*(pc-rc)``, ``beta*(pr-rr)``.
    """
    check = check_paired if paired else _check_unpaired
    pc, pr, rc, rr = check(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    _check_aot_options(beta, loss, label_smoothing)

    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    gpc, gpr, grc, grr = _gather_global(pc, pr, rc, rr, group=group)
    upper, lower = (gpc - gpr, grc - grr) if paired else (gpc - grc, gpr - grr)
    upper, lower, mass = _sorted_coupling(upper, lower)
    losses = AOT_LOSSES[loss](beta * (upper - lower), label_smoothing)
    return PreferenceTerms(losses, chosen_rewards, rejected_rewards, mass)


def _check_aot_options(beta: float, loss: str, label_smoothing: float) -> None:
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    if loss not in AOT_LOSSES:
        raise ValueError(f"loss must be one of {sorted(AOT_LOSSES)}, got {loss!r}")
    if label_smoothing and loss != "logistic":
        raise ValueError(f"label_smoothing applies to the logistic loss only, got loss={loss!r}")


aot_loss = scalar_loss(aot_terms)  # mean over quantiles, the same on every rank


def _sorted_coupling(upper: Tensor, lower: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The two samples sorted ascending and coupled quantile by quantile (AOT's 1-D optimal
    transport): equal sizes pair element by element (``mass`` None, a plain mean); unequal
    sizes repeat each value over the intervals of `_quantile_coupling`, whose lengths are
    the ``mass``."""
    upper, _ = torch.sort(upper, dim=0)
    lower, _ = torch.sort(lower, dim=0)
    if upper.shape == lower.shape:
        return upper, lower, None
    upper_idx, lower_idx, mass = _quantile_coupling(upper.numel(), lower.numel())
    upper, lower = upper[upper_idx.to(upper.device)], lower[lower_idx.to(lower.device)]
    return upper, lower, mass.to(device=upper.device, dtype=upper.dtype)


def _quantile_coupling(n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Monotone coupling of two uniform empirical distributions of sizes n and m.

    Returns, for each interval between the merged steps {k/n} U {k/m} of [0, 1), the
    index into the sorted n-sample, the index into the sorted m-sample and the length.
    Integer arithmetic on a grid of lcm(n, m) points keeps it exact.
    """
    grid = math.lcm(n, m)
    cuts = torch.unique(
        torch.cat([torch.arange(n + 1) * (grid // n), torch.arange(m + 1) * (grid // m)])
    )
    starts = cuts[:-1]
    return starts // (grid // n), starts // (grid // m), (cuts[1:] - starts).double() / grid


def _gather_global(
    *tensors: Tensor, group: dist.ProcessGroup | None
) -> tuple[Tensor, ...]:
    """All-gather (with autograd) each tensor over ``group``, or return them unchanged."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return tensors
        group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized")
    world = dist.get_world_size(group=group)
    if world == 1:
        return tensors

    sizes = torch.tensor([t.numel() for t in tensors], device=tensors[0].device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    if any(not torch.equal(s, all_sizes[0]) for s in all_sizes):
        per_rank = [s.tolist() for s in all_sizes]
        raise ValueError(
            "aot_loss needs equal per-rank batch sizes across the process group; got "
            f"[pc, pr, rc, rr] sizes per rank {per_rank}"
        )

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of the functional collectives, but it is the autograd-aware
        # all_gather that also runs on gloo (CPU); the replacement is private API.
        warnings.filterwarnings(
            "ignore", message=".*all_gather is deprecated", category=FutureWarning
        )
        return tuple(torch.cat(all_gather(t, group=group)) for t in tensors)


def _check_unpaired(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, ...]:
    check_logps(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr
    )
    for side, pol, ref in (("chosen", pc, rc), ("rejected", pr, rr)):
        if pol.shape != ref.shape:
            raise ValueError(
                f"policy_{side}_logps and ref_{side}_logps must have the same shape, got "
                f"{tuple(pol.shape)} and {tuple(ref.shape)}"
            )
        if pol.numel() == 0:
            raise ValueError(f"the {side} set is empty")
    return pc, pr, rc, rr
