"""LD-Align's job controller: Algorithm 1 as a list of resumable stages.

    setup            tiny base model + toy data (embedded default only)
    sft              continual SFT on D -> theta_0                    (skipped if sft is null)
    iter_000/samples y' ~ theta_0 for every prompt of D
    guide            T = (phi, psi) trained on D and those samples (Alg. 1 line 4)
    eval/theta_0     greedy samples on held-out prompts: exact match, gold NLL, text and
                     similarity metrics, latent distance (pipelines/evaluate.py)
    for t = 0..T-1:
      iter_t/samples   y' ~ theta_t                                    (t = 0: done above)
      iter_t/pairs     distances, weights s_i / mean s, ref log-probs under theta_t
      iter_t/train     weighted DPO: theta_t -> theta_{t+1} = iter_t/policy
      eval/theta_t+1
    report           summary.md (metric tables, sample texts) + plots (rayalign/report.py)

The controller runs in the job's driver (the entrypoint `ray job submit` starts on the head
node) and holds no math: each stage hands work to Ray Data actor pools (pipelines/) or a
Ray Train job (actors/trainer.py, actors/guide_trainer.py). Progress is the run directory's
manifest (rayalign.rundir): a finished stage is never redone, a restarted job resumes at the
first unfinished one, and outputs appear atomically, so nothing partial is ever read.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from actors.guide_trainer import METRICS_FILE, train_guide
from actors.trainer import TRAIN_METRICS_FILE, run_training
from pipelines.evaluate import evaluate_stage
from pipelines.pairs import pairs_stage, sample_stage
from rayalign import toytask
from rayalign.config import DataConfig
from rayalign.config_ldalign import LDAlignConfig
from rayalign.config_train import TrainConfig
from rayalign.guide_train import informativeness_verdict
from rayalign.io import read_json, remove_stray_temps
from rayalign.report import write_report
from rayalign.rundir import RunDir, StageRecord
from rayalign.tiny import build_tiny_checkpoint

Log = Callable[[str], None]


class GuideNotInformative(RuntimeError):
    """The guide's latent is below `guide.min_informativeness`; raised before any pairs."""


