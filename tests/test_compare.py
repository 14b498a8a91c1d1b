"""rayalign/compare.py: arm configs and the statistics of a comparison (no Ray)."""

import statistics
from pathlib import Path

import pytest

from rayalign.compare import (
    CompareConfig,
    aggregate,
    arm_config,
    cell,
    comparison_markdown,
    long_rows,
    mean_std,
    metric_table,
)
from rayalign.config import ConfigError, build_config, load_config

ARMS = {"ld_align": {"weights": "latent"}, "spin": {"weights": "uniform"},
        "sft": {"train.objective": "sft", "train.lr": 1e-3}}


def _cfg(**extra) -> CompareConfig:
    return build_config(CompareConfig, {"job": "ld_align", "run_dir": "runs/c", "arms": ARMS,
                                        "base": {"iterations": 3, "train": {"beta": 0.2}},
                                        **extra})


def test_arm_config_is_base_then_arm_then_seed():
    """Arm overrides win over `base`, which wins over the job's defaults; the seed keys and
    the run directory are set last."""
    cfg = _cfg(seed_keys=["tiny.seed", "train.seed"])
    sft = arm_config(cfg, "sft", 7, "runs/c/sft/seed_7")
    assert (sft.train.objective, sft.train.lr, sft.train.beta) == ("sft", 1e-3, 0.2)
    assert sft.train.micro_batch_size == 16  # LD-Align's default train section, not TrainConfig's
    assert (sft.tiny.seed, sft.train.seed, sft.sampling.seed) == (7, 7, 0)
    assert sft.run_dir == "runs/c/sft/seed_7" and sft.iterations == 3
    cfg = _cfg(seed_keys=["sft.seed", "train.seed"])
    spin = arm_config(cfg, "spin", 1, "x", {"sft": None, "policy": {"path": "/p"}})
    assert spin.weights == "uniform" and spin.sft is None and spin.policy.path == "/p"
    assert spin.train.seed == 1  # sft.seed skipped: the section is off


def test_bad_arm_is_named_before_anything_runs():
    with pytest.raises(ConfigError, 
                       match=r"(?s)seed 0: invalid config arms\.bad.*train.objective must be"):
        _cfg(arms={**ARMS, "bad": {"train.objective": "aot"}})
    with pytest.raises(ConfigError, match=r"(?s)arms\.typo.*trian: unknown key"):
        _cfg(arms={"typo": {"trian.lr": 1.0}})
    with pytest.raises(ConfigError, match="arms.theta0: the name is the shared theta_0's"):
        _cfg(arms={**ARMS, "theta0": {}})
    with pytest.raises(ConfigError, match="seeds"):
        _cfg(seeds=[])


def test_shipped_comparison_configs_are_valid():
    paths = sorted(Path("configs/compare").glob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        cfg = load_config(CompareConfig, path)
        sweep = path.stem.endswith("_sweep")
        assert len(cfg.seeds) >= (1 if sweep else 2) and len(cfg.arms) >= 3
        if sweep:  # a sweep varies its comparison's base, unchanged, on a seed it is not judged on
            judged = load_config(CompareConfig, cfg.base_config)
            assert cfg.base == judged.base and not set(cfg.seeds) & set(judged.seeds)


def test_base_config_is_extended_key_by_key(tmp_path):
    """`base` extends the file `base_config` names: a job's config as it is, a comparison's
    config through its own `base` (and its `base_config`); `base` wins per nested key."""
    job = tmp_path / "job.yaml"
    job.write_text("iterations: 2\ntrain: {beta: 0.3, lr: 1.0e-5}\nweights: latent\n")
    mid = tmp_path / "mid.yaml"
    mid.write_text(f"job: ld_align\nbase_config: {job}\nbase: {{train: {{lr: 2.0e-5}}}}\n"
                   "arms: {a: {}}\n")
    cfg = _cfg(base_config=str(mid), base={"iterations": 1})
    assert cfg.base == {"iterations": 1, "train": {"beta": 0.3, "lr": 2e-5}, "weights": "latent"}
    assert arm_config(cfg, "sft", 0, "x").train.lr == 1e-3  # the arm still wins over both
    assert build_config(CompareConfig, cfg.model_dump()).base == cfg.base  # a child re-reads it
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        _cfg(base_config="nowhere.yaml")
    mid.write_text(f"job: ld_align\nbase_config: {mid}\narms: {{a: {{}}}}\n")
    with pytest.raises(ConfigError, match="base_config: .*mid.yaml names itself"):
        _cfg(base_config=str(mid))


def test_mean_std_is_the_sample_std():
    """[1, 2, 4]: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9, / (n - 1) = 7/3."""
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3, abs=1e-15) and std == pytest.approx((7 / 3) ** 0.5)
    assert std == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]), abs=1e-15)
    assert mean_std([5.0]) == (5.0, None)
    with pytest.raises(ValueError):
        mean_std([])


RESULTS = {  # two arms, two seeds, two iterations (as the controllers' rows)
    "a": {0: [{"policy": "theta_0", "eval_em": 0.5, "scored": "x.parquet", "flag": True},
              {"policy": "theta_1", "eval_em": 0.7, "train_loss": 0.6}],
          1: [{"policy": "theta_0", "eval_em": 0.3}, {"policy": "theta_1", "eval_em": 0.5}]},
    "b": {0: [{"policy": "theta_0", "eval_em": 0.5}, {"policy": "theta_1", "eval_em": 0.2}]},
}


