"""Hbat's schedule and bookkeeping (rayalign/hbat_schedule.py, hbat_data.py, hbat_penalty.py),
without DeepSpeed or Ray."""

import math

import pytest

from rayalign.config import ConfigError, build_config
from rayalign.config_hbat import EWCConfig, HbatConfig
from rayalign.ewc import AccumulatedChange
from rayalign.hbat_schedule import HbatPhase, config_schedule, schedule
from rayalign.hbat_data import rank_shard, split_parts
from rayalign.hbat_penalty import accumulated_from_records, phase_penalty


def _cfg(**kw) -> HbatConfig:
    base = {"policy": {"path": "m"}, "ifa": {"path": "i.jsonl"},
            "hpa": {"path": "h.jsonl", "kind": "preference"}}
    return build_config(HbatConfig, {**base, **kw})


def test_schedule_follows_algorithm_1() -> None:
    """N = 3: SFT 1 (no EWC), pref 1 (F^IFA), then for n = 2, 3: SFT n (F^HPA), pref n (F^IFA)."""
    got = [(p.index, p.round, p.kind, p.penalty, p.importance_from) for p in schedule(3, "ewc")]
    assert got == [
        (0, 1, "ifa", "none", None),
        (1, 1, "hpa", "ewc", "ifa"),
        (2, 2, "ifa", "ewc", "hpa"),
        (3, 2, "hpa", "ewc", "ifa"),
        (4, 3, "ifa", "ewc", "hpa"),
        (5, 3, "hpa", "ewc", "ifa"),
    ]
    assert [p.name for p in schedule(2, "ewc")] == [
        "phase_00_sft1", "phase_01_pref1", "phase_02_sft2", "phase_03_pref2"]


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("hbat", [("ifa", "none"), ("hpa", "ewc"), ("ifa", "ewc"), ("hpa", "ewc")]),
        ("hbat_freeze", [("ifa", "none"), ("hpa", "freeze"), ("ifa", "freeze"), ("hpa", "freeze")]),
        ("no_ewc", [("ifa", "none"), ("hpa", "none"), ("ifa", "none"), ("hpa", "none")]),
        ("no_alternating", [("ifa", "none"), ("hpa", "ewc")]),
        ("sequential", [("ifa", "none"), ("hpa", "none")]),
    ],
)
def test_variants(variant: str, expected: list) -> None:
    """Baselines keep Algorithm 1's order; they change only the penalty and N (default 2 / 1)."""
    phases = config_schedule(_cfg(variant=variant))
    assert [(p.kind, p.penalty) for p in phases] == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variant": "sequential", "num_splits": 3}, "num_splits must be 1"),
        ({"variant": "no_ewc", "ewc": {"mode": "ewc"}}, "implies ewc.mode='none'"),
        ({"preference": {"objective": "sft"}}, "preference.objective"),
        ({"sft": {"objective": "dpo"}}, "sft.objective"),
        ({"preference": {"zero_stage": 3}}, "zero_stage"),
        ({"hpa": {"path": "h.jsonl", "kind": "sft"}}, "hpa.kind"),
        ({"variant": "hbat_freeze", "preference": {"weight_decay": 0.1}}, "weight_decay"),
        ({"sft": {"objective": "sft", "checkpoint_every": 5}}, "checkpoint_every"),
    ],
)
def test_config_rejects_contradictions(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(**overrides)


def test_config_defaults_follow_variant() -> None:
    assert (_cfg().num_splits, _cfg().ewc.mode) == (2, "ewc")
    sequential = _cfg(variant="sequential")
    assert (sequential.num_splits, sequential.ewc.mode) == (1, "none")
    assert _cfg(variant="hbat_freeze", ewc={"lam": 2.0}).ewc == EWCConfig(mode="freeze", lam=2.0)
    assert _cfg(num_splits=5).num_splits == 5


def test_split_parts_is_a_partition() -> None:
    """10 rows into 3 parts: cuts at 0, 10//3 = 3, 20//3 = 6, 10 -> sizes 3, 3, 4."""
    parts = split_parts(list(range(10)), 3)
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert split_parts(list(range(4)), 1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        split_parts([1, 2], 3)


def test_rank_shard_is_equal_and_disjoint() -> None:
    """7 rows on 2 ranks: 7 // 2 = 3 each, rows 0-2 and 3-5; row 6 is dropped (as Ray Train)."""
    assert rank_shard(list(range(7)), 0, 2) == [0, 1, 2]
    assert rank_shard(list(range(7)), 1, 2) == [3, 4, 5]


def test_penalty_uses_the_other_phase_types_accumulated_change() -> None:
    """After SFT 1 (C = {a: 3, b: 1}) and pref 1 (C = {a: 0, b: 2}):

    pref 2 uses AC^IFA = {a: 3, b: 1}, mean 2, g = [1.5, 0.5]: F_a = F_max / (1 + e^-1);
    SFT 2 uses AC^HPA = {a: 0, b: 2}, mean 1, g = [0, 2]: F_b = F_max / (1 + e^-2).
    """
    phases = schedule(2, "ewc")
    ac = accumulated_from_records(phases[:2], [{"a": 3.0, "b": 1.0}, {"a": 0.0, "b": 2.0}])
    ewc = EWCConfig(f_max=10.0)
    sft2 = phase_penalty(phases[2], ac, ewc)
    assert sft2.importance["b"] == pytest.approx(10 / (1 + math.exp(-2)), rel=1e-12)
    pref1 = phase_penalty(phases[1], ac, ewc)  # AC^IFA is the same for pref 1 and pref 2 here
    assert pref1.importance["a"] == pytest.approx(10 / (1 + math.exp(-1)), rel=1e-12)
    assert pref1.stats["max_share"] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)
    assert pref1.stats["top"][0][0] == "a"
    assert phase_penalty(phases[0], ac, ewc) is None  # SFT 1 has no penalty


def test_freeze_selects_top_tensors_of_the_other_type() -> None:
    """AC^IFA = {a: 1, b: 4, c: 2, d: 3, e: 0}: 20% of 5 tensors = 1 frozen, the largest: b."""
    phases = schedule(1, "freeze")
    ac = AccumulatedChange()
    ac.add("ifa", {"a": 1.0, "b": 4.0, "c": 2.0, "d": 3.0, "e": 0.0})
    penalty = phase_penalty(phases[1], ac, EWCConfig(mode="freeze"))
    assert penalty.frozen == ("b",)
    assert penalty.to_log()["frozen"] == ["b"]
    wider = phase_penalty(phases[1], ac, EWCConfig(mode="freeze", freeze_fraction=0.5))
    assert wider.frozen == ("b", "d", "c")  # ceil(2.5) = 3


def test_penalty_without_finished_phase_of_the_other_type_fails() -> None:
    with pytest.raises(ValueError, match="no ifa phase finished"):
        phase_penalty(HbatPhase(1, 1, "hpa", "ewc"), AccumulatedChange(), EWCConfig())


def test_unpaired_rows_alternate_labels_so_every_shard_has_both() -> None:
    """Labels T T T F F -> T F T F (one surplus T dropped); 2 ranks then get [T, F] each."""
    from rayalign.data import UnpairedExample
    from rayalign.hbat_data import interleave_labels

    rows = [UnpairedExample("p", str(i), label) for i, label in
            enumerate([True, True, True, False, False])]
    mixed = interleave_labels(rows)
    assert [(e.completion, e.label) for e in mixed] == [("0", True), ("3", False),
                                                        ("1", True), ("4", False)]
    assert [e.label for e in rank_shard(mixed, 1, 2)] == [True, False]
