"""DPO-family preference training (dpo, weighted_dpo, ipo, kto) as a Ray Train + DeepSpeed job.

    python jobs/dpo.py                              # tiny default: local Ray, 2 CPU workers
    python jobs/dpo.py --set train.objective=ipo
    python jobs/dpo.py --set train.objective=kto      # unpaired (prompt, completion, label) rows
    python jobs/dpo.py --config my.yaml --set train.num_workers=8 --set train.use_gpu=true
    ray job submit --working-dir . -- python jobs/dpo.py --config my.yaml

Config: `rayalign.config.TrainJobConfig` (configs/dpo.yaml is the tiny default). On a laptop this
starts a local Ray; under `ray job submit` (RAY_ADDRESS is set) it attaches to the cluster.
Re-running the same command after a kill resumes from the last checkpoint (actors/trainer.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

# The submitted working directory's code, not an older installed copy, is what runs.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayalign.cli import parse_job_config  # noqa: E402
from rayalign.config import TrainJobConfig  # noqa: E402

OBJECTIVES = ("dpo", "weighted_dpo", "ipo", "kto")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_config(TrainJobConfig, __doc__.splitlines()[0], argv,
                           str(ROOT / "configs" / "dpo.yaml"))  # inputs checked: before Ray
    from actors.trainer import job_main  # torch, DeepSpeed, Ray: after the input checks

    return job_main(cfg, OBJECTIVES)


if __name__ == "__main__":
    raise SystemExit(main())
