"""Ray Train driver of `rayalign.train`: a TorchTrainer whose workers each run DeepSpeed.

`run_phases` trains one policy through one or more phases (one objective over one dataset
each; DESIGN.md "Engines") in a single Ray Train job, so the model is loaded once;
`run_training` is its single-phase form (the LD-Align controller and the sft/dpo/aot jobs).

Lifecycle (Ray's shard -> step -> report(checkpoint) pattern):

- driver: load and validate every dataset (`rayalign.data.load_dataset`: a bad row fails here,
  before any cluster time), plan it (`rayalign.train_batches.plan_data`), tokenize it
  once (`rayalign.train_batches.tokenize_rows`), hand it to Ray Data (`from_items`; Ray
  Train splits each dataset into equal per-worker shards). The driver holds the whole dataset in memory
  (fine for preference sets of up to ~1e6 pairs; beyond, tokenize in a Ray Data map stage);
- workers: `rayalign.train.Trainer` on the process group Ray Train set up (gloo on CPU, NCCL
  on GPU), each phase on its shard (`get_dataset_shard(phase name)`), every
  ``checkpoint_every`` steps and after each phase a DeepSpeed checkpoint (all ranks' shards
  merged by Ray into one directory under ``storage``) via ``ray.train.report``;
- after each phase rank 0 writes the Hugging Face export to the phase's ``export_dir``
  (with ``train_metrics.json``: the phase's per-step history and final metrics);
- while a phase with a ``log_dir`` runs, rank 0 writes each step's metrics there
  (`rayalign.tracking.StepLogger`: steps.jsonl, TensorBoard, ``report_to``) and a driver
  thread prints them as progress lines (`progress_printer`);
- failures: ``FailureConfig(max_failures)`` restarts the workers, which resume from the last
  reported checkpoint (weights, optimizer, phase and step; finished phases are skipped). The
  restarted shard is re-read from its start and the consumed micro-batches are skipped:
  exact when Ray Data yields the shard in the same order (not guaranteed across restarts:
  Ray Data streams blocks to workers as they ask).

Run identity: the Ray Train run is named ``<name>-<hash of policy and phases>`` under
``storage``. Ray Train restores a run whose name already has checkpoints in ``storage``, so
calling again with the same arguments after a killed driver resumes from the last checkpoint
(and returns at once if the run had finished), while any other call (a new LD-Align
iteration, other data or settings) starts fresh. The hash covers paths, not file contents.

``export_dir`` and ``storage`` must be reachable from every node: a local path on one
machine, NFS on a cluster (``storage`` may also be a URI Ray Train understands, s3://...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rayalign import toytask
from actors.runtime import init_ray
from rayalign.config import DataConfig
from rayalign.config_train import JOB_FIELDS, TrainConfig, TrainJobConfig
from rayalign.data import load_dataset
from rayalign.io import read_json, remove_stray_temps, write_json
from rayalign.models import load_tokenizer
from rayalign.tiny import build_tiny_checkpoint
from rayalign.tracking import ProgressTail, StepLogger, progress_line, shown
from rayalign.train import Trainer
from rayalign.train_batches import OBJECTIVE_DATA_KIND, DataPlan, plan_data, to_rows, tokenize_rows
from rayalign.train_engine import process_group_backend
from rayalign.train_phase import Phase, PhaseState

_PROGRESS = "progress.json"
TRAIN_METRICS_FILE = "train_metrics.json"


@dataclass(frozen=True)
class PhaseSpec:
    """One phase of a Ray Train job: ``train.objective`` on ``data``, exported to ``export_dir``."""

    name: str
    data: DataConfig
    train: TrainConfig
    export_dir: str
    log_dir: str | None = None  # step metrics (rayalign.tracking) while it runs; None = none
    report_to: tuple[str, ...] = ()  # also to these of rayalign.tracking.BACKENDS


@dataclass(frozen=True)
class TrainResult:
    exports: dict[str, str]  # phase name -> HF export directory
    metrics: dict[str, dict]  # phase name -> metrics of its last step

    @property
    def policy_dir(self) -> str:
        """The export of the last phase: the trained policy."""
        return list(self.exports.values())[-1]


def run_training(train: TrainConfig, data: DataConfig, policy: str | Path, out: str | Path,
                 storage: str | Path, dtype: str = "auto", name: str = "train",
                 log_dir: str | Path | None = None, report_to: Sequence[str] = (),
                 log: Callable[[str], None] | None = None) -> dict:
    """Train ``policy`` on ``data`` with ``train``; HF export to ``out``; final step metrics.

    ``storage`` holds the Ray Train checkpoints (absolute local path, NFS or URI). This is
    the call of the LD-Align controller: ``data`` = the iteration's pairs.parquet with
    weight / ref_chosen_logps / ref_rejected_logps columns, ``train.objective`` weighted_dpo.
    With ``log_dir`` the step metrics go there while it runs and ``log`` prints progress.
    """
    spec = PhaseSpec(name, data, train, str(out),
                     None if log_dir is None else str(Path(log_dir).absolute()), tuple(report_to))
    return run_phases(policy, [spec], storage, dtype=dtype, name=name, log=log).metrics[name]


def run_phases(policy: str | Path, phases: Sequence[PhaseSpec], storage: str | Path,
               dtype: str = "auto", name: str = "train",
               log: Callable[[str], None] | None = None) -> TrainResult:
    """Run ``phases`` in order on one policy in one Ray Train job (see module docstring);
    ``log`` gets a progress line per optimizer step of the phases that have a ``log_dir``."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Workers do not share the driver's working directory: hand them absolute paths.
    policy = str(Path(policy).absolute())
    for spec in phases:
        if "://" in spec.export_dir:
            raise ValueError(f"phase {spec.name!r}: export_dir must be a filesystem path "
                             f"(local or NFS), got {spec.export_dir}")
    phases = [dataclasses.replace(p, export_dir=str(Path(p.export_dir).absolute())) for p in phases]
    if not phases or len({p.name for p in phases}) != len(phases):
        raise ValueError(f"phases must be non-empty with unique names, got {[p.name for p in phases]}")
    first = phases[0].train
    for spec in phases[1:]:
        for key in JOB_FIELDS:
            if getattr(spec.train, key) != getattr(first, key):
                raise ValueError(f"phase {spec.name!r}: train.{key} must equal the first phase's "
                                 f"({getattr(spec.train, key)} vs {getattr(first, key)})")
    tokenizer = load_tokenizer(policy)
    datasets, plans = {}, []
    for spec in phases:
        examples = load_dataset(spec.data, tokenizer)
        try:
            plans.append(plan_data(examples, spec.train, first.num_workers))
        except ValueError as err:
            raise ValueError(f"phase {spec.name!r}, {spec.data.path}: {err}") from None
        rows = tokenize_rows(tokenizer, to_rows(examples), spec.data.kind, spec.data)
        datasets[spec.name] = ray.data.from_items(_dataset_rows(rows, spec.data.kind == "unpaired"))
    storage = str(storage) if "://" in str(storage) else str(Path(storage).absolute())
    identity = json.dumps([str(policy), dtype, [[p.name, p.data.model_dump(), p.train.model_dump(),
                                                  p.export_dir] for p in phases]], sort_keys=True)
    run_name = f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"policy": str(policy), "dtype": dtype,
                           "phases": list(zip(phases, plans))},
        scaling_config=ScalingConfig(num_workers=first.num_workers, use_gpu=first.use_gpu,
                                     resources_per_worker={"CPU": first.cpus_per_worker,
                                                           **first.resources_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=first.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        torch_config=TorchConfig(backend=process_group_backend(first.use_gpu)),
    )
    with progress_printer([(p.name, p.log_dir) for p in phases], log):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = {spec.name: read_json(Path(spec.export_dir) / TRAIN_METRICS_FILE)["final"]
               for spec in phases}
    return TrainResult({spec.name: spec.export_dir for spec in phases}, metrics)


@contextlib.contextmanager
def progress_printer(stages: Sequence[tuple[str, str | None]], log: Callable[[str], None] | None):
    """While the body runs, a thread prints (``log``, ~20 lines a stage: `shown`) the step
    records that rank 0 appends to each (stage name, log_dir)'s ``steps.jsonl``: worker output
    does not reach the driver's console (`actors.runtime.init_ray`)."""
    tails = [(name, ProgressTail(log_dir)) for name, log_dir in stages if log_dir and log]
    done = threading.Event()

    def drain() -> None:
        for stage, tail in tails:
            for record in tail.new_records():
                if shown(record):
                    log(progress_line(stage, record))

    def loop() -> None:
        while not done.wait(2.0):
            drain()

    thread = threading.Thread(target=loop, daemon=True, name="train-progress")
    if tails:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if tails:
            thread.join()
            drain()


_SIDES = ("chosen/", "rejected/")


def _dataset_rows(rows: list[dict], unpaired: bool) -> list[dict]:
    """Rows for Ray Data. Unpaired rows travel as (i-th label-true row, i-th label-false row)
    records, so that every shard of Ray Train's split holds as many of each label (a split of
    plain rows may put all true rows on one worker); `_ShardRows` unpacks them again. The
    surplus of the larger side is dropped (`rayalign.train_batches.plan_data` counts the same)."""
    if not unpaired:
        return rows
    chosen = [r for r in rows if r["label"]]
    rejected = [r for r in rows if not r["label"]]
    return [{side + k: v for side, row in zip(_SIDES, pair) for k, v in row.items()}
            for pair in zip(chosen, rejected)]


class _ShardRows:
    """A Ray Data shard as re-iterable rows: every ``iter`` is a new epoch."""

    def __init__(self, shard, unpaired: bool):
        self.shard, self.unpaired = shard, unpaired

    def __iter__(self) -> Iterator[Mapping]:
        for record in self.shard.iter_rows():
            if not self.unpaired:
                yield record
                continue
            for side in _SIDES:
                yield {k[len(side):]: v for k, v in record.items() if k.startswith(side)}


def _train_worker(config: dict) -> None:
    """Per-worker entrypoint: resume if Ray Train hands a checkpoint, then run the phases."""
    import ray.train

    logging.basicConfig(level=logging.INFO)
    phases: list[tuple[PhaseSpec, DataPlan]] = config["phases"]
    trainer = Trainer(config["policy"], phases[0][0].train, config["dtype"])
    start, state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = read_json(Path(directory) / _PROGRESS)["phase_index"]
            state = trainer.load_state(directory)
    for index in range(start, len(phases)):
        spec, plan = phases[index]
        phase = Phase(spec.name, spec.train, spec.data,
                      _ShardRows(ray.train.get_dataset_shard(spec.name),
                                 spec.data.kind == "unpaired"), plan)
        if state is not None and state.step >= phase.steps:  # finished and exported
            state = None
            continue
        every = spec.train.checkpoint_every
        steps_log = (StepLogger(spec.log_dir, spec.name, spec.report_to, spec.train.model_dump())
                     if spec.log_dir and trainer.rank == 0 else None)

        def on_step(s: PhaseState, metrics: dict, index=index, steps=phase.steps,
                    steps_log=steps_log) -> None:
            if steps_log is not None:
                steps_log.log(s.step, metrics, steps)
            if every and s.step % every == 0 and s.step < steps:
                _report(trainer, index, s, metrics)

        try:
            result = trainer.run_phase(phase, state, on_step)
        finally:
            if steps_log is not None:
                steps_log.close()
        state = None
        final = result.history[-1]
        if trainer.export(spec.export_dir) is not None:
            write_json(Path(spec.export_dir) / TRAIN_METRICS_FILE,
                       {"phase": spec.name, "final": final, "history": result.history})
        _report(trainer, index, result.state, {"phase": spec.name, **final})


def _report(trainer: Trainer, index: int, state: PhaseState, metrics: dict) -> None:
    """Checkpoint every rank's DeepSpeed state and report it with ``metrics``."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        trainer.save_state(directory, state)
        if trainer.rank == 0:
            write_json(os.path.join(directory, _PROGRESS), {"phase_index": index})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def job_main(cfg: TrainJobConfig, objectives: Sequence[str]) -> int:
    """The body of jobs/sft.py, jobs/dpo.py and jobs/aot.py after they parsed and checked
    ``cfg`` (`rayalign.cli.parse_job_config`): rejects an objective the job does not train
    (exit 2, before Ray starts), starts or attaches to Ray, runs `train_job` and prints the
    final metrics and the export path.
    """
    if cfg.train.objective not in objectives:
        print(f"error: this job trains {', '.join(objectives)}; got train.objective="
              f"{cfg.train.objective!r}", file=sys.stderr)
        return 2
    init_ray()
    metrics = train_job(cfg)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"policy: {Path(cfg.output_dir, 'policy').absolute()}")
    return 0


def train_job(cfg: TrainJobConfig) -> dict:
    """The sft/dpo/aot jobs: the tiny default where `policy` / `data` are None, then one phase.

    The trained policy goes to ``<output_dir>/policy``, Ray Train checkpoints to
    ``<output_dir>/ray`` (kept: re-running resumes from them), step metrics to
    ``<output_dir>/logs`` (rayalign.tracking) with a progress line per step; returns the final
    step metrics.
    """
    out = Path(cfg.output_dir)
    if out.exists():
        remove_stray_temps(out)  # a killed run's half-written export or toy data
    policy = cfg.policy.path if cfg.policy is not None else tiny_policy(cfg, out / "base")
    data = cfg.data if cfg.data is not None else toy_data(cfg, out / "data")
    dtype = cfg.policy.dtype if cfg.policy is not None else "auto"
    return run_training(cfg.train, data, policy, out / "policy", out / "ray", dtype=dtype,
                        name=cfg.train.objective, log_dir=out / "logs",
                        log=lambda line: print(line, flush=True))


def tiny_policy(cfg: TrainJobConfig, path: Path) -> str:
    if not (path / "config.json").exists():
        build_tiny_checkpoint(path, toytask.corpus(), arch=cfg.tiny.arch,
                              hidden_size=cfg.tiny.hidden_size, num_layers=cfg.tiny.num_layers,
                              seed=cfg.tiny.seed)
    return str(path)


def toy_data(cfg: TrainJobConfig, directory: Path) -> DataConfig:
    """Toy sorting-task rows of the kind the objective needs: SFT (prompt, gold), preference
    (gold vs a near miss, `toytask.make_preference_rows`) or unpaired (both, labelled)."""
    kind = OBJECTIVE_DATA_KIND[cfg.train.objective]
    pairs = toytask.make_preference_rows(cfg.tiny.train_rows, cfg.tiny.seed)
    rows = {
        "sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs],
        "preference": pairs,
        "unpaired": [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                     for r in pairs for side in ("chosen", "rejected")],
    }[kind]
    path = directory / f"{kind}.jsonl"
    if not path.exists():
        toytask.write_jsonl(path, rows)
    return DataConfig(path=str(path), kind=kind)
