"""Unit tests for rayalign.losses and rayalign.aot: hand-computed values, TRL parity,
gradients, validation.

Everything runs in float64 so that agreement is checked to 1e-12, far tighter than any
difference a wrong formula would make.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayalign.aot import AOT_LOSSES, aot_loss, aot_terms
from rayalign.losses import (
    PreferenceTerms,
    distinct_pair_wins,
    dpo_loss,
    dpo_terms,
    ipo_loss,
    ipo_terms,
    sft_loss,
)

F64 = torch.float64
LN2 = 0.6931471805599453
TOL = dict(rtol=1e-12, atol=1e-12)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def random_logps(*sizes: int, seed: int = 0) -> list[torch.Tensor]:
    """Distinct, LLM-like summed log-probs (around -20, spread of several nats)."""
    g = torch.Generator().manual_seed(seed)
    return [-20.0 + 4.0 * torch.randn(n, dtype=F64, generator=g) for n in sizes]


# --- TRL reference lines --------------------------------------------------------------
# Reimplemented from huggingface/trl, trl/trainer/dpo_trainer.py, DPOTrainer.dpo_loss
# (loss_type "sigmoid", "ipo", "aot", "aot_pair") and DPOTrainer.concatenated_forward
# (IPO's `all_logps / loss_mask.sum(-1)`). Only those few lines, nothing else.


def trl_sigmoid(pc, pr, rc, rr, beta, label_smoothing):
    logits = (pc - pr) - (rc - rr)
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )


def trl_aot_delta(pc, pr, rc, rr, paired):
    if paired:  # loss_type == "aot"
        logratios_sorted, _ = torch.sort(pc - pr, dim=0)
        ref_logratios_sorted, _ = torch.sort(rc - rr, dim=0)
        return logratios_sorted - ref_logratios_sorted
    # loss_type == "aot_pair"
    chosen_logratios_sorted, _ = torch.sort(pc - rc, dim=0)
    rejected_logratios_sorted, _ = torch.sort(pr - rr, dim=0)
    return chosen_logratios_sorted - rejected_logratios_sorted


def trl_aot(pc, pr, rc, rr, beta, paired, loss, label_smoothing):
    delta = trl_aot_delta(pc, pr, rc, rr, paired)
    if loss == "logistic":  # TRL's only AOT loss
        losses = (
            -F.logsigmoid(beta * delta) * (1 - label_smoothing)
            - F.logsigmoid(-beta * delta) * label_smoothing
        )
    elif loss == "hinge":  # AOT paper's alternatives, on TRL's delta
        losses = torch.relu(1 - beta * delta)
    else:
        losses = (1 - beta * delta) ** 2
    return losses.mean()


def trl_ipo(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths):
    pc, rc = pc / chosen_lengths, rc / chosen_lengths
    pr, rr = pr / rejected_lengths, rr / rejected_lengths
    logits = (pc - pr) - (rc - rr)
    return ((logits - 1 / (2 * beta)) ** 2).mean()


# --- SFT ------------------------------------------------------------------------------


def test_sft_is_token_level_mean():
    """logps (-3, -6) over (1, 5) tokens: 9 / 6 = 1.5.

    A mean of per-sequence means would give (3 + 1.2) / 2 = 2.1.
    """
    torch.testing.assert_close(sft_loss(t(-3, -6), torch.tensor([1, 5])), t(1.5)[0], **TOL)


# --- DPO ------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.4])
def test_dpo_is_ln2_when_policy_equals_reference(label_smoothing):
    """h = 0, so loss = -(1-eps) logsig(0) - eps logsig(0) = ln 2 for every eps."""
    pc, pr = random_logps(5, 5)
    loss = dpo_loss(pc, pr, pc, pr, beta=0.1, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, t(LN2)[0], **TOL)


def test_dpo_hand_computed():
    """beta = 0.5, two pairs.

    pair 1: pc=-1, pr=-3, rc=-2, rr=-2: h = (-1+2) - (-3+2) = 2, beta*h = 1,
            loss = -logsig(1) = log(1 + e^-1) = 0.31326168751822286
    pair 2: pc=-2, pr=-1, rc=-2, rr=-2: h = 0 - 1 = -1, beta*h = -0.5,
            loss = log(1 + e^0.5) = 0.9740769841801067
    mean = 0.6436693358491647
    rewards: chosen = 0.5 * (1, 0) = (0.5, 0), rejected = 0.5 * (-1, 1) = (-0.5, 0.5)
    """
    args = t(-1, -2), t(-3, -1), t(-2, -2), t(-2, -2)
    terms = dpo_terms(*args, beta=0.5)
    torch.testing.assert_close(terms.losses, t(0.31326168751822286, 0.9740769841801067), **TOL)
    torch.testing.assert_close(terms.loss, t(0.6436693358491647)[0], **TOL)
    torch.testing.assert_close(dpo_loss(*args, beta=0.5), terms.loss, **TOL)
    torch.testing.assert_close(terms.chosen_rewards, t(0.5, 0.0), **TOL)
    torch.testing.assert_close(terms.rejected_rewards, t(-0.5, 0.5), **TOL)


def test_dpo_label_smoothing_hand_computed():
    """beta*h = 1, eps = 0.1: 0.9 log(1+e^-1) + 0.1 log(1+e^1).

    log(1+e^1) = 1 + log(1+e^-1), so loss = log(1+e^-1) + 0.1 = 0.4132616875182229.
    """
    loss = dpo_loss(t(-1), t(-3), t(-2), t(-2), beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(loss, t(0.4132616875182229)[0], **TOL)


def test_weighted_dpo_is_mean_of_weighted_plain_losses():
    """LD-Align Eq. 4: loss = mean_i w_i * softplus(-beta h_i) (softplus, not logsigmoid)."""
    pc, pr, rc, rr = random_logps(7, 7, 7, 7)
    w = torch.rand(7, dtype=F64, generator=torch.Generator().manual_seed(3)) * 2
    beta = 0.3
    h = (pc - rc) - (pr - rr)
    expected = sum(w[i] * math.log1p(math.exp(-beta * h[i].item())) for i in range(7)) / 7
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta, weights=w), expected, **TOL)
    plain = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=beta, weights=torch.ones(7)), plain)


def test_zero_weight_removes_pair_from_gradient():
    pc, pr, rc, rr = random_logps(3, 3, 3, 3)
    pc.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta=0.1, weights=t(1, 0, 2)).backward()
    assert pc.grad[1] == 0 and pc.grad[0] != 0 and pc.grad[2] != 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_matches_trl(label_smoothing):
    pc, pr, rc, rr = random_logps(16, 16, 16, 16, seed=1)
    expected = trl_sigmoid(pc, pr, rc, rr, 0.1, label_smoothing).mean()
    actual = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=label_smoothing)
    torch.testing.assert_close(actual, expected, **TOL)


def test_rewards_are_detached():
    pc, pr, rc, rr = (x.requires_grad_(True) for x in random_logps(4, 4, 4, 4))
    for terms in (
        dpo_terms(pc, pr, rc, rr, beta=0.1),
        aot_terms(pc, pr, rc, rr, beta=0.1),
        ipo_terms(
            pc, pr, rc, rr, beta=0.1, chosen_lengths=t(1, 2, 3, 4), rejected_lengths=t(5, 6, 7, 8)
        ),
    ):
        assert terms.losses.requires_grad
        assert not terms.chosen_rewards.requires_grad and not terms.rejected_rewards.requires_grad


# --- AOT ------------------------------------------------------------------------------

# pc-pr = (3, -1), rc-rr = (0, 1); pc-rc = (1, -1), pr-rr = (-2, 1)
HAND = t(-1, -4), t(-4, -3), t(-2, -3), t(-2, -4)


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        ("squared", 2.5),
        ("hinge", 1.0),
        ("logistic", (math.log1p(math.e) + math.log1p(math.exp(-2))) / 2),
    ],
)
def test_aot_paired_hand_computed(loss, expected):
    """beta = 1. sort(pc-pr) = (-1, 3), sort(rc-rr) = (0, 1), delta = (-1, 2).

    squared:  ((1+1)^2 + (1-2)^2) / 2 = (4 + 1) / 2 = 2.5
    hinge:    (relu(2) + relu(-1)) / 2 = 1
    logistic: (log(1+e^1) + log(1+e^-2)) / 2
    Without sorting delta would be (3, -2) and squared would give (4 + 9) / 2 = 6.5.
    """
    torch.testing.assert_close(aot_loss(*HAND, beta=1.0, loss=loss), t(expected)[0], **TOL)


@pytest.mark.parametrize(
    ("loss", "expected"), [("squared", 0.5), ("hinge", 0.5), ("logistic", 0.5032044340390841)]
)
def test_aot_unpaired_hand_computed(loss, expected):
    """beta = 1. sort(pc-rc) = (-1, 1), sort(pr-rr) = (-2, 1), delta = (1, 0).

    squared:  (0 + 1) / 2 = 0.5;  hinge: (0 + 1) / 2 = 0.5
    logistic: (log(1+e^-1) + ln 2) / 2 = 0.5032044340390841
    """
    actual = aot_loss(*HAND, beta=1.0, paired=False, loss=loss)
    torch.testing.assert_close(actual, t(expected)[0], **TOL)


@pytest.mark.parametrize("paired", [True, False])
def test_aot_is_ln2_when_policy_equals_reference(paired):
    pc, pr = random_logps(9, 9)
    loss = aot_loss(pc, pr, pc, pr, beta=0.1, paired=paired)
    torch.testing.assert_close(loss, t(LN2)[0], **TOL)


AOT_CASES = [
    ("logistic", 0.0),
    ("logistic", 0.1),
    ("logistic", 0.35),
    ("hinge", 0.0),
    ("squared", 0.0),
]


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize(("loss", "label_smoothing"), AOT_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aot_matches_trl(paired, loss, label_smoothing, seed):
    pc, pr, rc, rr = random_logps(32, 32, 32, 32, seed=seed)
    beta = 0.05  # keeps beta*delta around 1, where hinge/squared are not trivially flat
    expected = trl_aot(pc, pr, rc, rr, beta, paired, loss, label_smoothing)
    actual = aot_loss(
        pc, pr, rc, rr, beta=beta, paired=paired, loss=loss, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(actual, expected, **TOL)


def test_aot_is_not_dpo_and_depends_on_sorting():
    """On random data AOT differs from DPO, which pairs the unsorted values."""
    pc, pr, rc, rr = random_logps(32, 32, 32, 32, seed=5)
    assert abs(aot_loss(pc, pr, rc, rr, beta=0.1) - dpo_loss(pc, pr, rc, rr, beta=0.1)) > 1e-3


def test_aot_invariances():
    """Paired: invariant to permuting pairs. Unpaired: to permuting each side on its own."""
    pc, pr, rc, rr = random_logps(12, 12, 12, 12, seed=6)
    g = torch.Generator().manual_seed(0)
    p, q = torch.randperm(12, generator=g), torch.randperm(12, generator=g)
    base = aot_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(aot_loss(pc[p], pr[p], rc[p], rr[p], beta=0.1), base, **TOL)
    base = aot_loss(pc, pr, rc, rr, beta=0.1, paired=False)
    shuffled = aot_loss(pc[p], pr[q], rc[p], rr[q], beta=0.1, paired=False)
    torch.testing.assert_close(shuffled, base, **TOL)


def test_aot_unpaired_unequal_sizes_hand_computed():
    """beta = 1, squared. Chosen log-ratios (0, 2), rejected (-1, 0, 1): N=2, M=3.

    Quantile steps at 1/2 and 1/3, 2/3 split [0, 1) into
    [0, 1/3): 0-(-1) = 1 -> 0;  [1/3, 1/2): 0-0 = 0 -> 1;
    [1/2, 2/3): 2-0 = 2 -> 1;   [2/3, 1): 2-1 = 1 -> 0.
    loss = 0*1/3 + 1*1/6 + 1*1/6 + 0*1/3 = 1/3
    """
    zeros2, zeros3 = torch.zeros(2, dtype=F64), torch.zeros(3, dtype=F64)
    terms = aot_terms(
        t(2, 0), t(1, -1, 0), zeros2, zeros3, beta=1.0, paired=False, loss="squared"
    )
    torch.testing.assert_close(terms.losses, t(0, 1, 1, 0), **TOL)
    torch.testing.assert_close(terms.mass, t(1 / 3, 1 / 6, 1 / 6, 1 / 3), **TOL)
    torch.testing.assert_close(terms.loss, t(1 / 3)[0], **TOL)


@pytest.mark.parametrize(("n", "m"), [(4, 6), (5, 3), (7, 7), (1, 4)])
@pytest.mark.parametrize(("loss", "label_smoothing"), AOT_CASES)
def test_aot_unpaired_unequal_sizes_is_mean_over_lcm_quantiles(n, m, loss, label_smoothing):
    """Repeat each sorted chosen value lcm/N times and each rejected one lcm/M times."""
    pc, rc, pr, rr = random_logps(n, n, m, m, seed=n * 10 + m)
    grid = math.lcm(n, m)
    chosen = torch.sort(pc - rc).values.repeat_interleave(grid // n)
    rejected = torch.sort(pr - rr).values.repeat_interleave(grid // m)
    zeros = torch.zeros(grid, dtype=F64)
    expected = trl_aot(chosen, rejected, zeros, zeros, 0.05, False, loss, label_smoothing)
    actual = aot_loss(
        pc, pr, rc, rr, beta=0.05, paired=False, loss=loss, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(actual, expected, **TOL)


def test_aot_rewards_are_local_per_example():
    pc, pr, rc, rr = random_logps(3, 5, 3, 5)
    terms = aot_terms(pc, pr, rc, rr, beta=0.2, paired=False)
    torch.testing.assert_close(terms.chosen_rewards, 0.2 * (pc - rc), **TOL)
    torch.testing.assert_close(terms.rejected_rewards, 0.2 * (pr - rr), **TOL)


# --- IPO ------------------------------------------------------------------------------


def test_ipo_hand_computed():
    """beta = 0.5, target 1/(2 beta) = 1.

    chosen:   (pc - rc) / Lc = (-6 + 8) / 4 = 0.5
    rejected: (pr - rr) / Lr = (-9 + 6) / 3 = -1
    h = 0.5 + 1 = 1.5, loss = (1.5 - 1)^2 = 0.25 (unnormalized h = 5 would give 16)
    rewards: 0.5 * 0.5 = 0.25 and 0.5 * -1 = -0.5
    """
    lc, lr = t(4), torch.tensor([3])
    terms = ipo_terms(t(-6), t(-9), t(-8), t(-6), beta=0.5, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(terms.loss, t(0.25)[0], **TOL)
    torch.testing.assert_close(terms.chosen_rewards, t(0.25), **TOL)
    torch.testing.assert_close(terms.rejected_rewards, t(-0.5), **TOL)


def test_ipo_matches_trl():
    pc, pr, rc, rr = random_logps(16, 16, 16, 16, seed=4)
    g = torch.Generator().manual_seed(4)
    lc, lr = torch.randint(1, 50, (16,), generator=g), torch.randint(1, 50, (16,), generator=g)
    expected = trl_ipo(pc, pr, rc, rr, 0.1, lc, lr)
    actual = ipo_loss(pc, pr, rc, rr, beta=0.1, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(actual, expected, **TOL)


def test_ipo_requires_lengths():
    pc, pr, rc, rr = random_logps(2, 2, 2, 2)
    with pytest.raises(TypeError, match="chosen_lengths"):
        ipo_loss(pc, pr, rc, rr, beta=0.1)  # type: ignore[call-arg]


# --- gradients ------------------------------------------------------------------------


def _leaves(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.detach().clone().requires_grad_(True) for x in tensors)


def test_sft_gradient():
    logps = _leaves(*random_logps(5))
    assert torch.autograd.gradcheck(lambda x: sft_loss(x, torch.tensor([3, 1, 4, 1, 5])), logps)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_gradient(label_smoothing):
    inputs = _leaves(*random_logps(6, 6, 6, 6, seed=7))
    w = t(0.5, 1, 1.5, 0, 2, 1)
    assert torch.autograd.gradcheck(
        lambda *x: dpo_loss(*x, beta=0.1, weights=w, label_smoothing=label_smoothing), inputs
    )


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize(("loss", "label_smoothing"), AOT_CASES)
def test_aot_gradient(paired, loss, label_smoothing):
    inputs = _leaves(*random_logps(8, 8, 8, 8, seed=8))
    assert torch.autograd.gradcheck(
        lambda *x: aot_loss(
            *x, beta=0.05, paired=paired, loss=loss, label_smoothing=label_smoothing
        ),
        inputs,
    )


def test_aot_unpaired_unequal_sizes_gradient():
    pc, rc, pr, rr = random_logps(4, 4, 6, 6, seed=9)
    inputs = _leaves(pc, pr, rc, rr)
    assert torch.autograd.gradcheck(lambda *x: aot_loss(*x, beta=0.05, paired=False), inputs)


def test_ipo_gradient():
    inputs = _leaves(*random_logps(5, 5, 5, 5, seed=10))
    lc, lr = t(3, 7, 1, 12, 5), t(2, 9, 4, 4, 8)
    assert torch.autograd.gradcheck(
        lambda *x: ipo_loss(*x, beta=0.1, chosen_lengths=lc, rejected_lengths=lr), inputs
    )


# --- validation -----------------------------------------------------------------------

FOUR = random_logps(3, 3, 3, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(beta=0.1, weights=torch.ones(4)), "weights must be a tensor of shape"),
        (dict(beta=0.1, weights=torch.ones(3, 1)), "weights must be a tensor of shape"),
        (dict(beta=0.1, weights=t(1, float("nan"), 1)), "finite"),
        (dict(beta=0.1, weights=t(1, float("inf"), 1)), "finite"),
        (dict(beta=0.1, weights=t(1, -0.5, 1)), ">= 0"),
        (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
        (dict(beta=0.1, label_smoothing=-0.1), "label_smoothing"),
    ],
)
def test_dpo_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*FOUR, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=0.1, loss="sigmoid"), "loss must be one of"),
        (dict(beta=0.1, loss="hinge", label_smoothing=0.1), "logistic loss only"),
        (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
        (dict(beta=0.1, group=object()), "not initialized"),
    ],
)
def test_aot_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        aot_loss(*FOUR, **kwargs)


def test_shape_validation():
    pc, pr, rc, rr = FOUR
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(pc, pr[:2], rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        aot_loss(pc, pr[:2], rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="policy_rejected_logps and ref_rejected_logps"):
        aot_loss(pc, pr[:2], rc, rr, beta=0.1, paired=False)
    with pytest.raises(ValueError, match="1-D floating-point"):
        dpo_loss(pc[:, None], pr[:, None], rc[:, None], rr[:, None], beta=0.1)
    with pytest.raises(ValueError, match="1-D floating-point"):
        dpo_loss(pc.long(), pr, rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="empty"):
        aot_loss(pc[:0], pr[:0], rc[:0], rr[:0], beta=0.1)


def test_ipo_and_sft_validation():
    with pytest.raises(ValueError, match="chosen_lengths must be positive"):
        ipo_loss(*FOUR, beta=0.1, chosen_lengths=t(1, 0, 2), rejected_lengths=t(1, 1, 1))
    with pytest.raises(ValueError, match="rejected_lengths must be a tensor of shape"):
        ipo_loss(*FOUR, beta=0.1, chosen_lengths=t(1, 1, 1), rejected_lengths=t(1, 1))
    with pytest.raises(ValueError, match="positive count"):
        sft_loss(t(0, 0), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="num_tokens must have shape"):
        sft_loss(t(-1, -2), torch.tensor([1, 2, 3]))


def test_public_surface():
    assert set(AOT_LOSSES) == {"logistic", "hinge", "squared"}
    terms = PreferenceTerms(t(1, 3), t(0, 0), t(0, 0))
    torch.testing.assert_close(terms.loss, t(2)[0], **TOL)


def test_distinct_pair_wins_leaves_identical_pairs_out():
    """Rewards chosen [1, 0, 2, 0.5] vs rejected [0, 0, 3, 0.5 + 1e-7]: pairs 1 and 3 are
    identical (their margins 0 and -1e-7 are float noise, not preferences) and are left
    out; of pairs 0 and 2 one wins -> (1 win, 2 distinct), accuracy 1/2, identical share
    1/2 (plain accuracy would say 1/4)."""
    chosen = torch.tensor([1.0, 0.0, 2.0, 0.5])
    rejected = torch.tensor([0.0, 0.0, 3.0, 0.5 + 1e-7])
    identical = torch.tensor([False, True, False, True])
    assert distinct_pair_wins(chosen, rejected, identical) == (1.0, 2.0)
    assert distinct_pair_wins(chosen, rejected, torch.ones(4, dtype=torch.bool)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        distinct_pair_wins(chosen, rejected, identical[:3])
