"""rayalign.kto: hand-computed values, TRL's `kto` lines on the same tensors, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayalign.kto import kto_mean_reference_point, kto_reference_point, kto_terms

TOL = dict(rtol=1e-12, atol=1e-12)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- TRL reference lines --------------------------------------------------------------
# Reimplemented from huggingface/trl 1.16, trl/trainer/kto_trainer.py, KTOTrainer._compute_loss
# (loss_type="kto", one process): kl = (KL_logps - ref_KL_logps).mean().clamp(min=0);
# chosen 1 - sigmoid(beta (logratio - kl)), rejected 1 - sigmoid(beta (kl - logratio));
# losses = cat(desirable_weight * chosen, undesirable_weight * rejected); loss = nanmean.
def trl_kto(pc, pr, rc, rr, kl_pol, kl_ref, beta, dw, uw):
    kl = (kl_pol - kl_ref).mean().detach().clamp(min=0)
    chosen_losses = 1 - F.sigmoid(beta * ((pc - rc) - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - (pr - rr)))
    return torch.cat((dw * chosen_losses, uw * rejected_losses), 0).nanmean()


def test_hand_computed_example():
    """beta 0.5, z0 = max(0, mean(-1 - (-3), -2 - (-2))) = mean(2, 0) = 1.
    desirable: r = -1 - (-2) = 1 -> 1 - sig(0.5 * (1 - 1)) = 0.5;
               r = -4 - (-1) = -3 -> 1 - sig(0.5 * (-3 - 1)) = 1 - sig(-2)
    undesirable (weight 2): r = -5 - (-6) = 1 -> 2 * (1 - sig(0.5 * (1 - 1))) = 1.0"""
    z0 = kto_reference_point(t(-1, -2), t(-3, -2))
    assert z0.item() == 1.0
    terms = kto_terms(t(-1, -4), t(-5), t(-2, -1), t(-6), beta=0.5, reference_point=z0,
                      undesirable_weight=2.0)
    torch.testing.assert_close(terms.losses, t(0.5, 1 - sigmoid(-2), 1.0), **TOL)
    torch.testing.assert_close(terms.loss, t((1.5 + 1 - sigmoid(-2)) / 3)[0], **TOL)
    torch.testing.assert_close(terms.chosen_rewards, t(0.5, -1.5), **TOL)
    torch.testing.assert_close(terms.rejected_rewards, t(0.5), **TOL)


def test_reference_point_is_clamped_at_zero_and_detached():
    pol = t(-5, -7).requires_grad_(True)
    z0 = kto_reference_point(pol, t(-1, -1))  # mean log-ratio -5: clamped
    assert z0.item() == 0.0 and not z0.requires_grad


def test_policy_equal_to_reference_gives_one_half():
    x = t(-3, -1, -2)
    terms = kto_terms(x, x[:2], x, x[:2], beta=0.1, reference_point=torch.tensor(0.0))
    torch.testing.assert_close(terms.losses, torch.full((5,), 0.5, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("nc,nr", [(4, 3), (5, 0), (0, 2)])
def test_matches_trl_on_random_inputs(nc, nr):
    g = torch.Generator().manual_seed(nc * 10 + nr)

    def r(n):
        return -10 * torch.rand(n, generator=g, dtype=torch.float64)

    pc, rc, pr, rr, kp, kr = r(nc), r(nc), r(nr), r(nr), r(6), r(6)
    for beta, dw, uw in [(0.1, 1.0, 1.0), (2.0, 1.33, 0.7)]:
        z0 = kto_reference_point(kp, kr)
        got = kto_terms(pc, pr, rc, rr, beta=beta, reference_point=z0, desirable_weight=dw,
                        undesirable_weight=uw).loss
        torch.testing.assert_close(got, trl_kto(pc, pr, rc, rr, kp, kr, beta, dw, uw), **TOL)


def test_gradient_is_the_derivative_of_eq7_and_skips_the_reference_point():
    """d/dr [1 - sig(b (r - z))] = -b sig'(b (r - z)); d/dr [1 - sig(b (z - r))] = +b sig'(...),
    divided by the 3 examples of the mean; nothing flows into the KL log-probs."""
    pc, pr = t(-1, -2).requires_grad_(True), t(-3).requires_grad_(True)
    kl_pol = t(-1.5, -2.5).requires_grad_(True)
    z0 = kto_reference_point(kl_pol, t(-2, -2))  # z0 = 0
    beta = 0.7
    kto_terms(pc, pr, t(-1.5, -1.5), t(-2), beta=beta, reference_point=z0).loss.backward()

    def dsig(x):
        return sigmoid(x) * (1 - sigmoid(x))

    torch.testing.assert_close(pc.grad, t(-beta * dsig(beta * 0.5), -beta * dsig(beta * -0.5)) / 3,
                               **TOL)
    torch.testing.assert_close(pr.grad, t(beta * dsig(beta * 1.0)) / 3, **TOL)
    assert kl_pol.grad is None
    torch.autograd.gradcheck(
        lambda a, b: kto_terms(a, b, t(-1.5, -1.5), t(-2), beta=beta,
                               reference_point=torch.tensor(0.3)).loss,
        (t(-1, -2).requires_grad_(True), t(-3).requires_grad_(True)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta"),
    (dict(desirable_weight=0.0), "desirable_weight"),
    (dict(reference_point=t(0.0, 1.0)), "0-dim"),
])
def test_bad_arguments_are_refused_with_the_name(kwargs, match):
    args = {"beta": 0.1, "reference_point": torch.tensor(0.0), **kwargs}
    with pytest.raises(ValueError, match=match):
        kto_terms(t(-1), t(-2), t(-1), t(-2), **args)


def test_empty_sets_and_shape_mismatch_are_refused():
    e = t()
    with pytest.raises(ValueError, match="both"):
        kto_terms(e, e, e, e, beta=0.1, reference_point=torch.tensor(0.0))
    with pytest.raises(ValueError, match="policy_chosen_logps and ref_chosen_logps"):
        kto_terms(t(-1, -2), t(-2), t(-1), t(-2), beta=0.1, reference_point=torch.tensor(0.0))
    with pytest.raises(ValueError, match="non-empty"):
        kto_reference_point(e, e)


def test_mean_reference_point_averages_rank_means_then_clamps():
    """Ranks' mean log-ratios [0.4, -0.1, 0.3] -> mean 0.2; [-0.5, 0.1] -> -0.2 -> 0;
    one rank equals kto_reference_point of its tensors."""
    assert float(kto_mean_reference_point(torch.tensor([0.4, -0.1, 0.3]))) == pytest.approx(0.2)
    assert float(kto_mean_reference_point(torch.tensor([-0.5, 0.1]))) == 0.0
    pol, ref = torch.tensor([-3.0, -1.0]), torch.tensor([-2.5, -1.1])
    one = kto_mean_reference_point((pol - ref).mean().reshape(1))
    assert float(one) == pytest.approx(float(kto_reference_point(pol, ref)))
    with pytest.raises(ValueError, match="1-D"):
        kto_mean_reference_point(torch.tensor(0.3))
