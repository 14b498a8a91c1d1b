"""Hbat's penalty (Hbat Sec. 3, Eqs. 6-10) as it runs inside a `rayalign.train.Trainer`:
the per-phase change C, its accumulation AC^k, the importance F and the penalty of a phase
(`phase_penalty`), and the gradient hooks that apply it (EWC, or Hbat-Freeze's frozen
tensors with their Adam first moment reset) to the rank's own ZeRO pieces. The arithmetic is
rayalign/ewc.py; the run that calls this is rayalign/hbat.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import dsparams
from .config_hbat import EWCConfig
from .ewc import (
    AccumulatedChange, Snapshot, add_penalty_grad_, change_from_sums, freeze_selection,
    importance, importance_stats,
)
from .hbat_schedule import HbatPhase, Penalty


# --------------------------------------------------------------------------------------
# C -> AC -> F bookkeeping (pure)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhasePenalty:
    """What one phase uses: F per tensor (EWC) or the frozen tensor names (freeze).

    ``stats`` is `rayalign.ewc.importance_stats` of F (for freeze: of F computed the same way,
    to show how concentrated the ranking was), for the per-phase log.
    """

    mode: Penalty
    importance: dict[str, float]
    frozen: tuple[str, ...]
    stats: dict

    def to_log(self) -> dict:
        return {"mode": self.mode, "frozen": list(self.frozen), **self.stats}


def phase_penalty(phase: HbatPhase, ac: AccumulatedChange, ewc: EWCConfig) -> PhasePenalty | None:
    """The penalty of ``phase`` from the accumulated change of the other phase type, or None.

    F = F_max softmax(g(AC^k)) (`rayalign.ewc.importance`; Eqs. 6, 9, 10) with k =
    `HbatPhase.importance_from`; freeze selects the top ``freeze_fraction`` tensors by AC^k.
    """
    source = phase.importance_from
    if source is None:
        return None
    accumulated = ac.get(source)
    if not accumulated:
        raise ValueError(f"{phase.name} needs F^{source.upper()}, but no {source} phase finished")
    f = importance(accumulated, ewc.f_max, scale=ewc.scale, normalize=ewc.normalize)
    frozen = ()
    if phase.penalty == "freeze":
        frozen = tuple(freeze_selection(accumulated, ewc.freeze_fraction))
    return PhasePenalty(phase.penalty, f, frozen, importance_stats(f).to_dict())


def accumulated_from_records(phases: Sequence[HbatPhase], changes: Sequence[Mapping[str, float]]
                             ) -> AccumulatedChange:
    """AC per phase type (Eq. 10) from the C of the finished phases, in schedule order."""
    ac = AccumulatedChange()
    for phase, change in zip(phases, changes, strict=True):
        ac.add(phase.kind, change)
    return ac


# --------------------------------------------------------------------------------------
# Gradient hooks on a Trainer (per worker)
# --------------------------------------------------------------------------------------


def ewc_hook(anchor: Snapshot, coeffs: Mapping[str, float]) -> Callable:
    """`rayalign.train.GradHook` adding lambda F_i (theta_i - theta*_i) to every gradient piece.

    ``coeffs`` maps tensor name -> lambda * F_i; tensors with a zero coefficient are left alone.
    """

    def add(name: str, param: Tensor, grad: Tensor) -> Tensor:
        c = coeffs[name]
        return add_penalty_grad_(grad, param, anchor.tensors[name], c) if c else grad

    return lambda trainer: trainer.update_local_grads(add)


def freeze_hook(frozen: Sequence[str]) -> Callable:
    """`rayalign.train.GradHook` zeroing the gradient of the ``frozen`` tensors (Hbat-Freeze)."""
    names = frozenset(frozen)
    return lambda trainer: trainer.update_local_grads(
        lambda name, param, grad: grad.zero_() if name in names else grad
    )


def penalty_hook(trainer, penalty: PhasePenalty | None, anchor: Snapshot, lam: float
                 ) -> Callable | None:
    """The gradient hook of a phase: EWC toward ``anchor`` with lambda F_i, or the freeze
    (whose momentum reset happens here, at the phase start), or None."""
    if penalty is None:
        return None
    if penalty.mode == "ewc":
        return ewc_hook(anchor, {n: lam * f for n, f in penalty.importance.items()})
    zero_first_moment(trainer, penalty.frozen)
    return freeze_hook(penalty.frozen)


def zero_first_moment(trainer, names: Sequence[str]) -> None:
    """Zero AdamW's ``exp_avg`` of the named tensors (all pieces this rank holds).

    With a zero first moment and zero gradients AdamW's update is exactly 0, so a frozen
    tensor keeps its value even after earlier phases built up momentum. A tensor the
    optimizer has no state for yet (no step taken) has nothing to zero.
    """
    dsparams.link_optimizer_state(trainer.engine.optimizer)
    params = dict(trainer.module.named_parameters())
    for name in names:
        state = dsparams.local_optimizer_state(trainer.engine.optimizer, params[name], "exp_avg")
        if state is not None:
            state.zero_()


def global_change(trainer, anchor: Snapshot) -> dict[str, float]:
    """C_i (Eq. 7) of every trainable tensor between ``anchor`` and the current parameters.

    ``anchor`` holds this rank's pieces (`Trainer.local_params` at the phase start). Sums of
    squared differences of the pieces are all-reduced when they are partitions (ZeRO 1/2/3;
    one collective for all tensors; a tensor this rank holds nothing of adds 0) and divided
    by each full tensor's numel.
    """
    params = dict(trainer.module.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    local = anchor.change_sums(trainer.local_params())
    sums = torch.zeros(len(names), dtype=torch.float64, device=trainer.device)
    for i, name in enumerate(names):
        if name in local:
            sums[i] = local[name]
    if trainer.pieces_partitioned() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    numel = {n: dsparams.full_numel(params[n]) for n in names}
    return change_from_sums(dict(zip(names, sums.tolist())), numel)
