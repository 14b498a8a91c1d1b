"""Hbat's modified EWC (rayalign/ewc.py): the arithmetic is written out in each docstring."""

import json
import math

import pytest
import torch

from rayalign.ewc import (
    AccumulatedChange,
    ModifiedEWC,
    Snapshot,
    add_penalty_grad_,
    change_from_sums,
    freeze_selection,
    importance,
    importance_stats,
    parameter_change,
    phase_kind,
    sum_sq_diff,
)

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


@pytest.fixture
def two_phases() -> AccumulatedChange:
    """Two SFT phases on tensors a (2 elements) and b (4 elements).

    Phase 1: a moves by [1, 3]       -> C_a = (1 + 9) / 2     = 5
             b moves by [0, 0, 0, 2] -> C_b = 4 / 4           = 1
    Phase 2: a moves by [1, -1]      -> C_a = (1 + 1) / 2     = 1
             b moves by [1, 1, 1, 1] -> C_b = 4 / 4           = 1
    AC^ifa = {a: 5 + 1 = 6, b: 1 + 1 = 2}; AC^hpa stays empty.
    """
    ac = AccumulatedChange()
    theta0 = {"a": t(0, 0), "b": t(1, 1, 1, 1)}
    theta1 = {"a": t(1, 3), "b": t(1, 1, 1, 3)}
    theta2 = {"a": t(2, 2), "b": t(2, 2, 2, 4)}
    c1 = parameter_change(theta0, theta1)
    assert c1 == pytest.approx({"a": 5.0, "b": 1.0}, abs=1e-15)
    ac.add("sft", c1)
    c2 = parameter_change(theta1, theta2)
    assert c2 == pytest.approx({"a": 1.0, "b": 1.0}, abs=1e-15)
    ac.add("ifa", c2)
    return ac


def test_accumulated_change_hand_example(two_phases: AccumulatedChange) -> None:
    """AC^ifa = {a: 6, b: 2} after two phases; "sft" and "ifa" name the same type."""
    assert two_phases.get("ifa") == pytest.approx({"a": 6.0, "b": 2.0}, abs=1e-15)
    assert two_phases.get("sft") == two_phases.get("ifa")
    assert two_phases.num_phases("sft") == 2
    assert two_phases.get("preference") == {}
    assert two_phases.num_phases("hpa") == 0


@pytest.mark.parametrize(
    ("normalize", "scale", "expected_a"),
    [
        # g = AC = [6, 2]: share_a = e^6 / (e^6 + e^2) = 1 / (1 + e^-4) = 0.982014
        ("none", 1.0, 1 / (1 + math.exp(-4))),
        # g = AC / mean = [6, 2] / 4 = [1.5, 0.5]: share_a = 1 / (1 + e^-1) = 0.731059
        ("mean", 1.0, 1 / (1 + math.exp(-1))),
        # g = 2 * [1.5, 0.5] = [3, 1]: share_a = 1 / (1 + e^-2) = 0.880797
        ("mean", 2.0, 1 / (1 + math.exp(-2))),
        # g = 1e20 * [6, 2]: share_a = 1 / (1 + e^-4e20) = 1 exactly in float64
        ("none", 1e20, 1.0),
    ],
)
def test_importance_hand_example(
    two_phases: AccumulatedChange, normalize: str, scale: float, expected_a: float
) -> None:
    """F = F_max * softmax(g(AC)) with F_max = 10 and AC = {a: 6, b: 2}: F_a = 10 * share_a."""
    f = importance(two_phases.get("ifa"), 10.0, scale=scale, normalize=normalize)
    assert f["a"] == pytest.approx(10 * expected_a, rel=1e-12)
    assert f["b"] == pytest.approx(10 * (1 - expected_a), abs=1e-12)
    assert sum(f.values()) == pytest.approx(10.0, rel=1e-12)


def test_literal_values_of_hand_example(two_phases: AccumulatedChange) -> None:
    """Pinned decimals: F_a = 9.82014 (raw), 7.31059 (mean), and the default is mean."""
    ac = two_phases.get("ifa")
    assert importance(ac, 10.0, normalize="none")["a"] == pytest.approx(9.82014, abs=1e-5)
    assert importance(ac, 10.0)["a"] == pytest.approx(7.31059, abs=1e-5)


