"""DeepSpeed's JIT-built CPU op: a worker killed while building or loading it no longer hangs
every later start on the host (rayalign/dsops.py).

Every test here uses a private TORCH_EXTENSIONS_DIR, so a killed build can never poison the
machine's shared ~/.cache/torch_extensions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import kill_processes_with_env, processes_with_env
from rayalign.dsops import host_lock

ROOT = Path(__file__).resolve().parents[1]
OP = "deepspeed_shm_comm"


def test_waiting_for_the_host_lock_is_bounded_and_names_the_holder(tmp_path):
    path = tmp_path / "guard"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(path)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(f'{os.getpid()}@host'); f.flush(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"waited 1 s for the op: process {holder.pid}@host"):
            with host_lock(path, 1.0, "the op"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with host_lock(path, 1.0, "the op"):  # the kernel released the dead holder's lock
        assert path.read_text().startswith(f"{os.getpid()}@")


@pytest.mark.slow
def test_a_worker_killed_while_building_the_op_does_not_hang_the_job(tmp_path):
    """The issue's reproduction: SIGKILL the Ray Train worker while it builds the op; Ray
    Train restarts it (max_failures=1). Before the fix the restarted worker waited forever on
    the dead worker's `lock`; now the job completes, having rebuilt the op once."""
    ext = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    entry = f"TORCH_EXTENSIONS_DIR={ext}"
    job = subprocess.Popen(
        [sys.executable, "jobs/dpo.py", "--set", f"output_dir={tmp_path / 'out'}",
         "--set", "train.num_workers=1", "--set", "train.max_steps=2",
         "--set", "train.micro_batch_size=4", "--set", "tiny.train_rows=16",
         "--set", "train.max_failures=1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (list(ext.glob(f".build-{OP}-*")) or (ext / OP / "lock").exists()):
            assert job.poll() is None and time.time() < deadline, "the op build never started"
            time.sleep(0.05)
        workers = processes_with_env(entry, b"RayTrainWorker")
        assert workers, "no Ray Train worker found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        out, _ = job.communicate(timeout=1500)  # bounded: a hang fails here
        assert job.returncode == 0, out[-4000:]
        assert (tmp_path / "out" / "policy" / "config.json").exists()
        assert (ext / OP / ".rayalign-complete").exists() and not (ext / OP / "lock").exists()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        kill_processes_with_env(entry)  # the job's Ray, a killed worker's orphaned compilers
