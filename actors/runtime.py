"""How every job joins Ray: the cluster it was submitted to, or a fresh local one."""

from __future__ import annotations

import logging
import os


def init_ray(min_local_cpus: int = 8) -> None:
    """Attach to `RAY_ADDRESS` (set by `ray job submit`), else start a new local Ray.

    A local Ray is always new (`address="local"`), never a stray cluster another process left
    on this machine. It offers at least `min_local_cpus` logical CPUs even on a 2-core laptop:
    Ray Data's read tasks need CPU slots beside the stage's actor pools and Ray Train's
    lingering controller actors, and the stages run one at a time, so oversubscribing is safe
    where a strict count would deadlock. Ray Data / Train per-dataset INFO lines go to the
    session's log files only; the jobs print their own progress.
    """
    import ray
    import ray.data  # noqa: F401  (configures its loggers on import)
    import ray.train  # noqa: F401

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(min_local_cpus, os.cpu_count() or 1),
                 log_to_driver=False)
    for name in ("ray.data", "ray.train"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.WARNING)