def test_raw_tiny_changes_give_uniform_importance() -> None:
    """Raw C ~ 1e-8: softmax([6e-8, 2e-8]) = [0.5 + 1e-8, 0.5 - 1e-8], F ~ F_max / 2."""
    f = importance({"a": 6e-8, "b": 2e-8}, 10.0, normalize="none")
    assert f["a"] == pytest.approx(5.0 + 1e-7, abs=1e-12)
    # mean normalization is scale-free: the same as for AC = {6, 2}
    assert importance({"a": 6e-8, "b": 2e-8}, 10.0)["a"] == pytest.approx(
        10 / (1 + math.exp(-1)), rel=1e-12
    )


def test_softmax_stable_with_authors_scale() -> None:
    """AC ~ 1e-8 times 1e20 gives logits ~ 1e12: no overflow/NaN, one-hot on the largest."""
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(50, generator=gen, dtype=F64).tolist()
    ac = {f"t{i}": v * 1e-8 for i, v in enumerate(values)}
    f = importance(ac, 50.0, scale=1e20, normalize="none")
    assert all(math.isfinite(v) for v in f.values())
    top = max(ac, key=ac.get)
    assert f[top] == pytest.approx(50.0, rel=1e-12)
    assert sum(v for n, v in f.items() if n != top) < 1e-12
    assert importance_stats(f).max_share == pytest.approx(1.0, rel=1e-12)


def test_all_zero_change_with_mean_normalization_is_uniform() -> None:
    """mean(AC) = 0 cannot be divided by: every tensor gets F_max / n."""
    f = importance({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}, 8.0)
    assert f == pytest.approx({"a": 2.0, "b": 2.0, "c": 2.0, "d": 2.0}, rel=1e-12)


@pytest.mark.parametrize(
    ("ac", "kwargs"),
    [
        ({}, {}),
        ({"a": -1.0}, {}),
        ({"a": float("nan")}, {}),
        ({"a": 1.0}, {"normalize": "max"}),
        ({"a": 1.0, "b": 2.0}, {"normalize": "none", "scale": 1e308}),
    ],
)
def test_importance_rejects_bad_input(ac: dict, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        importance(ac, 1.0, **kwargs)


@pytest.mark.parametrize("sizes", [(6, 6), (7, 5), (12, 0)])
def test_partitioned_change_equals_whole(sizes: tuple[int, int]) -> None:
    """Two ranks holding flat pieces: C_i = (S_rank0 + S_rank1) / numel equals whole-tensor C."""
    gen = torch.Generator().manual_seed(1)
    before = {
        "w": torch.randn(3, 4, generator=gen, dtype=F64),
        "v": torch.randn(12, generator=gen, dtype=F64),
    }
    after = {
        n: x + 0.01 * torch.randn(x.shape, generator=gen, dtype=F64) for n, x in before.items()
    }
    sums: dict[str, torch.Tensor] = {}
    for name in before:
        pieces_b = before[name].flatten().split(list(sizes))
        pieces_a = after[name].flatten().split(list(sizes))
        sums[name] = sum(sum_sq_diff(pa, pb) for pa, pb in zip(pieces_a, pieces_b))
    numel = {name: x.numel() for name, x in before.items()}
    whole = parameter_change(before, after)
    assert change_from_sums(sums, numel) == pytest.approx(whole, rel=1e-13)


def test_snapshot_change_sums_match_parameter_change() -> None:
    """A snapshot taken at phase start gives the numerator of C at phase end."""
    before = {"a": t(0, 0), "b": t(1, 1, 1, 1)}
    snap = Snapshot.take(before, device="cpu")
    after = {"a": t(1, 3), "b": t(1, 1, 1, 3)}
    sums = snap.change_sums(after)
    assert {n: float(s) for n, s in sums.items()} == {"a": 10.0, "b": 4.0}
    assert change_from_sums(sums, {"a": 2, "b": 4}) == {"a": 5.0, "b": 1.0}


def test_snapshot_is_a_copy() -> None:
    params = {"a": t(1, 2)}
    snap = Snapshot.take(params)
    params["a"].add_(1.0)
    assert torch.equal(snap.tensors["a"], t(1, 2))


def test_penalty_value_by_hand() -> None:
    """lam = 0.5, F = {a: 3, b: 1}; theta - theta* = a: [1, 2], b: [-1]:
    penalty = 0.25 * 3 * (1 + 4) + 0.25 * 1 * 1 = 3.75 + 0.25 = 4.0."""
    ewc = ModifiedEWC(Snapshot.take({"a": t(0, 0), "b": t(2)}), {"a": 3.0, "b": 1.0}, lam=0.5)
    assert float(ewc.value({"a": t(1, 2), "b": t(1)})) == pytest.approx(4.0, abs=1e-15)
    # at the anchor the penalty is 0
    assert float(ewc.value({"a": t(0, 0), "b": t(2)})) == 0.0


def _random_problem(seed: int) -> tuple[dict, dict, dict, float]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"emb": (5, 3), "w": (4,), "ln": (2, 2, 2)}
    params = {n: torch.randn(s, generator=gen, dtype=F64) for n, s in shapes.items()}
    anchor = {n: p + torch.randn(p.shape, generator=gen, dtype=F64) for n, p in params.items()}
    ac = dict(zip(shapes, torch.rand(3, generator=gen, dtype=F64).tolist()))
    f = importance(ac, 7.0)
    return params, anchor, f, 0.37


