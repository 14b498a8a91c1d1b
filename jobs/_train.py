"""What the one-phase training jobs (jobs/sft.py, jobs/dpo.py, jobs/aot.py) share.

    python jobs/<job>.py                              # tiny default: local Ray, 2 CPU workers
    python jobs/<job>.py --config my.yaml --set train.num_workers=8 --set train.use_gpu=true
    ray job submit --working-dir . -- python jobs/<job>.py --config my.yaml

Config: `rayalign.config_train.TrainJobConfig` (configs/<job>.yaml is each job's tiny default). On a
laptop this starts a local Ray; under `ray job submit` (RAY_ADDRESS is set) it attaches to the
cluster. Re-running the same command after a kill resumes from the last checkpoint
(actors/trainer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rayalign.cli import parse_job_config
from rayalign.config_train import TrainJobConfig

ROOT = Path(__file__).resolve().parents[1]


def training_job(name: str, objectives: tuple[str, ...],
                 doc: str) -> Callable[[list[str] | None], int]:
    """The ``main`` of job `name`: parse and check its config (default configs/<name>.yaml)
    before torch, DeepSpeed or Ray load, then `actors.trainer.job_main`, which refuses an
    objective outside `objectives` (exit 2)."""

    def main(argv: list[str] | None = None) -> int:
        cfg = parse_job_config(TrainJobConfig, doc.splitlines()[0], argv,
                               str(ROOT / "configs" / f"{name}.yaml"))  # inputs checked
        from actors.trainer import job_main  # torch, DeepSpeed, Ray: after the input checks

        return job_main(cfg, objectives)

    return main
