"""Ray Train driver for the LD-Align guide (the math is rayalign.guide_train).

`train_guide` reads and validates the data in the driver (bad rows fail before any worker
starts; `messages` rows are rendered with the *policy's* tokenizer, the one that rendered the
samples' prompts, so gold and samples of a prompt are one string), runs a `TorchTrainer` whose
workers train T = (phi, psi) with DDP (gloo on CPU, NCCL on GPU), and leaves in `out_dir`,
atomically, the guide checkpoint plus `metrics.json`: per-epoch losses, both latent
informativeness figures on held-out prompts, data sizes, wall time and the worker's peak RSS.

Progress: after every epoch rank 0 writes a resumable checkpoint and one progress line under
``.<out_dir name>.ckpt/`` beside `out_dir`; the driver prints each line (loss, rows/s, ETA) as
it appears. A guide stage killed mid-training resumes after its last finished epoch; the
directory is removed once the guide is saved. With a `log_dir`, rank 0 also writes each epoch's
figures there (`rayalign.tracking.StepLogger`: steps.jsonl, TensorBoard, `report_to`), step =
epoch. Rank 0 hands the final checkpoint to Ray Train
(`ray.train.report`), which persists it under the run's storage path, so workers on other
nodes need no shared local disk for the result; the epoch checkpoints and `out_dir` must be on
storage the driver can reach (a local disk or NFS).
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rayalign.config import DataConfig, ResourcesConfig
from rayalign.config_ldalign import GuideConfig
from rayalign.guide import GuideModel
from rayalign.guide_train import (PROGRESS_FILE, guide_data, informativeness, split_by_prompt,
                                  train_guide_model, within_prompt_informativeness)
from rayalign.io import atomic_dir, write_json
from rayalign.models import load_tokenizer
from rayalign.tracking import StepLogger
from rayalign.train_engine import process_group_backend

METRICS_FILE = "metrics.json"


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg: GuideConfig = config["guide"]
    start = time.time()
    guide = GuideModel.create(cfg, config["base_model"], config["max_prompt_length"],
                              config["max_length"]).to(ray.train.torch.get_device())
    context = ray.train.get_context()
    steps_log = (StepLogger(config["log_dir"], "guide", config["report_to"], cfg.model_dump())
                 if config["log_dir"] and context.get_world_rank() == 0 else None)
    try:
        history = train_guide_model(
            guide, config["train_pairs"], cfg, checkpoint_dir=config["checkpoint_dir"],
            on_epoch=None if steps_log is None else
            lambda e: steps_log.log(e["epoch"] + 1, e, steps=cfg.epochs))
    finally:
        if steps_log is not None:
            steps_log.close()
    metrics = {"epochs": history, "train_loss": history[-1]["loss"]}
    if context.get_world_rank() != 0:
        ray.train.report(metrics)
        return
    metrics.update(
        informativeness=informativeness(guide, config["eval_pairs"], cfg.batch_size, cfg.seed),
        within_prompt=within_prompt_informativeness(guide, config["eval_triples"], cfg.batch_size),
        train_rows=len(config["train_pairs"]), eval_rows=len(config["eval_pairs"]),
        workers=context.get_world_size(), train_seconds=time.time() - start,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved = guide.save(Path(tmp) / "guide", decoder=cfg.save_decoder)
        metrics["guide_version"] = guide.spec.version
        write_json(saved / METRICS_FILE, metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(saved)))


def _print_progress(path: Path, epochs: int, seen: int, stop: threading.Event,
                    log: Callable[[str], None]) -> None:
    """Print each line of rank 0's progress file after the first `seen` until `stop` is set."""
    while True:
        finished = stop.wait(2.0)
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines[seen:]:
            e = json.loads(line)
            log(f"[guide] epoch {e['epoch'] + 1}/{epochs}: loss {e['loss']:.4f}, "
                f"{e['rows_per_s']:.1f} rows/s, lr {e['lr']:.2e}, ETA {e['eta_s']:.0f}s")
        seen = len(lines)
        if finished:
            return


@contextmanager
def _progress_printed(checkpoint_dir: Path, epochs: int, log: Callable[[str], None]
                      ) -> Iterator[None]:
    """While the body runs (the training), a thread prints rank 0's new progress lines
    (`_print_progress`); a guide stage that resumes says after which epoch, first."""
    stop = threading.Event()
    progress = checkpoint_dir / PROGRESS_FILE
    already = len(progress.read_text().splitlines()) if progress.exists() else 0
    if already:
        log(f"[guide] resuming after epoch {already} from {checkpoint_dir}")
    printer = threading.Thread(target=_print_progress, daemon=True,
                               args=(progress, epochs, already, stop, log))
    printer.start()
    try:
        yield
    finally:
        stop.set()
        printer.join()


def train_guide(
    sft: DataConfig,
    samples: str,
    base_model: str,
    out_dir: str | Path,
    guide: GuideConfig = GuideConfig(),
    workers: ResourcesConfig = ResourcesConfig(num_actors=2),
    render_model: str | None = None,
    log: Callable[[str], None] = print,
    log_dir: str | Path | None = None,
    report_to: Sequence[str] = (),
) -> Path:
    """Train the guide on the SFT gold responses plus `samples` (prompt, gold, sample) with
    `workers.num_actors` Ray Train workers; returns `out_dir` (checkpoint + metrics.json).

    `render_model` is the checkpoint whose chat template renders `messages` rows (the policy
    that sampled; default `base_model`). Needs a running Ray (`ray.init()` or a cluster
    address). Truncation limits come from `sft` and are stored in the guide, so scoring
    truncates exactly as training did. `log_dir` / `report_to`: per-epoch metrics (module
    docstring).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(out_dir)
    pairs, triples = guide_data(sft, samples, load_tokenizer(render_model or base_model))
    train_pairs, eval_pairs, eval_triples = split_by_prompt(pairs, triples, guide.eval_fraction,
                                                            guide.seed)
    use_gpu = workers.num_gpus > 0
    storage = out_dir.parent.resolve() / f".{out_dir.name}.train"
    checkpoint_dir = out_dir.parent.resolve() / f".{out_dir.name}.ckpt"
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "guide": guide, "base_model": base_model, "train_pairs": train_pairs,
            "eval_pairs": eval_pairs, "eval_triples": eval_triples,
            "max_prompt_length": sft.max_prompt_length, "max_length": sft.max_length,
            "checkpoint_dir": str(checkpoint_dir),
            "log_dir": None if log_dir is None else str(Path(log_dir).absolute()),
            "report_to": tuple(report_to),
        },
        torch_config=TorchConfig(backend=process_group_backend(use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=workers.num_actors, use_gpu=use_gpu,
            resources_per_worker={"CPU": workers.num_cpus, "GPU": workers.num_gpus,
                                  **workers.resources},
        ),
        run_config=RunConfig(name=f"guide-{uuid.uuid4().hex[:8]}", storage_path=str(storage)),
    )
    with _progress_printed(checkpoint_dir, guide.epochs, log):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"guide training finished without a checkpoint: {result.error}")
    with atomic_dir(out_dir) as tmp:
        result.checkpoint.to_directory(str(tmp))
    shutil.rmtree(storage, ignore_errors=True)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return out_dir
