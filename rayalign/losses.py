"""Training losses: SFT, DPO (plain and LD-Align weighted), AOT and IPO.

Every loss is a pure function of per-sequence *summed* response log-probs of shape (B,)
(see DESIGN.md, "Sequence log-probs"). Notation follows DESIGN.md: ``pc, pr`` are the
policy log-probs of the chosen / rejected responses, ``rc, rr`` the reference ones.

Each preference loss comes as a pair: ``*_terms`` returns a :class:`PreferenceTerms`
(unreduced losses plus the implied, detached rewards for logging) and ``*_loss`` returns
the scalar ``*_terms(...).loss``. Gradient-accumulation scaling and cross-rank gradient
averaging belong to the training loop, not here.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AOT_LOSSES",
    "PreferenceTerms",
    "aot_loss",
    "aot_terms",
    "dpo_loss",
    "dpo_terms",
    "ipo_loss",
    "ipo_terms",
    "sft_loss",
]


@dataclass(frozen=True)
class PreferenceTerms:
    """Unreduced preference loss and the implied rewards of one (micro-)batch.

    Attributes:
        losses: per-example losses (DPO, IPO) or per-quantile losses (AOT, global batch).
        chosen_rewards: ``beta * (pc - rc)`` per local example, detached.
        rejected_rewards: ``beta * (pr - rr)`` per local example, detached.
        mass: probability mass of each entry of ``losses``; ``None`` means uniform. Only
            unpaired AOT with differently sized chosen and rejected sets sets it.

    ``loss`` is the scalar that ``*_loss`` returns (mean, or mass-weighted sum). Reward
    margins / accuracies for logging: ``chosen_rewards - rejected_rewards``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    mass: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        if self.mass is None:
            return self.losses.mean()
        return (self.losses * self.mass).sum()


def sft_loss(policy_logps: Tensor, num_tokens: Tensor) -> Tensor:
    """Token-level mean negative log-likelihood of the response tokens of a batch.

    ``-sum_i policy_logps_i / sum_i num_tokens_i``: every response token in the batch has
    the same weight (long responses count more than short ones), unlike a mean of
    per-sequence means. This is the instruction-following objective of Hbat's SFT phases
    and of the LD-Align preliminaries (DESIGN.md). The mean is over *this* batch's tokens;
    with gradient accumulation or data parallelism the caller decides how batches combine.

    Args:
        policy_logps: (B,) summed response log-probs under the policy.
        num_tokens: (B,) number of response tokens that each sum covers.
    """
    check_logps(policy_logps=policy_logps)
    if num_tokens.shape != policy_logps.shape:
        raise ValueError(
            f"num_tokens must have shape {tuple(policy_logps.shape)} like policy_logps, "
            f"got {tuple(num_tokens.shape)}"
        )
    total = num_tokens.sum()
    if not bool(total > 0):
        raise ValueError(f"num_tokens must sum to a positive count, got {total.item()}")
    return -policy_logps.sum() / total.to(policy_logps.dtype)


