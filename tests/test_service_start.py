"""The services join Ray the way the jobs do (actors/runtime.init_ray): a stale
`ray_current_cluster` file (what a killed `ray start` head leaves) is never read, and an
unreachable RAY_ADDRESS fails within the connect timeout, naming the address.

Each run gets a private RAY_TMPDIR (short: Ray's socket paths must fit 107 bytes), so the
stale file never touches the machine's /tmp/ray, and its processes are found by that value."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, stop_process_group

from conftest import kill_processes_with_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_tmp():
    """A private RAY_TMPDIR whose cluster file names a dead head."""
    path = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (path / "ray").mkdir()
    (path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    yield path
    kill_processes_with_env(f"RAY_TMPDIR={path}")
    shutil.rmtree(path, ignore_errors=True)


def _env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return {**env, **extra}


def test_an_unreachable_ray_address_fails_in_bounded_time_naming_it(ray_tmp, tiny_gpt2):
    dead = f"127.0.0.1:{free_port()}"
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "services.sampler", "--set", f"model_path={tiny_gpt2}"],
        cwd=ROOT, env=_env(ray_tmp, RAY_ADDRESS=dead, RAYALIGN_RAY_CONNECT_TIMEOUT_S="3"),
        capture_output=True, text=True, timeout=300)
    print(f"failed after {time.time() - start:.1f} s")
    assert out.returncode != 0
    assert f"cannot reach the Ray cluster at RAY_ADDRESS='{dead}' within 3 s" in out.stderr


@pytest.mark.slow
def test_the_sampler_command_serves_despite_a_stale_cluster_file(ray_tmp, tiny_gpt2):
    """Before: `serve run services.sampler:app_builder ...` (the README's command) retried
    "Failed to connect to GCS" forever. Now the README's command starts a fresh local Ray."""
    port = free_port()
    service = subprocess.Popen(
        [sys.executable, "-m", "services.sampler", "--set", f"model_path={tiny_gpt2}",
         "--set", f"http.port={port}", "--set", "served_model_name=tiny"],
        cwd=ROOT, env=_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        deadline = time.time() + 600  # bounded: a hang fails here
        while True:
            assert service.poll() is None, service.stdout.read()[-4000:]
            assert time.time() < deadline, "the sampler never answered"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                if models.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert [m["id"] for m in models.json()["data"]] == ["tiny"]  # loopback: no token
    finally:
        stop_process_group(service, grace_s=30)
