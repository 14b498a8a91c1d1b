"""The Ray Train worker function of Hbat (the driver: orchestration/hbat.py).

Each worker builds one `rayalign.train.Trainer` (DeepSpeed on the process group Ray Train
set up) and runs `rayalign.hbat.run_schedule` on it, reporting each finished phase to Ray
Train; a restarted worker resumes after the last phase the run directory records.
"""

from __future__ import annotations

import logging

from rayalign.config_hbat import HbatConfig
from rayalign.hbat import resolve_inputs, run_schedule


def hbat_worker(config: dict) -> None:
    """One rank of the Hbat job: ``config["cfg"]`` is the HbatConfig."""
    import ray.train

    from rayalign.train import Trainer

    logging.basicConfig(level=logging.INFO)
    cfg: HbatConfig = config["cfg"]
    policy = resolve_inputs(cfg).policy
    trainer = Trainer(policy.path, cfg.sft, policy.dtype)

    def report(phase, metrics: dict) -> None:
        penalty = metrics["penalty"] or {}
        ray.train.report({"phase": phase.name, "steps": metrics["steps"],
                          "loss": metrics["last"].get("loss"),
                          "F_max_share": penalty.get("max_share"),
                          "F_normalized_entropy": penalty.get("normalized_entropy")})

    run_schedule(cfg, trainer, on_phase=report)
