"""The loss of one micro-batch for each objective of `TrainConfig.objective` (pure): the
policy and reference log-probs of its chosen and rejected sequences into `rayalign.losses`
(sft, dpo, weighted_dpo, ipo), `rayalign.aot` (aot, aot_unpaired) or `rayalign.kto` (kto)."""

from __future__ import annotations

from torch import Tensor

from . import losses
from .config_train import TrainConfig
from .aot import aot_terms
from .kto import kto_terms


def objective_loss(
    objective: str,
    train: TrainConfig,
    policy_logps: Tensor,
    num_tokens: Tensor,
    ref_logps: Tensor | None,
    weights: Tensor | None,
    num_chosen: int,
    reference_point: Tensor | None = None,
) -> tuple[Tensor, losses.PreferenceTerms | None]:
    """The loss of one micro-batch, and the preference terms (rewards) for logging.

    ``policy_logps`` / ``num_tokens`` / ``ref_logps`` hold the chosen sequences first
    (``num_chosen`` of them), then the rejected ones; SFT has no reference and no terms.
    ``reference_point``: KTO's z0 (`rayalign.kto`), computed by the trainer.
    """
    if objective == "sft":
        return losses.sft_loss(policy_logps, num_tokens), None
    pc, pr = policy_logps[:num_chosen], policy_logps[num_chosen:]
    rc, rr = ref_logps[:num_chosen], ref_logps[num_chosen:]
    if objective in ("dpo", "weighted_dpo"):
        terms = losses.dpo_terms(pc, pr, rc, rr, beta=train.beta, weights=weights,
                                 label_smoothing=train.label_smoothing)
    elif objective == "ipo":
        terms = losses.ipo_terms(pc, pr, rc, rr, beta=train.beta,
                                 chosen_lengths=num_tokens[:num_chosen],
                                 rejected_lengths=num_tokens[num_chosen:])
    elif objective in ("aot", "aot_unpaired"):
        terms = aot_terms(pc, pr, rc, rr, beta=train.beta, paired=objective == "aot",
                          loss=train.aot_loss, label_smoothing=train.label_smoothing)
    elif objective == "kto":
        terms = kto_terms(pc, pr, rc, rr, beta=train.beta, reference_point=reference_point,
                          desirable_weight=train.desirable_weight,
                          undesirable_weight=train.undesirable_weight)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return terms.loss, terms