def test_gradient_term_equals_autograd_of_penalty() -> None:
    """grad += lam * F_i * (theta_i - theta*_i) equals d/dtheta of
    sum_i (lam/2) F_i sum_j (theta_ij - theta*_ij)^2, added on top of an existing gradient."""
    params, anchor, f, lam = _random_problem(2)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    penalty = sum(lam / 2 * f[n] * ((leaves[n] - anchor[n]) ** 2).sum() for n in leaves)
    auto = torch.autograd.grad(penalty, list(leaves.values()))

    gen = torch.Generator().manual_seed(3)
    existing = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in params.items()}
    grads = {n: g.clone() for n, g in existing.items()}
    ewc = ModifiedEWC(Snapshot.take(anchor), f, lam)
    ewc.add_grads_(params, grads)
    for (name, g), a in zip(grads.items(), auto):
        torch.testing.assert_close(g - existing[name], a, rtol=0, atol=1e-12)
    assert float(ewc.value(params)) == pytest.approx(penalty.item(), rel=1e-12)


def test_gradient_term_on_partitions_equals_whole() -> None:
    """Elementwise: adding the term piece by piece (two 'ranks') gives the whole-tensor result."""
    params, anchor, f, lam = _random_problem(4)
    whole = {n: torch.zeros_like(p) for n, p in params.items()}
    ModifiedEWC(Snapshot.take(anchor), f, lam).add_grads_(params, whole)
    for name, p in params.items():
        grad = torch.zeros(p.numel(), dtype=F64)
        split = [p.numel() // 2, p.numel() - p.numel() // 2]
        for g_piece, p_piece, a_piece in zip(
            grad.split(split), p.flatten().split(split), anchor[name].flatten().split(split)
        ):
            add_penalty_grad_(g_piece, p_piece, a_piece, lam * f[name])
        torch.testing.assert_close(grad.view_as(p), whole[name], rtol=0, atol=1e-15)


def test_zero_importance_tensors_are_skipped() -> None:
    """One-hot F: the tensor with F = 0 keeps its gradient untouched."""
    ewc = ModifiedEWC(Snapshot.take({"a": t(0.0), "b": t(0.0)}), {"a": 2.0, "b": 0.0}, lam=1.0)
    grads = {"a": t(1.0), "b": t(1.0)}
    ewc.add_grads_({"a": t(3.0), "b": t(3.0)}, grads)
    assert grads == {"a": t(7.0), "b": t(1.0)}  # 1 + 1 * 2 * (3 - 0) = 7


def test_gradient_term_in_float32_grad_from_float64_anchor() -> None:
    """The term is computed in the gradient's dtype (here float32 grad, float64 anchor)."""
    grad = torch.zeros(3, dtype=torch.float32)
    add_penalty_grad_(grad, torch.tensor([1.0, 2.0, 3.0]), t(0.5, 0.5, 0.5), 2.0)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, torch.tensor([1.0, 3.0, 5.0]))


