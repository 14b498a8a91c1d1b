"""Hbat's modified EWC: parameter change, accumulated change, importance, penalty, freeze.

Hbat (shared/papers/hbat.txt, Section 4, Algorithm 1; shared/DESIGN.md, "Hbat") replaces the
Fisher diagonal of EWC by one number per parameter *tensor* i, derived from how far that
tensor moved in earlier phases of one type k ("ifa" = SFT phases, "hpa" = preference phases):

    C_i      = mean_j (theta_before_ij - theta_after_ij)^2                      (Eq. 7)
    AC_i^k   = sum of C_i over all finished phases of type k                    (Eq. 10)
    F_i^k    = F_max * softmax_i(g(AC_i^k))                                     (Eqs. 6, 9)
    penalty  = sum_i (lambda / 2) * F_i * sum_j (theta_ij - theta*_ij)^2        (Eqs. 5, 8)
    gradient = lambda * F_i * (theta_i - theta*_i)

The penalty is quadratic, so its gradient is added to the existing gradient in place: no
second backward and no autograd graph. Everything here is elementwise or a per-tensor sum,
so it works on any piece of a tensor (a ZeRO-3 partition, a slice): callers pass their local
pieces, all-reduce the per-tensor sums where a full-tensor quantity is needed, and use the
full tensor's numel for C.

The choice of g (DESIGN.md leaves it open):

- ``normalize="none", scale=1``: the paper's formula on raw C. Raw C is ~1e-8, so the softmax
  is uniform to ~1e-8: F_i = F_max / n for every tensor, i.e. a plain L2 pull toward theta*
  that ignores the measured change entirely.
- ``normalize="none", scale=1e20``: the authors' released code (change scaled by 1e10 before
  squaring). Differences of ~1e11 in the exponent make the softmax one-hot: the single
  tensor that moved most gets F_max, every other tensor gets exactly 0.
- ``normalize="mean", scale=1`` (the default): g(AC)_i = AC_i / mean_i AC. This is
  scale-free: it does not depend on the learning rate, the number of steps or the
  parameters' magnitude, only on how each tensor's movement compares with the average. The
  softmax then keeps the ranking with bounded contrast (a tensor whose AC is twice the mean
  gets e ~ 2.7x the share of an average one; 3x the mean gets e^3 ~ 20x the share of one
  that did not move), so the penalty is neither uniform nor concentrated on one tensor.
  ``scale`` then acts as an inverse temperature (it multiplies after the normalization).

So g(AC)_i = scale * AC_i / mean(AC) with ``normalize="mean"`` (all-zero AC gives uniform F)
and scale * AC_i with ``normalize="none"``. Every run should log `importance_stats` of the F
it used, so the effect of the choice is visible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor

PhaseKind = Literal["ifa", "hpa"]
Normalize = Literal["mean", "none"]

_PHASE_ALIASES: dict[str, PhaseKind] = {
    "ifa": "ifa",
    "sft": "ifa",
    "hpa": "hpa",
    "preference": "hpa",
}


def phase_kind(name: str) -> PhaseKind:
    """Canonical phase type: "sft"/"ifa" -> "ifa", "preference"/"hpa" -> "hpa"."""
    try:
        return _PHASE_ALIASES[name]
    except KeyError:
        raise ValueError(
            f"unknown phase type {name!r}; expected one of {sorted(_PHASE_ALIASES)}"
        ) from None


def _moved(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``t`` on ``device`` in ``dtype``: itself if already there, else a temporary copy.

    Host-to-device copies are asynchronous (safe on the same stream; fast from pinned
    memory); copies to the CPU are synchronous, so the result is complete when read.
    """
    return t.detach().to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


# --------------------------------------------------------------------------------------
# Parameter change C (Eq. 7)
# --------------------------------------------------------------------------------------