def test_long_rows_and_aggregate():
    """Strings and booleans are not metrics; a(theta_1) = mean(0.7, 0.5) = 0.6, sample std
    sqrt(2 * 0.1^2 / 1) = 0.1414; b has one seed: no std."""
    rows = long_rows(RESULTS)
    assert {r["metric"] for r in rows} == {"eval_em", "train_loss"}
    assert rows[0] == {"arm": "a", "seed": 0, "iteration": 0, "label": "theta_0",
                       "metric": "eval_em", "value": 0.5}
    stats = aggregate(rows)
    assert stats[("a", 1, "eval_em")] == {"mean": pytest.approx(0.6), "std": pytest.approx(
        0.02 ** 0.5), "n": 2, "label": "theta_1"}
    assert stats[("a", 1, "train_loss")]["n"] == 1
    assert stats[("b", 1, "eval_em")]["std"] is None
    table = metric_table(stats, "eval_em", ["a", "b"])
    assert table.splitlines() == ["| arm | theta_0 | theta_1 |", "|---|---|---|",
                                  "| a | 0.4 ± 0.14 | 0.6 ± 0.14 |", "| b | 0.5 | 0.2 |"]
    assert cell(None) == "-"
    text = comparison_markdown("T", stats, ["a", "b"], [0, 1], ["eval_em"], ["a note"])
    assert "## eval_em" in text and "## train_loss" not in text and "- a note" in text


def test_implied_rewards_by_hand():
    """Log-ratios chosen [1, 2, 0, 3] - [0, 0, 0, 0] = [1, 2, 0, 3], rejected [0, 3, 0, 1]:
    wins 1>0, 2<3 no, 0=0 tie (not a win), 3>1 -> 2/4; margins [1, -1, 0, 2] -> 0.5; means
    1.5 and 1.0; the median (q50) of [0, 1, 2, 3] is 1.5 (linear), q05 = 0 + 0.15 * 1."""
    from rayalign.compare import QUANTILES, implied_rewards

    out = implied_rewards([1, 2, 0, 3], [1, 4, 1, 2], [0, 0, 0, 0], [1, 1, 1, 1])
    assert out["heldout_reward_accuracy"] == 0.5 and out["heldout_margin"] == 0.5
    assert (out["heldout_chosen_reward"], out["heldout_rejected_reward"]) == (1.5, 1.0)
    assert out["q50_chosen"] == pytest.approx(1.5) and out["q05_chosen"] == pytest.approx(0.15)
    assert len(QUANTILES) == 19 and "q95_rejected" in out
    with pytest.raises(ValueError, match="equally long"):
        implied_rewards([1], [1, 2], [0], [0])


def test_report_tabulates_the_recorded_arms_only(tmp_path):
    """`CompareRunner.report` (jobs/compare.py --report) reads the comparison's manifest, no Ray:
    arm spin has seeds 0 and 1 recorded, ld_align only seed 0, sft nothing yet."""
    from orchestration.compare import CompareRunner

    runner = CompareRunner(_cfg(run_dir=str(tmp_path / "c")), log=lambda line: None)
    for arm, seed, em in (("spin", 0, 0.2), ("spin", 1, 0.4), ("ld_align", 0, 0.5)):
        rows = [{"policy": "theta_0", "eval_exact_match": 0.1},
                {"policy": "theta_1", "eval_exact_match": em}]
        runner.run.record(f"{arm}/seed_{seed}", {}, {"overrides": ARMS[arm], "rows": rows}, 1.0)
    stats = runner.report()
    assert stats[("spin", 1, "eval_exact_match")]["mean"] == pytest.approx(0.3)
    assert stats[("ld_align", 1, "eval_exact_match")]["n"] == 1
    text = (tmp_path / "c" / "comparison.md").read_text()
    assert "| spin | 0.1 ± 0 | 0.3 ± 0.14 |" in text and "| sft | - | - |" in text
    assert "seeds per arm: ld_align: [0]; spin: [0, 1]; sft: []" in text
    assert (tmp_path / "c" / "per_seed.csv").read_text().count("\n") == 1 + 6


def test_an_arm_override_never_leaks_into_base_or_the_next_arm():
    """The train job's `train` section is not among its default sections, so `base.train` is
    merged as it is: building the kto arm must not change `base` (which the comparison's
    fingerprint hashes) nor the arm built after it, which overrides nothing."""
    cfg = build_config(CompareConfig, {
        "job": "train", "run_dir": "r", "seed_keys": ["train.seed"],
        "base": {"train": {"objective": "aot", "lr": 5e-4}},
        "arms": {"kto": {"train.objective": "kto"}, "plain": {}}})
    assert arm_config(cfg, "kto", 3, "r/kto/seed_3").train.objective == "kto"
    assert arm_config(cfg, "plain", 3, "r/plain/seed_3").train.objective == "aot"
    assert cfg.base == {"train": {"objective": "aot", "lr": 5e-4}}
