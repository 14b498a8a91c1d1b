"""KTO (Ethayarajh et al. 2024, Eq. 7), a baseline of the AOT paper, as TRL's ``kto`` computes it.

KTO scores *unpaired* examples: a desirable set (chosen, label true) and an undesirable set
(rejected, label false), each with policy and reference log-probs summed over response tokens
(DESIGN.md, "Sequence log-probs"). Both sides are measured against a reference point

    z0 = max(0, mean_j [log pi(y'_j | x_j) - log pi_ref(y'_j | x_j)])

an estimate of KL(pi || pi_ref) from *mismatched* pairs (prompt j with the completion of
another example, TRL: the completions shifted by one within the batch); z0 carries no
gradient. With ``r = log pi(y|x) - log pi_ref(y|x)``:

    desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))

and the batch loss is the mean over all examples of both sets (TRL: ``nanmean`` of the
concatenation). The implied rewards are ``beta * r``. Under data parallelism TRL averages the
per-rank KL means; `kto_reference_point` takes the tensors of whatever set the caller chose
(one rank's, or all ranks' gathered), so that choice stays in the training loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import PreferenceTerms, check_beta, check_logps

__all__ = ["kto_mean_reference_point", "kto_reference_point", "kto_terms"]


def kto_reference_point(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """z0 = max(0, mean(kl_policy_logps - kl_ref_logps)), detached, as a 0-dim tensor.

    Args:
        kl_policy_logps, kl_ref_logps: (K,) summed log-probs of mismatched (prompt,
            completion) pairs under the policy and the reference model.
    """
    check_logps(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)
    if kl_policy_logps.shape != kl_ref_logps.shape or kl_policy_logps.numel() == 0:
        raise ValueError(f"KL log-probs must be two non-empty tensors of one shape, got "
                         f"{tuple(kl_policy_logps.shape)} and {tuple(kl_ref_logps.shape)}")
    return (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto_mean_reference_point(rank_means: Tensor) -> Tensor:
    """z0 under data parallelism as TRL computes it: each rank's mean KL log-ratio
    (`kto_reference_point` before its clamp), gathered, averaged, then clamped at 0; detached,
    0-dim. One rank: ``kto_reference_point`` of that rank's tensors."""
    if rank_means.dim() != 1 or rank_means.numel() == 0:
        raise ValueError(f"rank_means must be a non-empty 1-D tensor, got {tuple(rank_means.shape)}")
    return rank_means.detach().mean().clamp(min=0)


def kto_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    reference_point: Tensor,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceTerms:
    """Per-example KTO losses of a desirable and an undesirable set (either may be empty).

    ``losses`` is the concatenation ``[lambda_D * desirable..., lambda_U * undesirable...]``,
    so ``.loss`` (their mean) equals TRL's ``losses.nanmean()``. With policy == reference and
    ``z0 = 0`` every loss is ``1 - sigmoid(0) = 0.5`` (times its weight).

    Args:
        policy_chosen_logps, ref_chosen_logps: (Nc,) the desirable examples.
        policy_rejected_logps, ref_rejected_logps: (Nr,) the undesirable examples.
        beta: > 0.
        reference_point: z0 from `kto_reference_point` (0-dim, no gradient).
        desirable_weight, undesirable_weight: lambda_D, lambda_U > 0 (KTO Eq. 8 balances them
            when the sets differ in size).
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    check_logps(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                ref_rejected_logps=rr)
    check_beta(beta)
    for side, pol, ref in (("chosen", pc, rc), ("rejected", pr, rr)):
        if pol.shape != ref.shape:
            raise ValueError(f"policy_{side}_logps and ref_{side}_logps must have the same "
                             f"shape, got {tuple(pol.shape)} and {tuple(ref.shape)}")
    if pc.numel() + pr.numel() == 0:
        raise ValueError("both the desirable and the undesirable set are empty")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(f"desirable_weight and undesirable_weight must be > 0, got "
                         f"{desirable_weight!r} and {undesirable_weight!r}")
    if not isinstance(reference_point, Tensor) or reference_point.dim() != 0:
        raise ValueError("reference_point must be a 0-dim tensor (see kto_reference_point)")
    z0 = reference_point.detach().to(pc.dtype)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    losses = torch.cat([
        desirable_weight * (1 - torch.sigmoid(beta * (chosen_logratios - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rejected_logratios))),
    ])
    return PreferenceTerms(losses, beta * chosen_logratios.detach(),
                           beta * rejected_logratios.detach())
