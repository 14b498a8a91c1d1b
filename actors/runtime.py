"""How every job and service joins Ray: the cluster it was submitted to, or a fresh local one."""

from __future__ import annotations

import logging
import os
import socket
import time
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = float(os.environ.get("RAYALIGN_RAY_CONNECT_TIMEOUT_S", "60"))


def _wait_reachable(address: str, timeout_s: float) -> None:
    """Fail within `timeout_s`, naming `address`, unless its host:port accepts a TCP
    connection (a dead GCS would otherwise make `ray.init` retry without end)."""
    if address == "auto":
        return  # `ray.init` resolves it from the cluster file of `ray start`
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.hostname is None or parsed.port is None:
        return  # not host:port: `ray.init` reports what it makes of it
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((parsed.hostname, parsed.port), timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"cannot reach the Ray cluster at RAY_ADDRESS={address!r} within "
                    f"{timeout_s:.0f} s ({err}); start it (`ray start --head`), fix the address, "
                    f"or unset RAY_ADDRESS to start a fresh local Ray") from None
            time.sleep(0.5)


def init_ray(min_local_cpus: int = 8, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Attach to `RAY_ADDRESS` (set by `ray job submit`), else start a new local Ray.

    A local Ray is always new (`address="local"`), never a stray cluster another process left
    on this machine: a `ray_current_cluster` file naming a dead head (what a killed
    `ray start` leaves) is never read. An unreachable `RAY_ADDRESS` fails within
    `connect_timeout_s` (env RAYALIGN_RAY_CONNECT_TIMEOUT_S), naming the address. A local
    Ray offers at least `min_local_cpus` logical CPUs even on a 2-core laptop: Ray Data's
    read tasks need CPU slots beside the stage's actor pools and Ray Train's lingering
    controller actors, and the stages run one at a time, so oversubscribing is safe where a
    strict count would deadlock. Ray Data / Train per-dataset INFO lines go to the session's
    log files only; the jobs print their own progress.
    """
    import ray
    import ray.data  # noqa: F401  (configures its loggers on import)
    import ray.train  # noqa: F401

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        _wait_reachable(os.environ["RAY_ADDRESS"], connect_timeout_s)
        ray.init(log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(min_local_cpus, os.cpu_count() or 1),
                 log_to_driver=False)
    for name in ("ray.data", "ray.train"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.WARNING)
