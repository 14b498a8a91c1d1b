"""The Hbat driver (rayalign/hbat.py): the whole schedule as one Ray Train TorchTrainer job.

The driver generates the embedded default's inputs if the config has none, validates and
plans every phase's data (`rayalign.hbat.check_inputs`: a bad row fails before any worker
starts) and creates the run directory. Every worker runs `actors.hbat.hbat_worker`: one
`rayalign.train.Trainer` (DeepSpeed; gloo on CPU, NCCL on GPU) through
`rayalign.hbat.run_schedule`, all phases on one engine, a checkpoint and a manifest record
after each phase, a Ray Train report per phase. ``FailureConfig(max_failures)`` restarts the
workers, which resume after the last recorded phase. ``run_dir`` must be reachable from
every node (local disk on one machine, NFS on a cluster): the phase checkpoints and the
manifest live there.
"""

from __future__ import annotations

from actors.hbat import hbat_worker
from rayalign.config_hbat import HbatConfig
from rayalign.hbat import POLICY_STAGE, check_inputs, fingerprint, prepare_inputs, summary_rows
from rayalign.hbat_schedule import config_schedule
from rayalign.io import remove_stray_temps
from rayalign.rundir import RunDir
from rayalign.train_engine import process_group_backend


def run_hbat(cfg: HbatConfig) -> list[dict]:
    """Run (or resume) Hbat for ``cfg`` on the attached Ray cluster; one summary row per phase."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    prepare_inputs(cfg)
    check_inputs(cfg)
    run = RunDir(cfg.run_dir, fingerprint(cfg))
    remove_stray_temps(run.root)  # a killed phase's half-written output (no worker runs yet)
    if not run.done(POLICY_STAGE):
        train = cfg.sft  # the engine-level / job fields agree across phases (HbatConfig)
        trainer = TorchTrainer(
            hbat_worker,
            train_loop_config={"cfg": cfg},
            scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                         resources_per_worker={"CPU": train.cpus_per_worker,
                                                               **train.resources_per_worker}),
            run_config=RunConfig(name="hbat", storage_path=str(run.path(".ray_train")),
                                 failure_config=FailureConfig(max_failures=train.max_failures)),
            torch_config=TorchConfig(backend=process_group_backend(train.use_gpu)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    return summary_rows(RunDir(cfg.run_dir, fingerprint(cfg)), config_schedule(cfg))
