"""LD-Align end to end through `ray job submit` on a real `ray start --head` (token auth).

One cluster, two submissions: the first is stopped during iteration 1's training stage, the
second (same run_dir) must finish without redoing any of iteration 0 and without reading a
partial output.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, read_manifest, stop_process_group

from rayalign.config import LDAlignConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SMALL = [
    "tiny.train_rows=48", "tiny.eval_rows=16", "sft.max_steps=30", "iterations=2",
    "guide.epochs=2", "sampling.max_new_tokens=16", "eval_sampling.max_new_tokens=16",
    # a 2-epoch guide on 48 rows exercises resume, not informativeness: no gate here
    # (tests/test_guide_gate.py tests the gate)
    "guide.min_informativeness=null",
]


def test_tiny_yaml_is_the_embedded_default():
    assert load_config(LDAlignConfig, ROOT / "configs" / "tiny.yaml") == LDAlignConfig()


@pytest.fixture(scope="module")
def head():
    """A `ray start --head --block` cluster with token auth, apart from the session's Ray.

    Torn down by signalling its own process group: `ray stop` would stop every Ray on the
    machine, the test session's shared cluster included; the cluster file it wrote goes too."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dash = free_port()
    # Every listening port explicit: a fixed default (the agent's 52365) taken by another Ray
    # on this machine leaves the head without a job agent ("No available agent").
    gcs_port = free_port()
    ports = [f"--port={gcs_port}"] + [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")]
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", *ports, "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list"], env=env, capture_output=True).returncode:
            assert proc.poll() is None and time.time() < deadline, "ray start --head failed"
            time.sleep(2)
        yield env
    finally:
        stop_process_group(proc, grace_s=10)
        _forget_cluster_file(gcs_port)


def _forget_cluster_file(gcs_port: int) -> None:
    """`ray start` wrote its address to Ray's cluster file; once the head is gone, a file
    naming it would send every later `ray.init("auto")` / `serve run` on this machine to a
    dead GCS (retrying forever), so remove it, but only if it names this head."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        if path.read_text().strip().endswith(f":{gcs_port}"):
            path.unlink()
    except FileNotFoundError:
        pass


def _job(env, *args: str, check=True) -> str:
    out = subprocess.run([RAY, "job", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(f"ray job {args[0]} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


def _submit(env, run_dir: Path, wait: bool) -> str:
    """Submit the small job; retry while the fresh head's job agent is still starting."""
    sets = [a for s in SMALL + [f"run_dir={run_dir}"] for a in ("--set", s)]
    args = ("submit", "--working-dir", ".", *([] if wait else ["--no-wait"]), "--",
            "python", "jobs/ld_align.py", *sets)
    deadline = time.time() + 300
    while "No available agent" in (out := _job(env, *args, check=False)) and time.time() < deadline:
        time.sleep(3)
    assert "raysubmit_" in out and ("FAILED" not in out or not wait), out
    return out


@pytest.mark.slow
def test_submit_kill_during_iter1_training_and_resume(head, tmp_path):
    run_dir = tmp_path / "run"
    out = _submit(head, run_dir, wait=False)
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out).group(0)
    deadline = time.time() + 600
    while read_manifest(run_dir).get("running") != "iter_001/train":
        assert time.time() < deadline, f"iter_001/train never started: {read_manifest(run_dir)}"
        status = _job(head, "status", job_id, check=False)
        assert "FAILED" not in status, _job(head, "logs", job_id, check=False)
        time.sleep(1)
    _job(head, "stop", job_id)
    before = read_manifest(run_dir)["stages"]
    assert "iter_001/train" not in before and not (run_dir / "iter_001" / "policy").exists()

    logs = _submit(head, run_dir, wait=True)
    after = read_manifest(run_dir)["stages"]
    for stage, entry in before.items():
        assert after[stage]["finished_at"] == entry["finished_at"], f"{stage} was redone"
        assert f"[{stage}] done earlier, skipped" in logs
    assert "[iter_001/train] running" in logs and "report" in after
    assert "| theta_2 |" in logs
    config = json.loads((run_dir / "iter_001" / "policy" / "config.json").read_text())
    assert config["n_layer"] == 2
