"""A training phase and its step schedule (pure): what a phase trains on (`Phase`), how many
optimizer steps it runs (`total_steps`), the learning rate of each step (`lr_at`), and where
it is (`PhaseState`, saved with every DeepSpeed checkpoint so a resumed phase continues at the
same micro-batch). `rayalign.train.Trainer.run_phase` runs one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .config import DataConfig
from .config_train import TrainConfig
from .train_batches import DataPlan


def total_steps(train: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a phase: ``max_steps``, else ``epochs`` full accumulation cycles.

    A trailing partial accumulation of an epoch carries into the next epoch; the last one of
    the phase is dropped, so a phase always ends on a step boundary.
    """
    if train.max_steps is not None:
        return train.max_steps
    steps = train.epochs * batches_per_epoch // train.gradient_accumulation_steps
    if steps < 1:
        raise ValueError(
            f"{batches_per_epoch} micro-batches per epoch x {train.epochs} epochs is less than "
            f"one optimizer step of {train.gradient_accumulation_steps} micro-batches"
        )
    return steps


def lr_at(step: int, total: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to 0.

    ``warmup = floor(warmup_ratio * total)`` steps ramp ``lr * (step+1)/warmup`` (the first
    step already moves, unlike a ramp from 0); the rest follow
    ``lr * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``.
    """
    warmup = int(train.warmup_ratio * total)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Phase:
    """One objective over one dataset: ``train.objective`` on this rank's ``rows``.

    ``rows`` are row dicts (`rayalign.train_batches.to_rows`) of this rank's shard; iterating
    it again starts a new epoch (a list, or an adapter over a Ray Data shard). ``plan`` comes
    from `rayalign.train_batches.plan_data` on the whole dataset.
    """

    name: str
    train: TrainConfig
    data: DataConfig
    rows: Iterable[Mapping]
    plan: DataPlan

    @property
    def steps(self) -> int:
        return total_steps(self.train, self.plan.batches_per_epoch)


@dataclass
class PhaseState:
    """Position in a phase; saved with every DeepSpeed checkpoint for exact resume."""

    phase: str
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch (skipped ones too)
    nonfinite_run: int = 0  # consecutive skipped micro-batches


@dataclass
class PhaseResult:
    state: PhaseState
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
