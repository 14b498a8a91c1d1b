"""The comparison runner (jobs/compare.py): arms x seeds of one job, resumable, then the tables.

    <run_dir>/manifest.json          the comparison's own stages: theta0/seed_<s>, <arm>/seed_<s>
    <run_dir>/theta0/seed_<s>/       ld_align with shared_theta0: setup + sft of `base`, once per
                                     seed, the policy and data every arm of that seed starts from
    <run_dir>/<arm>/seed_<s>/        one run directory of the job per arm and seed
    <run_dir>/per_seed.csv           arm, seed, iteration, label, metric, value
    <run_dir>/comparison.md          mean ± std over seeds per arm and iteration, one table per metric
    <run_dir>/plots/metrics.png      each metric by iteration, the seeds' spread shaded
    <run_dir>/plots/tradeoff.png     hbat: held-out IFA NLL vs HPA accuracy per arm
    <run_dir>/plots/quantiles.png    train: quantiles of held-out chosen vs rejected implied
                                     rewards per arm (the AOT paper's Figure 1)

Each arm is the job's own controller, unchanged: the LD-Align controller, the Hbat driver
(orchestration/hbat.py) or the training jobs' `train_job` (actors/trainer.py) followed by
held-out implied rewards, so every arm's numbers come from the same evaluation code and every
arm resumes the way its job does. A finished arm is recorded
in the comparison's manifest with its result rows and is never run again; a killed comparison
restarted with the same run_dir skips the finished arms and resumes the interrupted one at its
first unfinished stage. Arms run one after another, or with `parallel: k` k at a time as
child processes (``jobs/compare.py --arm A --seed S``) attached to the same Ray cluster; the
seeds' shared theta_0 are such tasks too (arm ``theta0``), each seed's arms waiting for its
own. The driver holds no math and no model.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from rayalign import compare as stats_lib
from rayalign import toytask
from rayalign.compare import THETA0, CompareConfig, arm_config, implied_rewards, job_tree
from rayalign.config import DataConfig, ResourcesConfig, build_config
from rayalign.io import atomic_file, read_json, write_json
from rayalign.rundir import RunDir, check_resumable

Log = Callable[[str], None]


def _ld_align_controller(cfg, log: Log):
    from orchestration.controller import LDAlignController

    return LDAlignController(cfg, log=log)  # refuses a run_dir made by another config


def _run_ld_align(cfg, log: Log, compare: CompareConfig) -> list[dict]:
    """One LD-Align arm: the controller's rows, one per theta_t (eval_* and train_*)."""
    rows = _ld_align_controller(cfg, log).run_all()
    return [{k: v for k, v in row.items() if k != "scored"} for row in rows]


def _run_hbat(cfg, log: Log, compare: CompareConfig) -> list[dict]:
    """One Hbat arm: the driver's rows, one per phase (held-out IFA NLL and HPA accuracy)."""
    from orchestration.hbat import run_hbat
    from rayalign.hbat import fingerprint

    check_resumable(cfg.run_dir, fingerprint(cfg))
    log(f"[hbat] variant={cfg.variant} N={cfg.num_splits} run_dir={cfg.run_dir}")
    return run_hbat(cfg)


def _heldout(cfg, compare: CompareConfig) -> DataConfig:
    """The held-out pairs of a train arm: `compare.heldout`, else toy pairs (gold vs a near
    miss) of another seed than the training pairs, written into the arm's directory."""
    if compare.heldout is not None:
        return compare.heldout
    path = Path(cfg.output_dir, "heldout.jsonl")
    if not path.exists():
        toytask.write_jsonl(path, toytask.make_preference_rows(cfg.tiny.eval_rows,
                                                                cfg.tiny.seed + 1000))
    return DataConfig(path=str(path), kind="preference")


def _run_train(cfg, log: Log, compare: CompareConfig) -> list[dict]:
    """One training phase (jobs/sft.py / dpo.py / aot.py's `train_job`: resumes from its
    checkpoints), then reference log-probs of the held-out pairs under theta_0 and under the
    trained policy (pipelines/refs.py) and their implied rewards (`implied_rewards`)."""
    import pyarrow.parquet as pq

    from actors.trainer import train_job
    from pipelines.refs import ref_logps_stage

    out = Path(cfg.output_dir)
    final = read_json(out / "train.json") if (out / "train.json").exists() else None
    if final is None:
        final = train_job(cfg)
        write_json(out / "train.json", final)
    base = cfg.policy.path if cfg.policy is not None else str(out / "base")
    heldout, logps = _heldout(cfg, compare), {}
    for name, model in (("theta_0", base), ("policy", str(out / "policy"))):
        path = out / f"heldout_{name}.parquet"
        if not path.exists():
            ref_logps_stage(heldout, model, str(path), ResourcesConfig(), 16, progress_bars=False)
        logps[name] = pq.read_table(path).to_pydict()
    theta0, policy = logps["theta_0"], logps["policy"]
    stats = implied_rewards(policy["ref_chosen_logps"], policy["ref_rejected_logps"],
                            theta0["ref_chosen_logps"], theta0["ref_rejected_logps"])
    log(f"[{cfg.train.objective}] held-out reward accuracy {stats['heldout_reward_accuracy']:.3f}"
        f", margin {stats['heldout_margin']:.3g}")
    return [{"policy": "theta_1", "train_loss": final.get("loss"), "train_steps": final.get("step"),
             **stats}]