def dpo_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> PreferenceTerms:
    """Per-pair (weighted) DPO losses: DESIGN.md "DPO (and weighted DPO)", LD-Align Eq. 4.

    ``loss_i = -w_i * [(1-eps) logsigmoid(beta*h_i) + eps logsigmoid(-beta*h_i)]`` with
    ``h_i = (pc-rc) - (pr-rr)``. ``weights=None`` is plain DPO (``w_i = 1``); LD-Align passes
    ``w_i = s_i / mean_j s_j``, already normalized over the iteration's dataset, and the
    batch loss is then ``mean_i loss_i`` (not divided by ``sum w``). ``eps`` is the
    conservative-DPO label smoothing (the probability that the label is flipped). With
    policy == reference and ``w = 1, eps = 0`` every loss is ``ln 2``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            (B,) summed response log-probs.
        beta: > 0, strength of the implicit KL regularization.
        weights: optional (B,) finite, non-negative per-pair weights.
        label_smoothing: eps in [0, 0.5).
    """
    pc, pr, rc, rr = _check_paired(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    check_beta(beta)
    _check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    losses = _logistic(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    if weights is not None:
        losses = losses * _check_weights(weights, pc).to(losses.dtype)
    return PreferenceTerms(
        losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    )


def _hinge(z: Tensor, label_smoothing: float) -> Tensor:
    return F.relu(1 - z)


def _squared(z: Tensor, label_smoothing: float) -> Tensor:
    return (1 - z) ** 2


def _logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """``-(1-eps) logsigmoid(z) - eps logsigmoid(-z)``, shared by DPO and AOT."""
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses


AOT_LOSSES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "logistic": _logistic,
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
    check = _check_paired if paired else _check_unpaired
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
    _check_label_smoothing(label_smoothing)
    if loss not in AOT_LOSSES:
        raise ValueError(f"loss must be one of {sorted(AOT_LOSSES)}, got {loss!r}")
    if label_smoothing and loss != "logistic":
        raise ValueError(f"label_smoothing applies to the logistic loss only, got loss={loss!r}")


def ipo_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> PreferenceTerms:
    """Per-pair IPO losses (Azar et al. 2023, Eq. 17; TRL ``loss_type="ipo"``).

    ``loss_i = (h_i - 1/(2 beta))**2`` where ``h_i`` is the DPO margin computed from
    *per-token average* log-probs: ``h_i = (pc_i - rc_i)/Lc_i - (pr_i - rr_i)/Lr_i``.
    IPO regresses the margin onto the fixed target ``1/(2 beta)``, so the margin's scale
    matters; TRL divides all four log-probs by the response length for IPO only. Here the
    log-probs are summed like everywhere else and the token counts are required keyword
    arguments, so the normalization cannot be forgotten. Policy and reference score the
    same tokens, so they share the counts. The rewards are ``beta`` times the per-token
    log-ratios (as TRL logs them for IPO).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            (B,) summed response log-probs.
        beta: > 0, IPO's regularization tau.
        chosen_lengths, rejected_lengths: (B,) positive response token counts.
    """
    pc, pr, rc, rr = _check_paired(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    check_beta(beta)
    lc = _check_lengths(chosen_lengths, pc, "chosen_lengths")
    lr = _check_lengths(rejected_lengths, pc, "rejected_lengths")
    chosen_logratios, rejected_logratios = (pc - rc) / lc, (pr - rr) / lr
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return PreferenceTerms(
        losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    )


def _scalar_loss(terms: Callable[..., PreferenceTerms]) -> Callable[..., Tensor]:
    """The scalar loss of an ``*_terms`` function: the same arguments, its ``.loss``."""

    @functools.wraps(terms)
    def loss(*args, **kwargs) -> Tensor:
        return terms(*args, **kwargs).loss

    loss.__name__ = loss.__qualname__ = terms.__name__.replace("_terms", "_loss")
    loss.__signature__ = inspect.signature(terms).replace(return_annotation="Tensor")
    loss.__doc__ = f"``{terms.__name__}(...).loss``: the scalar loss (same arguments)."
    return loss


dpo_loss = _scalar_loss(dpo_terms)  # plain DPO, SPIN, or LD-Align weighted DPO
aot_loss = _scalar_loss(aot_terms)  # mean over quantiles, the same on every rank
ipo_loss = _scalar_loss(ipo_terms)


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


def check_logps(**named: Tensor) -> None:
    for name, t in named.items():
        if isinstance(t, Tensor) and t.dim() == 1 and t.is_floating_point():
            continue
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D floating-point tensor (B,), got {got}")


def _check_paired(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, ...]:
    named = dict(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr
    )
    check_logps(**named)
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"paired log-probs must all have the same shape (B,), got {shapes}")
    if pc.numel() == 0:
        raise ValueError("log-prob tensors are empty")
    return pc, pr, rc, rr


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


def check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")


def _check_weights(weights: Tensor, like: Tensor) -> Tensor:
    if not isinstance(weights, Tensor) or weights.shape != like.shape:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a tensor of shape {tuple(like.shape)}, got {got}")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite (no NaN or inf)")
    if bool((weights < 0).any()):
        raise ValueError(f"weights must be >= 0, got min {weights.min().item()}")
    return weights


def _check_lengths(lengths: Tensor, like: Tensor, name: str) -> Tensor:
    if not isinstance(lengths, Tensor) or lengths.shape != like.shape:
        got = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(like.shape)}, got {got}")
    if not bool((lengths > 0).all()):
        raise ValueError(f"{name} must be positive token counts, got min {lengths.min().item()}")
    return lengths.to(like.dtype)


def distinct_pair_wins(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       identical: Tensor) -> tuple[float, float]:
    """Reward accuracy's counts over the pairs whose two responses differ: (pairs among them
    with chosen reward > rejected reward, how many there are).

    A pair with rejected == chosen (an LD-Align / SPIN sample equal to gold) has margin 0 up
    to float noise and no DPO gradient; counted in the accuracy it is a miss or a coin flip
    that says nothing about the policy. The accuracy is ``wins / distinct`` and the share of
    identical pairs ``1 - distinct / pairs``, reported beside it.
    """
    if not (chosen_rewards.shape == rejected_rewards.shape == identical.shape):
        raise ValueError(f"shapes differ: {tuple(chosen_rewards.shape)}, "
                         f"{tuple(rejected_rewards.shape)}, {tuple(identical.shape)}")
    distinct = ~identical.to(torch.bool)
    wins = (chosen_rewards > rejected_rewards) & distinct
    return float(wins.sum()), float(distinct.sum())