def test_modified_ewc_rejects_mismatched_names() -> None:
    with pytest.raises(ValueError):
        ModifiedEWC(Snapshot.take({"a": t(0.0)}), {"b": 1.0}, lam=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offloaded_anchor_with_cuda_gradient() -> None:
    """Anchor pinned on the CPU, param and grad on the GPU: same term, no GPU copy kept."""
    params, anchor, f, lam = _random_problem(5)
    cuda = {n: p.cuda() for n, p in params.items()}
    snap = Snapshot.take({n: a.cuda() for n, a in anchor.items()}, device="cpu")
    assert all(x.device.type == "cpu" and x.is_pinned() for x in snap.tensors.values())
    grads = {n: torch.zeros_like(p) for n, p in cuda.items()}
    ewc = ModifiedEWC(snap, f, lam)
    ewc.add_grads_(cuda, grads)
    for name, g in grads.items():
        expected = lam * f[name] * (params[name] - anchor[name])
        torch.testing.assert_close(g.cpu(), expected, rtol=0, atol=1e-12)
    assert all(x.device.type == "cpu" for x in ewc.anchor.tensors.values())
    assert float(ewc.value(cuda)) == pytest.approx(
        sum(lam / 2 * f[n] * float(((params[n] - anchor[n]) ** 2).sum()) for n in params), rel=1e-12
    )


def test_stats_uniform_and_one_hot() -> None:
    """Uniform over n = 8: entropy = log 8, normalized 1, max share 1/8. One-hot: 0, 0, 1."""
    uniform = importance_stats({f"t{i}": 2.0 for i in range(8)})
    assert uniform.entropy == pytest.approx(math.log(8), rel=1e-12)
    assert uniform.normalized_entropy == pytest.approx(1.0, rel=1e-12)
    assert uniform.max_share == pytest.approx(1 / 8, rel=1e-12)
    one_hot = importance_stats({"a": 0.0, "b": 5.0, "c": 0.0})
    assert one_hot.entropy == 0.0
    assert one_hot.normalized_entropy == 0.0
    assert one_hot.max_share == 1.0
    assert one_hot.top[0] == ("b", 1.0)


def test_stats_top_k_order_and_json() -> None:
    """F = {a: 1, b: 4, c: 2, d: 2, e: 1} sums to 10: shares b .4, c .2, d .2 (tie -> by name)."""
    stats = importance_stats({"a": 1.0, "b": 4.0, "c": 2.0, "d": 2.0, "e": 1.0}, top_k=3)
    assert [n for n, _ in stats.top] == ["b", "c", "d"]
    assert [s for _, s in stats.top] == pytest.approx([0.4, 0.2, 0.2], rel=1e-12)
    # H = -(0.4 ln 0.4 + 2 * 0.2 ln 0.2 + 2 * 0.1 ln 0.1)
    h = -(0.4 * math.log(0.4) + 0.4 * math.log(0.2) + 0.2 * math.log(0.1))
    assert stats.entropy == pytest.approx(h, rel=1e-12)
    assert stats.normalized_entropy == pytest.approx(h / math.log(5), rel=1e-12)
    assert json.loads(json.dumps(stats.to_dict()))["max_share"] == pytest.approx(0.4)


def test_freeze_top_20_percent_of_ten() -> None:
    """10 tensors, fraction 0.2: ceil(2.0) = 2 -> the two largest scores, largest first."""
    scores = {f"t{i}": float(i) for i in range(10)}
    assert freeze_selection(scores) == ["t9", "t8"]
    assert freeze_selection(scores, 0.25) == ["t9", "t8", "t7"]  # ceil(2.5) = 3
    assert freeze_selection(scores, 0.01) == ["t9"]  # ceil(0.1) = 1
    assert freeze_selection(scores, 0.0) == []
    # 0.28 * 25 = 7.000000000000001 in float64; the intended 7, not ceil -> 8
    assert len(freeze_selection({f"t{i}": float(i) for i in range(25)}, 0.28)) == 7


def test_freeze_ties_are_deterministic() -> None:
    """All scores equal: ties go by name, whatever the insertion order."""
    names = [f"layer{i}" for i in (3, 0, 9, 1, 5, 2, 8, 4, 7, 6)]
    assert freeze_selection({n: 1.0 for n in names}) == ["layer0", "layer1"]
    assert freeze_selection({n: 1.0 for n in reversed(names)}) == ["layer0", "layer1"]


def test_freeze_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        freeze_selection({"a": 1.0}, 1.5)


def test_state_round_trip(two_phases: AccumulatedChange) -> None:
    """to_dict -> JSON -> from_dict restores AC and phase counts and keeps accumulating."""
    two_phases.add("preference", {"a": 0.5, "b": 0.25})
    restored = AccumulatedChange.from_dict(json.loads(json.dumps(two_phases.to_dict())))
    assert restored == two_phases
    restored.add("hpa", {"a": 0.5, "b": 0.25})
    assert restored.get("hpa") == {"a": 1.0, "b": 0.5}
    assert restored.num_phases("hpa") == 2
    assert two_phases.num_phases("hpa") == 1


def test_accumulated_change_rejects_new_names(two_phases: AccumulatedChange) -> None:
    with pytest.raises(ValueError, match="tensor names differ"):
        two_phases.add("ifa", {"a": 1.0, "c": 1.0})


def test_unknown_phase_type() -> None:
    assert phase_kind("preference") == "hpa"
    with pytest.raises(ValueError, match="unknown phase type"):
        phase_kind("dpo")
