"""Ray Train driver for the LD-Align guide (the math is rayalign.guide.train_guide_model).

`train_guide` validates the data in the driver (bad rows fail before any worker starts),
runs a `TorchTrainer` whose workers train T = (phi, psi) with DDP (gloo on CPU, NCCL on GPU),
and leaves in `out_dir`, atomically, the guide checkpoint plus `metrics.json`: per-epoch
losses, the latent informativeness on a held-out split, data sizes and wall time.
Rank 0 hands the checkpoint to Ray Train (`ray.train.report`), which persists it under the
run's storage path, so workers on other nodes need no shared local disk; `out_dir` and the
storage path must be on storage the driver can reach (a local disk or NFS for `out_dir`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path

from rayalign.config import DataConfig, GuideConfig, ResourcesConfig
from rayalign.guide import GuideModel, guide_pairs, informativeness, split_pairs, train_guide_model
from rayalign.io import atomic_dir, write_json
from rayalign.models import load_tokenizer
from rayalign.train import process_group_backend

METRICS_FILE = "metrics.json"


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    guide_cfg: GuideConfig = config["guide"]
    start = time.time()
    guide = GuideModel.create(guide_cfg, config["base_model"], config["max_prompt_length"],
                              config["max_length"]).to(ray.train.torch.get_device())
    history = train_guide_model(guide, config["train_pairs"], guide_cfg)
    context = ray.train.get_context()
    metrics = {"epochs": history, "train_loss": history[-1]["loss"]}
    if context.get_world_rank() != 0:
        ray.train.report(metrics)
        return
    metrics.update(
        informativeness=informativeness(guide, config["eval_pairs"], guide_cfg.batch_size,
                                        guide_cfg.seed),
        train_rows=len(config["train_pairs"]), eval_rows=len(config["eval_pairs"]),
        workers=context.get_world_size(), train_seconds=time.time() - start,
    )
    with tempfile.TemporaryDirectory() as tmp:
        saved = guide.save(Path(tmp) / "guide")
        metrics["guide_version"] = guide.spec.version
        write_json(saved / METRICS_FILE, metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(saved)))


def train_guide(
    sft: DataConfig,
    samples: str,
    base_model: str,
    out_dir: str | Path,
    guide: GuideConfig = GuideConfig(),
    workers: ResourcesConfig = ResourcesConfig(num_actors=2),
) -> Path:
    """Train the guide on the SFT gold responses plus `samples` (prompt, gold, sample) with
    `workers.num_actors` Ray Train workers; returns `out_dir` (checkpoint + metrics.json).

    Needs a running Ray (`ray.init()` or a cluster address). Truncation limits come from
    `sft` and are stored in the guide, so scoring truncates exactly as training did.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(guide.model or base_model)
    train_pairs, eval_pairs = split_pairs(guide_pairs(sft, samples, tokenizer),
                                          guide.eval_fraction, guide.seed)
    use_gpu = workers.num_gpus > 0
    storage = out_dir.parent.resolve() / f".{out_dir.name}.train"
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "guide": guide, "base_model": base_model, "train_pairs": train_pairs,
            "eval_pairs": eval_pairs, "max_prompt_length": sft.max_prompt_length,
            "max_length": sft.max_length,
        },
        torch_config=TorchConfig(backend=process_group_backend(use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=workers.num_actors, use_gpu=use_gpu,
            resources_per_worker={"CPU": workers.num_cpus, "GPU": workers.num_gpus,
                                  **workers.resources},
        ),
        run_config=RunConfig(name=f"guide-{uuid.uuid4().hex[:8]}", storage_path=str(storage)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"guide training finished without a checkpoint: {result.error}")
    with atomic_dir(out_dir) as tmp:
        result.checkpoint.to_directory(str(tmp))
    shutil.rmtree(storage, ignore_errors=True)
    return out_dir