RUNNERS = {"ld_align": _run_ld_align, "hbat": _run_hbat, "train": _run_train}
ROOT = Path(__file__).resolve().parents[1]


class CompareRunner:
    """Runs (or resumes) every arm and seed of `cfg`, then writes the tables and plots."""

    def __init__(self, cfg: CompareConfig, log: Log = print):
        self.cfg, self.log = cfg, log
        # adding arms or seeds extends a comparison; what every arm shares may not change
        self.run = RunDir(cfg.run_dir, cfg.model_dump(mode="json", include={
            "job", "base", "seed_keys", "shared_theta0"}))
        self._theta0_configs: dict[int, object] = {}  # built once per seed (polled every second)

    def arm_dir(self, arm: str, seed: int) -> str:
        return str(self.run.path(arm, f"seed_{seed}"))

    def run_all(self) -> dict:
        """Every (arm, seed) in config order, seed-major (all arms of seed 0 first, so a
        partial comparison already has every arm); returns `stats_lib.aggregate`'s table."""
        results: dict[str, dict[int, list[dict]]] = {arm: {} for arm in self.cfg.arms}
        if self.cfg.parallel > 1:
            self._in_subprocesses(self._unfinished())
        for seed in self.cfg.seeds:
            shared = self._theta0(seed)
            for arm in self.cfg.arms:
                results[arm][seed] = self._arm(arm, seed, shared)
        return self.write_outputs(results)

    def run_one(self, arm: str, seed: int) -> None:
        """One arm and seed, or (arm ``theta0``) one seed's shared theta_0, unrecorded: the
        body of a `parallel` child process (``jobs/compare.py --arm A --seed S``); the parent
        records it when it collects it."""
        if arm == THETA0:
            self._make_theta0(self._theta0_config(seed))
            return
        cfg = arm_config(self.cfg, arm, seed, self.arm_dir(arm, seed), self._theta0(seed))
        RUNNERS[self.cfg.job](cfg, self.log, self.cfg)

    def _unfinished(self) -> list[tuple[str, int]]:
        """The (arm, seed) still to run, seed-major, each seed's shared theta_0 (arm
        ``theta0``) before its arms."""
        todo = []
        for seed in self.cfg.seeds:
            if self._theta0_config(seed) is not None:
                todo.append((THETA0, seed))
            todo += [(arm, seed) for arm in self.cfg.arms]
        return [(arm, seed) for arm, seed in todo if not self.run.done(f"{arm}/seed_{seed}")]

    def _ready(self, arm: str, seed: int) -> bool:
        """An arm can start once its seed's theta_0 is recorded (or there is none to share)."""
        return (arm == THETA0 or self._theta0_config(seed) is None
                or self.run.done(f"{THETA0}/seed_{seed}"))

    def _in_subprocesses(self, todo: list[tuple[str, int]]) -> None:
        """`parallel` tasks at a time (the seeds' theta_0 and the arms), each a child
        ``jobs/compare.py --config <run_dir>/compare.yaml --arm A --seed S`` (`run_one`)
        attached to this driver's Ray cluster, its output in <run_dir>/<arm>/seed_<s>.log; an
        arm waits for its seed's theta_0, so the theta_0 of seed 1 trains beside the arms of
        seed 0. As each child ends, its task is collected in-process (every stage done: no
        work) and recorded. After a failure no new task starts, the running ones finish (they
        use this driver's Ray), then the failures are raised with their logs."""
        import ray

        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        config = self.run.path("compare.yaml")
        with atomic_file(config) as tmp:
            tmp.write_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        running: list[tuple[str, subprocess.Popen, float]] = []
        failed: list[str] = []
        while (todo and not failed) or running:
            ready = [task for task in todo if self._ready(*task)]
            while ready and not failed and len(running) < self.cfg.parallel:
                arm, seed = ready.pop(0)
                todo.remove((arm, seed))
                running.append(self._start_child(config, env, arm, seed))
            time.sleep(1)
            for entry in [e for e in running if e[1].poll() is not None]:
                name, proc, start = entry
                running.remove(entry)
                if proc.returncode != 0:  # the running arms finish (they share this Ray)
                    failed.append(f"{name} (exit {proc.returncode}, log "
                                  f"{self.run.path(name + '.log')})")
                    continue
                self.log(f"[compare] {name} finished in {time.time() - start:.0f}s")
                arm, seed = name.rsplit("/seed_", 1)
                shared = self._theta0(int(seed))  # recorded now: durable
                if arm != THETA0:
                    self._arm(arm, int(seed), shared)
        if failed:
            raise RuntimeError("arms failed, the others were let finish: " + "; ".join(failed))

    def _start_child(self, config: Path, env: dict, arm: str,
                     seed: int) -> tuple[str, subprocess.Popen, float]:
        log = self.run.path(arm, f"seed_{seed}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"[compare] {arm}/seed_{seed} started (log: {log})")
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "compare.py"), "--config",
                                 str(config), "--arm", arm, "--seed", str(seed)], env=env,
                                cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        return f"{arm}/seed_{seed}", proc, time.time()

    def _theta0_config(self, seed: int):
        """The LD-Align config that makes this seed's shared theta_0 (`base`'s setup + sft in
        <run_dir>/theta0/seed_<s>), or None when every arm makes its own starting policy."""
        cfg = self.cfg
        if cfg.job != "ld_align" or not cfg.shared_theta0:
            return None
        if seed not in self._theta0_configs:
            base = build_config(stats_lib.JOB_CONFIGS["ld_align"],
                                job_tree(cfg, seed, str(self.run.path(THETA0, f"seed_{seed}"))),
                                "base")
            self._theta0_configs[seed] = base if base.sft is not None else None
        return self._theta0_configs[seed]

    def _make_theta0(self, base) -> dict:
        """Run (or resume) theta_0's stages; the policy path and the data configs."""
        policy, train, evaluation = _ld_align_controller(base, self.log).theta0()
        return {"policy": policy, "data": train.model_dump(mode="json"),
                "eval_data": evaluation.model_dump(mode="json")}

    def _theta0(self, seed: int) -> dict:
        """This seed's shared theta_0, made and recorded if need be, as the overrides that
        start an arm from it; empty when there is none to share."""
        base = self._theta0_config(seed)
        if base is None:
            return {}
        name = f"{THETA0}/seed_{seed}"
        if not self.run.done(name):
            self.log(f"[compare] {name}: setup + sft of the shared theta_0")
            self.run.start(name)
            start = time.time()
            self.run.record(name, {}, self._make_theta0(base), time.time() - start)
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
        rows = RUNNERS[self.cfg.job](cfg, self.log, self.cfg)
        record = self.run.record(name, {}, {"overrides": overrides, "rows": rows},
                                 time.time() - start)
        self.log(f"[compare] {name} finished in {record.seconds:.0f}s")
        return rows

    def report(self) -> dict:
        """The tables and plots from the arms recorded so far (``jobs/compare.py --report``:
        no Ray, nothing runs), e.g. while a comparison is still running or after it was
        stopped; seeds with at least one recorded arm are shown."""
        results = {arm: {seed: self.run.get(f"{arm}/seed_{seed}").metrics["rows"]
                         for seed in self.cfg.seeds if self.run.done(f"{arm}/seed_{seed}")}
                   for arm in self.cfg.arms}
        return self.write_outputs(results)

    def write_outputs(self, results: dict[str, dict[int, list[dict]]]) -> dict:
        """per_seed.csv, comparison.md and the plots, from every finished arm's rows."""
        from rayalign.plots import plot_comparison, plot_quantiles, plot_tradeoff

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
        metrics = [m for m in stats_lib.metric_names(table, cfg.metrics)
                   if not m.startswith("q")]  # the quantiles are plotted, not tabulated
        plot_comparison(self.run.path("plots", "metrics.png"), table, arms, metrics)
        notes = [f"job: {cfg.job}; arm overrides: " + "; ".join(
            f"{arm}: {overrides or 'base'}" for arm, overrides in cfg.arms.items()),
            "seeds per arm: " + "; ".join(f"{arm}: {sorted(seeds)}"
                                          for arm, seeds in results.items())]
        if cfg.job == "hbat":
            plot_tradeoff(self.run.path("plots", "tradeoff.png"), table, arms,
                          "eval_ifa_nll", "eval_hpa_acc")
        if cfg.job == "train":
            plot_quantiles(self.run.path("plots", "quantiles.png"), table, arms)
        text = stats_lib.comparison_markdown(f"Comparison: {cfg.job}", table, arms, cfg.seeds,
                                             metrics, notes)
        with atomic_file(self.run.path("comparison.md")) as tmp:
            tmp.write_text(text)
        return table
