"""Training losses: SFT, DPO (plain and LD-Align weighted) and IPO, and what every preference
loss shares (`PreferenceTerms`, the input checks, the ``*_loss`` wrappers); AOT is
`rayalign.aot`, KTO `rayalign.kto`.

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
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PreferenceTerms",
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
    pc, pr, rc, rr = check_paired(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    check_beta(beta)
    check_label_smoothing(label_smoothing)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    losses = logistic(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    if weights is not None:
        losses = losses * _check_weights(weights, pc).to(losses.dtype)
    return PreferenceTerms(
        losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    )


def logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """``-(1-eps) logsigmoid(z) - eps logsigmoid(-z)``: DPO's loss, and AOT's default
    (`rayalign.aot.AOT_LOSSES`)."""
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses


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
    pc, pr, rc, rr = check_paired(
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


def scalar_loss(terms: Callable[..., PreferenceTerms]) -> Callable[..., Tensor]:
    """The scalar loss of an ``*_terms`` function: the same arguments, its ``.loss``."""

    @functools.wraps(terms)
    def loss(*args, **kwargs) -> Tensor:
        return terms(*args, **kwargs).loss

    loss.__name__ = loss.__qualname__ = terms.__name__.replace("_terms", "_loss")
    loss.__signature__ = inspect.signature(terms).replace(return_annotation="Tensor")
    loss.__doc__ = f"``{terms.__name__}(...).loss``: the scalar loss (same arguments)."
    return loss


dpo_loss = scalar_loss(dpo_terms)  # plain DPO, SPIN, or LD-Align weighted DPO
ipo_loss = scalar_loss(ipo_terms)


def check_logps(**named: Tensor) -> None:
    for name, t in named.items():
        if isinstance(t, Tensor) and t.dim() == 1 and t.is_floating_point():
            continue
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D floating-point tensor (B,), got {got}")


def check_paired(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, ...]:
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


def check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def check_label_smoothing(label_smoothing: float) -> None:
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