class LDAlignController:
    def __init__(self, cfg: LDAlignConfig, log: Log = print):
        self.cfg, self.log = cfg, log
        # the gate's threshold is not part of the run's identity: changing it resumes the run;
        # nor are where metrics are reported and whether finished checkpoints are kept
        self.run = RunDir(cfg.run_dir, cfg.model_dump(mode="json", exclude={
            "run_dir": True, "iterations": True, "guide": {"min_informativeness"},
            "report_to": True, "keep_checkpoints": True}))
        self.dtype = cfg.policy.dtype if cfg.policy is not None else "auto"
        for stray in remove_stray_temps(self.run.root):  # a killed stage's half-written output
            log(f"removed {stray}, left by an interrupted stage")

    def stage(self, name: str, body: Callable[[], tuple[dict, dict]]) -> StageRecord:
        """Run `body` unless the manifest says `name` is done; `body` returns (outputs, metrics)."""
        if self.run.done(name):
            self.log(f"[{name}] done earlier, skipped")
            return self.run.get(name)
        self.log(f"[{name}] running")
        self.run.start(name)
        start = time.time()
        outputs, metrics = body()
        record = self.run.record(name, outputs, metrics, time.time() - start)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in metrics.items() if isinstance(v, (int, float)))
        self.log(f"[{name}] finished in {record.seconds:.1f}s" + (f": {shown}" if shown else ""))
        return record

    def _data(self, key: str, setup: StageRecord | None) -> DataConfig:
        given = self.cfg.data if key == "train" else self.cfg.eval_data
        return given or DataConfig(path=setup.outputs[key], kind="sft")

    def run_all(self) -> list[dict]:
        """Run (or resume) the whole job; returns one summary row per policy theta_t."""
        cfg, run = self.cfg, self.run
        policy, train_data, eval_data = self.theta0()
        curves = {"sft": policy} if cfg.sft is not None else {}
        sft_baseline = cfg.train.objective == "sft"

        guide = None
        if cfg.weights == "latent" and not sft_baseline:
            samples = self._samples(0, train_data, policy)
            out = run.path("guide")
            record = self.stage("guide", lambda: self._guide(train_data, samples, policy, out))
            self._gate(record.metrics)
            guide = record.outputs["guide"]

        rows = [self._evaluate("theta_0", eval_data, policy, guide, None)]
        for t in range(cfg.iterations):
            it = f"iter_{t:03d}"
            data = train_data if sft_baseline else self._pairs(t, train_data, policy, guide)
            trained = self._training_stage(f"{it}/train", cfg.train, data, policy,
                                           run.path(it, "policy"))
            policy = curves[it] = trained.outputs["policy"]
            rows.append(self._evaluate(f"theta_{t + 1}", eval_data, policy, guide, trained,
                                       baseline=rows[0]["scored"]))

        self.stage("report", lambda: self._report(rows, curves))
        return rows

    def _pairs(self, t: int, train_data: DataConfig, policy: str, guide: str | None) -> DataConfig:
        """Iteration t's training data: y' ~ theta_t, weighted pairs with theta_t's reference
        log-probs (the continual-SFT baseline, `train.objective: sft`, trains on D instead)."""
        it = f"iter_{t:03d}"
        samples = self._samples(t, train_data, policy)
        pairs_path = self.run.path(it, "pairs.parquet")
        pairs = self.stage(f"{it}/pairs", lambda: (
            {"pairs": pairs_path},
            pairs_stage(samples, policy, guide, pairs_path, train_data, self.cfg.pairs,
                        self.dtype)))
        return DataConfig(path=pairs.outputs["pairs"], kind="preference",
                          max_prompt_length=train_data.max_prompt_length,
                          max_length=train_data.max_length)

    def theta0(self) -> tuple[str, DataConfig, DataConfig]:
        """The setup and sft stages: theta_0's path, the training data D and the held-out
        data (jobs/compare.py makes one theta_0 per seed this way and starts every arm from it)."""
        cfg = self.cfg
        setup = self.stage("setup", self._setup) if cfg.policy is None or cfg.data is None else None
        train_data, eval_data = self._data("train", setup), self._data("eval", setup)
        policy = cfg.policy.path if cfg.policy else setup.outputs["base"]
        if cfg.sft is not None:
            out = self.run.path("sft", "policy")
            policy = self._training_stage("sft", cfg.sft, train_data, policy, out).outputs["policy"]
        return str(policy), train_data, eval_data

    def _setup(self) -> tuple[dict, dict]:
        tiny, outputs = self.cfg.tiny, {}
        if self.cfg.data is None:
            lengths = (tiny.min_digits, tiny.max_digits)
            outputs["train"] = toytask.write_jsonl(
                self.run.path("data", "train.jsonl"),
                toytask.make_rows(tiny.train_rows, tiny.seed, *lengths))
            outputs["eval"] = toytask.write_jsonl(
                self.run.path("data", "eval.jsonl"),
                toytask.make_rows(tiny.eval_rows, tiny.seed + 1, *lengths))
        if self.cfg.policy is None:
            outputs["base"] = build_tiny_checkpoint(
                self.run.path("base"), toytask.corpus(), arch=tiny.arch,
                hidden_size=tiny.hidden_size, num_layers=tiny.num_layers, seed=tiny.seed)
        return outputs, {}

    def _guide(self, data: DataConfig, samples: str, policy: str, out: Path) -> tuple[dict, dict]:
        """Train T = (phi, psi) on D and theta_0's samples (prompts rendered by the policy's
        tokenizer); report both latent informativeness figures (rayalign/guide_train.py)."""
        cfg = self.cfg
        path = train_guide(data, samples, cfg.guide.model or policy, out, cfg.guide,
                           cfg.guide_workers, render_model=policy, log=self.log,
                           log_dir=self.run.path("logs", "guide"), report_to=cfg.report_to)
        metrics = read_json(Path(path) / METRICS_FILE)
        across, within = metrics["informativeness"], metrics["within_prompt"]
        return {"guide": path}, {
            "within_prompt_gap": within["gap"], "within_prompt_rows": within["rows"],
            "within_nll_true": within["nll_true"], "within_nll_swapped": within["nll_swapped"],
            "informativeness_gap": across["gap"], "nll_true": across["nll_true"],
            "nll_shuffled": across["nll_shuffled"], "train_loss": metrics["train_loss"],
            "peak_rss_gb": metrics["peak_rss_gb"]}

    def _gate(self, metrics: dict) -> None:
        """Stop before building pairs when the latent cannot tell a prompt's answers apart."""
        verdict = informativeness_verdict(metrics["within_prompt_gap"],
                                          metrics["informativeness_gap"],
                                          self.cfg.guide.min_informativeness)
        if verdict is not None:
            raise GuideNotInformative(verdict)

    def _training_stage(self, stage: str, train: TrainConfig, data: DataConfig, policy: str,
                        out: Path) -> StageRecord:
        """One Ray Train job as stage `stage`. Its DeepSpeed checkpoints live under
        ``.ray_train/<stage>`` (so Ray Train's retries and a restarted job resume within the
        stage) and are deleted once the stage, i.e. its HF export, is recorded, unless
        `keep_checkpoints`; step metrics go to ``logs/<stage>`` (rayalign.tracking)."""
        run_name = stage.replace("/", "-")
        storage = self.run.path(".ray_train", run_name)

        def body() -> tuple[dict, dict]:
            metrics = run_training(train, data, policy, out, storage=storage, name=run_name,
                                   dtype=self.dtype,
                                   log_dir=self.run.path("logs", stage),
                                   report_to=self.cfg.report_to, log=self.log)
            return {"policy": out}, metrics

        record = self.stage(stage, body)
        if not self.cfg.keep_checkpoints and storage.exists():
            shutil.rmtree(storage)
            if not any(storage.parent.iterdir()):
                storage.parent.rmdir()
            self.log(f"[{stage}] DeepSpeed checkpoints deleted, the HF export stays "
                     f"(keep_checkpoints: true keeps them)")
        return record

    def _samples(self, t: int, data: DataConfig, policy: str) -> str:
        path = self.run.path(f"iter_{t:03d}", "samples.parquet")
        return self.stage(f"iter_{t:03d}/samples", lambda: (
            {"samples": path},
            sample_stage(data, policy, path, self._sampling(t), self.cfg.pairs, self.dtype)
        )).outputs["samples"]

    def _sampling(self, t: int):
        """Iteration t samples with seed + t: fresh randomness per iteration, reproducible."""
        return self.cfg.sampling.model_copy(update={"seed": self.cfg.sampling.seed + t})

    def _evaluate(self, name: str, data: DataConfig, policy: str, guide: str | None,
                  train: StageRecord | None, baseline: str | None = None) -> dict:
        """eval/<name>: the policy's held-out metrics (`baseline`: theta_0's scored rows, for
        the reward win rate); returns its summary row (eval_* and, for t >= 1, train_*)."""
        path = self.run.path("eval", f"{name}.parquet")
        record = self.stage(f"eval/{name}", lambda: (
            {"scored": path},
            evaluate_stage(data, policy, guide, path, self.cfg.eval_sampling, self.cfg.pairs,
                           self.cfg.eval, baseline, self.dtype)))
        row = {"policy": name, "scored": record.outputs["scored"],
               **{f"eval_{k}": v for k, v in record.metrics.items() if k != "n"}}
        for key, source in (("loss", "loss"), ("reward_margin", "margin"),
                            ("reward_accuracy", "accuracy"),
                            ("reward_accuracy_distinct", "accuracy_distinct"),
                            ("identical_share", "identical_share")):
            if train and source in train.metrics:
                row[f"train_{key}"] = train.metrics[source]
        return row

    def _report(self, rows: list[dict], curves: dict[str, str]) -> tuple[dict, dict]:
        """summary.md and plots from every theta's scored file and every training stage's
        per-step history (`curves`: stage -> its HF export, which holds the history)."""
        import pyarrow.parquet as pq

        scored = {row["policy"]: pq.read_table(row["scored"]).to_pydict() for row in rows}
        histories = {stage: read_json(Path(policy) / TRAIN_METRICS_FILE)["history"]
                     for stage, policy in curves.items()}
        summary, correlations = write_report(self.run.path("report"), rows, scored, histories,
                                             self.cfg.eval.samples_in_report)
        return {"summary": summary}, correlations
