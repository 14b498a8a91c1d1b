"""Hbat's schedule (pure; Algorithm 1): the phases in order, SFT n then preference n for
n = 1..N, each with the penalty that holds it near its start (`schedule`, `config_schedule`),
and the `TrainConfig` a phase trains with. `rayalign.hbat` (module docstring) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config_hbat import HBAT_VARIANTS, HbatConfig
from .config_train import TrainConfig
from .ewc import PhaseKind

Penalty = Literal["none", "ewc", "freeze"]


@dataclass(frozen=True)
class HbatPhase:
    """One phase of Algorithm 1: training on part ``round`` of D_IFA ("ifa") or D_HPA ("hpa").

    ``index`` is the position in the schedule (0-based), ``round`` is n (1-based), and
    ``penalty`` what holds the phase near its start: the EWC term, a freeze, or nothing.
    """

    index: int
    round: int
    kind: PhaseKind
    penalty: Penalty

    @property
    def name(self) -> str:
        return f"phase_{self.index:02d}_{'sft' if self.kind == 'ifa' else 'pref'}{self.round}"

    @property
    def importance_from(self) -> PhaseKind | None:
        """Whose AC weights the penalty: F^HPA in SFT (Eq. 8), F^IFA in preference (Eq. 5)."""
        if self.penalty == "none":
            return None
        return "hpa" if self.kind == "ifa" else "ifa"


def schedule(num_splits: int, penalty: Penalty) -> list[HbatPhase]:
    """The phases of Algorithm 1 in order: SFT n, preference n for n = 1..N.

    SFT phase 1 never has a penalty (Sec. 4.3); every other phase gets ``penalty``.
    """
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if penalty not in ("none", "ewc", "freeze"):
        raise ValueError(f"penalty must be 'none', 'ewc' or 'freeze', got {penalty!r}")
    phases: list[HbatPhase] = []
    for n in range(1, num_splits + 1):
        phases.append(HbatPhase(len(phases), n, "ifa", "none" if n == 1 else penalty))
        phases.append(HbatPhase(len(phases), n, "hpa", penalty))
    return phases


def config_schedule(cfg: HbatConfig) -> list[HbatPhase]:
    """`schedule` of a config: N = ``num_splits``, penalty = the variant's EWC mode."""
    return schedule(cfg.num_splits, HBAT_VARIANTS[cfg.variant][0])


def train_config(cfg: HbatConfig, phase: HbatPhase) -> TrainConfig:
    """The `TrainConfig` of a phase: ``cfg.sft`` for IFA phases, ``cfg.preference`` for HPA."""
    return cfg.sft if phase.kind == "ifa" else cfg.preference