def sum_sq_diff(a: Tensor, b: Tensor) -> Tensor:
    """sum_j (a_j - b_j)^2 of two same-shaped pieces, as a 0-dim float64 tensor on a's device.

    ``b`` is moved to ``a``'s device for the call only (it may be an offloaded CPU copy). The
    difference is taken in at least float32, the sum accumulated in float64.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    diff = _moved(a, a.device, dtype) - _moved(b, a.device, dtype)
    return diff.square().sum(dtype=torch.float64)


def change_from_sums(
    sum_sq: Mapping[str, float | Tensor], numel: Mapping[str, int]
) -> dict[str, float]:
    """C_i = sum_sq_i / numel_i (Eq. 7) from sums that cover the *whole* tensor.

    Under partitioning each rank computes `sum_sq_diff` of its own piece, the caller
    all-reduces (sums) them, and passes the full tensor's numel here.
    """
    if set(sum_sq) != set(numel):
        raise ValueError("sum_sq and numel must have the same tensor names")
    change = {}
    for name, total in sum_sq.items():
        if numel[name] <= 0:
            raise ValueError(f"numel of {name!r} must be positive, got {numel[name]}")
        change[name] = float(total) / numel[name]
    return change


def parameter_change(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> dict[str, float]:
    """Single-process C_i = mean_j (before_ij - after_ij)^2 (Eq. 7) for whole tensors."""
    if set(before) != set(after):
        raise ValueError("before and after must have the same tensor names")
    return change_from_sums(
        {name: sum_sq_diff(after[name], before[name]) for name in before},
        {name: before[name].numel() for name in before},
    )


# --------------------------------------------------------------------------------------
# Accumulated change AC (Eq. 10)
# --------------------------------------------------------------------------------------


@dataclass
class AccumulatedChange:
    """AC_i^k: the sum of C_i over all finished phases of type k (Eq. 10), per tensor name.

    Algorithm 1 uses AC^ifa (which includes the IFA phase just finished) to weight the
    penalty of the following preference phase, and AC^hpa (all earlier preference phases)
    for SFT phases n > 1. Serializable with `to_dict` / `from_dict` for checkpoints.
    """

    totals: dict[PhaseKind, dict[str, float]] = field(default_factory=dict)
    phases: dict[PhaseKind, int] = field(default_factory=dict)

    def add(self, kind: str, change: Mapping[str, float]) -> None:
        """Add one finished phase's C (tensor name -> C_i) to AC of phase type ``kind``."""
        k = phase_kind(kind)
        if not change:
            raise ValueError("change is empty")
        for name, c in change.items():
            if not math.isfinite(c) or c < 0:
                raise ValueError(f"C of {name!r} must be finite and >= 0, got {c}")
        current = self.totals.get(k)
        if current is None:
            self.totals[k] = {name: float(c) for name, c in change.items()}
        else:
            if set(current) != set(change):
                missing = sorted(set(current) ^ set(change))[:5]
                raise ValueError(f"tensor names differ from earlier {k} phases (e.g. {missing})")
            for name, c in change.items():
                current[name] += float(c)
        self.phases[k] = self.phases.get(k, 0) + 1

    def get(self, kind: str) -> dict[str, float]:
        """AC^k as a new dict; empty if no phase of that type has finished."""
        return dict(self.totals.get(phase_kind(kind), {}))

    def num_phases(self, kind: str) -> int:
        """How many phases of this type have been added."""
        return self.phases.get(phase_kind(kind), 0)

    def to_dict(self) -> dict:
        """Plain (JSON-serializable) form."""
        return {
            "totals": {k: dict(v) for k, v in self.totals.items()},
            "phases": dict(self.phases),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> AccumulatedChange:
        """Inverse of `to_dict`."""
        totals = {
            phase_kind(k): {n: float(c) for n, c in v.items()} for k, v in data["totals"].items()
        }
        phases = {phase_kind(k): int(v) for k, v in data["phases"].items()}
        if set(totals) != set(phases):
            raise ValueError("totals and phases name different phase types")
        return cls(totals=totals, phases=phases)


# --------------------------------------------------------------------------------------
# Importance F (Eqs. 6, 9) and its statistics
# --------------------------------------------------------------------------------------


def importance(
    ac: Mapping[str, float],
    f_max: float,
    *,
    scale: float = 1.0,
    normalize: Normalize = "mean",
) -> dict[str, float]:
    """F_i = f_max * softmax_i(g(AC_i)) (Eqs. 6, 9), g as in the module docstring.

    The softmax is computed in float64 after subtracting the maximum, so huge scaled values
    (``scale=1e20``) give an exact one-hot instead of overflow.
    """
    if not ac:
        raise ValueError("no accumulated change: EWC needs at least one finished phase")
    if f_max <= 0 or scale <= 0:
        raise ValueError(f"f_max and scale must be > 0, got f_max={f_max}, scale={scale}")
    names = list(ac)
    values = torch.tensor([ac[n] for n in names], dtype=torch.float64)
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("accumulated change must be finite and >= 0")
    if normalize == "mean":
        mean = values.mean()
        values = values / mean if mean > 0 else torch.zeros_like(values)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'mean' or 'none', got {normalize!r}")
    logits = values * scale
    if not torch.isfinite(logits).all():
        raise ValueError(f"scale={scale} overflows float64")
    shares = torch.softmax(logits, dim=0)
    return {n: f_max * s for n, s in zip(names, shares.tolist())}


@dataclass(frozen=True)
class ImportanceStats:
    """How concentrated an importance distribution is; for the per-phase log.

    entropy is in nats of the shares p_i = F_i / sum F; normalized_entropy = entropy / log n
    (1 = uniform, 0 = one-hot; defined as 1 for a single tensor); top lists the largest
    shares, largest first, ties by name.
    """

    n: int
    entropy: float
    normalized_entropy: float
    max_share: float
    top: list[tuple[str, float]]

    def to_dict(self) -> dict:
        """Plain (JSON-serializable) form."""
        return asdict(self)


def importance_stats(f: Mapping[str, float], top_k: int = 5) -> ImportanceStats:
    """Entropy, largest share and top-k tensors of an importance distribution F."""
    if not f:
        raise ValueError("empty importance")
    total = sum(f.values())
    if total <= 0:
        raise ValueError("importance must have a positive sum")
    shares = {n: v / total for n, v in f.items()}
    p = torch.tensor(list(shares.values()), dtype=torch.float64)
    entropy = float(-torch.special.xlogy(p, p).sum())
    n = len(shares)
    ranked = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
    return ImportanceStats(
        n=n,
        entropy=entropy,
        normalized_entropy=entropy / math.log(n) if n > 1 else 1.0,
        max_share=ranked[0][1],
        top=ranked[:top_k],
    )


# --------------------------------------------------------------------------------------
# Hbat-Freeze
# --------------------------------------------------------------------------------------


def freeze_selection(scores: Mapping[str, float], fraction: float = 0.2) -> list[str]:
    """Names of the ceil(fraction * n) most important tensors, most important first.

    Hbat-Freeze (paper, Section 5.4 / Appendix A) freezes the top 20% tensors instead of
    applying the penalty. Pass AC (preferred: softmax is monotone, so the order equals F's,
    and AC has no one-hot underflow ties) or F. Rounding is up, so any fraction > 0 freezes
    at least one tensor; fraction * n is first rounded to 9 decimals so that 0.28 * 25
    (7.000000000000001 in float64) gives 7, not 8. Ties are broken by name, so the
    selection is deterministic.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = math.ceil(round(fraction * len(scores), 9))
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [name for name, _ in ranked[:k]]


# --------------------------------------------------------------------------------------
# Anchor snapshot and the penalty (Eqs. 5, 8)
# --------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Copies of (local pieces of) parameter tensors at a phase boundary.

    The snapshot taken when a phase starts is both theta_before for that phase's C (Eq. 7)
    and the anchor theta* of that phase's penalty: the preference phase n is anchored at
    theta^IFA, the parameters after SFT phase n, i.e. before preference phase n; likewise
    for SFT phases n > 1 and theta^HPA (Algorithm 1).
    """

    tensors: dict[str, Tensor]

    @classmethod
    def take(
        cls, params: Mapping[str, Tensor], device: torch.device | str | None = None
    ) -> Snapshot:
        """Detached copies of ``params``; on ``device`` (e.g. "cpu" to offload) or in place.

        A CPU copy of a CUDA tensor is pinned so the per-step transfers are asynchronous.
        """
        tensors = {}
        for name, p in params.items():
            target = p.device if device is None else torch.device(device)
            pin = target.type == "cpu" and p.device.type == "cuda"
            copy = torch.empty(p.shape, dtype=p.dtype, device=target, pin_memory=pin)
            tensors[name] = copy.copy_(p.detach())
        return cls(tensors)

    def change_sums(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Local sum_j (snapshot_ij - param_ij)^2 per tensor: the numerator of C (Eq. 7)."""
        return {name: sum_sq_diff(params[name], t) for name, t in self.tensors.items()}


def add_penalty_grad_(grad: Tensor, param: Tensor, anchor: Tensor, coeff: float) -> Tensor:
    """grad += coeff * (param - anchor) in place, with coeff = lambda * F_i; returns grad.

    Elementwise, so any matching pieces work. ``param`` and ``anchor`` are moved to the
    gradient's device and dtype for this call only; no copy is kept.
    """
    if not grad.shape == param.shape == anchor.shape:
        raise ValueError(
            f"shape mismatch: grad {tuple(grad.shape)}, param {tuple(param.shape)}, "
            f"anchor {tuple(anchor.shape)}"
        )
    diff = _moved(param, grad.device, grad.dtype) - _moved(anchor, grad.device, grad.dtype)
    return grad.add_(diff, alpha=coeff)


@dataclass
class ModifiedEWC:
    """The modified-EWC penalty sum_i (lam/2) F_i ||theta_i - theta*_i||^2 (Eqs. 5, 8).

    ``anchor`` holds theta* (local pieces, possibly offloaded to the CPU), ``importance``
    F_i per tensor name (from `importance`), ``lam`` lambda. Tensors with F_i == 0 (e.g. a
    one-hot F) are skipped. Call `add_grads_` once per optimizer step, on the accumulated
    gradient after the data-parallel reduction (adding it on every rank before an averaging
    reduction gives the same result) and before clipping; mind any loss scaling.
    """

    anchor: Snapshot
    importance: dict[str, float]
    lam: float

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if set(self.importance) != set(self.anchor.tensors):
            raise ValueError("importance and anchor must name the same tensors")

    def coeff(self, name: str) -> float:
        """lambda * F_i of one tensor."""
        return self.lam * self.importance[name]

    def value(self, params: Mapping[str, Tensor]) -> Tensor:
        """The penalty of the local pieces, a 0-dim float64 tensor without autograd graph.

        Under partitioning, sum it over ranks to get the full penalty.
        """
        total = None
        for name, anchor in self.anchor.tensors.items():
            c = self.coeff(name)
            if c == 0.0:
                continue
            term = 0.5 * c * sum_sq_diff(params[name], anchor)
            total = term if total is None else total + term.to(total.device)
        return torch.zeros((), dtype=torch.float64) if total is None else total

    def add_grads_(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
        """grads[i] += lambda * F_i * (params[i] - theta*_i) for every anchored tensor."""
        for name, anchor in self.anchor.tensors.items():
            c = self.coeff(name)
            if c != 0.0:
                add_penalty_grad_(grads[name], params[name], anchor, c)
