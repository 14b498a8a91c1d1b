"""The comparison runner (jobs/compare.py): arms x seeds of one job, resumable, then the tables.

    <run_dir>/manifest.json          the comparison's own stages: theta0/seed_<s>, <arm>/seed_<s>
    <run_dir>/theta0/seed_<s>/       ld_align with shared_theta0: setup + sft of `base`, once per
                                     seed, the policy and data every arm of that seed starts from
    <run_dir>/<arm>/seed_<s>/        one run directory of the job per arm and seed
    <run_dir>/per_seed.csv           arm, seed, iteration, label, metric, value
    <run_dir>/comparison.md          mean ± std over seeds per arm and iteration, one table per metric
    <run_dir>/plots/metrics.png      each metric by iteration, the seeds' spread shaded
    <run_dir>/plots/tradeoff.png     hbat: held-out IFA NLL vs HPA accuracy per arm

Each arm is the job's own controller, unchanged: the LD-Align controller
(orchestration.ld_align) or the Hbat driver (actors/hbat.py), so every arm's numbers come from
the same evaluation code and every arm resumes the way its job does. A finished arm is recorded
in the comparison's manifest with its result rows and is never run again; a killed comparison
restarted with the same run_dir skips the finished arms and resumes the interrupted one at its
first unfinished stage. Arms run one after another (the driver holds no math and no model).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path

from rayalign import compare as stats_lib
from rayalign.compare import CompareConfig, arm_config, job_tree
from rayalign.config import build_config
from rayalign.io import atomic_file
from rayalign.rundir import RunDir, check_resumable

Log = Callable[[str], None]


def _ld_align_controller(cfg, log: Log):
    from actors.controller import LDAlignController

    return LDAlignController(cfg, log=log)  # refuses a run_dir made by another config


def _run_ld_align(cfg, log: Log) -> list[dict]:
    """One LD-Align arm: the controller's rows, one per theta_t (eval_* and train_*)."""
    rows = _ld_align_controller(cfg, log).run_all()
    return [{k: v for k, v in row.items() if k != "scored"} for row in rows]


def _run_hbat(cfg, log: Log) -> list[dict]:
    """One Hbat arm: the driver's rows, one per phase (held-out IFA NLL and HPA accuracy)."""
    from actors.hbat import run_hbat
    from rayalign.hbat import fingerprint

    check_resumable(cfg.run_dir, fingerprint(cfg))
    log(f"[hbat] variant={cfg.variant} N={cfg.num_splits} run_dir={cfg.run_dir}")
    return run_hbat(cfg)


RUNNERS = {"ld_align": _run_ld_align, "hbat": _run_hbat}


class CompareRunner:
    """Runs (or resumes) every arm and seed of `cfg`, then writes the tables and plots."""

    def __init__(self, cfg: CompareConfig, log: Log = print):
        self.cfg, self.log = cfg, log
        # adding arms or seeds extends a comparison; what every arm shares may not change
        self.run = RunDir(cfg.run_dir, cfg.model_dump(mode="json", include={
            "job", "base", "seed_keys", "shared_theta0"}))

    def arm_dir(self, arm: str, seed: int) -> str:
        return str(self.run.path(arm, f"seed_{seed}"))

    def run_all(self) -> dict:
        """Every (arm, seed) in config order, seed-major (all arms of seed 0 first, so a
        partial comparison already has every arm); returns `stats_lib.aggregate`'s table."""
        results: dict[str, dict[int, list[dict]]] = {arm: {} for arm in self.cfg.arms}
        for seed in self.cfg.seeds:
            shared = self._theta0(seed)
            for arm in self.cfg.arms:
                results[arm][seed] = self._arm(arm, seed, shared)
        return self.write_outputs(results)

    def _theta0(self, seed: int) -> dict:
        """ld_align with shared_theta0 and an `sft` stage: theta_0 of this seed (the
        controller's setup + sft stages of `base`) and the overrides that start an arm from
        it. Empty when every arm makes its own starting policy."""
        cfg = self.cfg
        if cfg.job != "ld_align" or not cfg.shared_theta0:
            return {}
        run_dir = str(self.run.path("theta0", f"seed_{seed}"))
        base = build_config(stats_lib.JOB_CONFIGS["ld_align"],
                            job_tree(cfg, seed, run_dir), "base")
        if base.sft is None:
            return {}
        name = f"theta0/seed_{seed}"
        if not self.run.done(name):
            self.log(f"[compare] {name}: setup + sft of the shared theta_0")
            self.run.start(name)
            start = time.time()
            policy, train, evaluation = _ld_align_controller(base, self.log).theta0()
            self.run.record(name, {}, {"policy": policy, "data": train.model_dump(mode="json"),
                                       "eval_data": evaluation.model_dump(mode="json")},
                            time.time() - start)
        made = self.run.get(name).metrics
        return {"policy": {"path": made["policy"]}, "data": made["data"],
                "eval_data": made["eval_data"], "sft": None}

    def _arm(self, arm: str, seed: int, shared: dict) -> list[dict]:
        name = f"{arm}/seed_{seed}"
        cfg = arm_config(self.cfg, arm, seed, self.arm_dir(arm, seed), shared)
        overrides = dict(self.cfg.arms[arm])
        if self.run.done(name):
            recorded = self.run.get(name).metrics
            if recorded["overrides"] != overrides:
                raise stats_lib.ConfigError(
                    f"arms.{arm} changed since seed {seed} finished ({recorded['overrides']} -> "
                    f"{overrides}); use a new run_dir or a new arm name")
            self.log(f"[compare] {name} done earlier, skipped")
            return recorded["rows"]
        self.log(f"[compare] {name} running ({self.arm_dir(arm, seed)})")
        self.run.start(name)
        start = time.time()
        rows = RUNNERS[self.cfg.job](cfg, self.log)
        record = self.run.record(name, {}, {"overrides": overrides, "rows": rows},
                                 time.time() - start)
        self.log(f"[compare] {name} finished in {record.seconds:.0f}s")
        return rows

    def write_outputs(self, results: dict[str, dict[int, list[dict]]]) -> dict:
        """per_seed.csv, comparison.md and the plots, from every finished arm's rows."""
        from rayalign.plots import plot_comparison, plot_tradeoff

        cfg = self.cfg
        rows = stats_lib.long_rows(results)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["arm", "seed", "iteration", "label", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
        with atomic_file(self.run.path("per_seed.csv")) as tmp:
            tmp.write_text(buffer.getvalue())
        table = stats_lib.aggregate(rows)
        arms = list(cfg.arms)
        metrics = stats_lib.metric_names(table, cfg.metrics)
        plot_comparison(self.run.path("plots", "metrics.png"), table, arms, metrics)
        notes = [f"job: {cfg.job}; arm overrides: " + "; ".join(
            f"{arm}: {overrides or 'base'}" for arm, overrides in cfg.arms.items())]
        if cfg.job == "hbat":
            plot_tradeoff(self.run.path("plots", "tradeoff.png"), table, arms,
                          "eval_ifa_nll", "eval_hpa_acc")
        text = stats_lib.comparison_markdown(f"Comparison: {cfg.job}", table, arms, cfg.seeds,
                                             cfg.metrics, notes)
        with atomic_file(self.run.path("comparison.md")) as tmp:
            tmp.write_text(text)
        return table
