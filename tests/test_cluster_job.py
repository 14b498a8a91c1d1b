"""LD-Align end to end through `ray job submit` on a two-node Ray cluster on one machine.

A head (`ray start --head`, token auth) and a second node (`ray start --address`, custom
resource ``node_b``) are started here, each `--block`ed in its own process group. One job,
two submissions, with every actor pool and the training workers asking for ``node_b``, which
only the second node has:

- the first submission is stopped during iteration 1's training stage; the second (same
  run_dir) must finish without redoing any of iteration 0 and without reading a partial
  output (a killed job resumes);
- Ray's state API then shows every sampler actor and every Ray Train worker of both
  submissions on the second node: nothing assumes one node except the run directory's
  shared storage (one filesystem here; NFS on a cluster, README "Multi-node").

The code reaches both nodes as a shared directory (PYTHONPATH), not a `--working-dir` upload:
two nodes on one machine share one session directory, and one node's runtime-env agent
deleted the unpacked working_dir under the other's running driver.

Teardown signals only the two process groups started here (`ray stop` would stop every Ray
on the machine) and restores ``/tmp/ray/ray_current_cluster``, which `ray start` points at
the new head, so no later `ray.init()` / `serve run` looks for a dead cluster.
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

from rayalign.config import load_config
from rayalign.config_ldalign import LDAlignConfig

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
CURRENT = Path("/tmp/ray/ray_current_cluster")
ON_B = "{node_b: 1}"
SETS = [
    "tiny.train_rows=32", "tiny.eval_rows=8", "sft.max_steps=10", "iterations=2",
    "guide.epochs=2", "sampling.max_new_tokens=8", "eval_sampling.max_new_tokens=8",
    # a 2-epoch guide on 32 rows exercises resume, not informativeness: no gate here
    # (tests/test_guide_gate.py tests the gate)
    "guide.min_informativeness=null",
    f"pairs.sampler.resources={ON_B}", f"pairs.scorer.resources={ON_B}",
    f"pairs.refs.resources={ON_B}", f"guide_workers.resources={ON_B}",
    f"eval.workers.resources={ON_B}", f"train.resources_per_worker={ON_B}",
    f"sft.resources_per_worker={ON_B}",
]


def test_tiny_yaml_is_the_embedded_default():
    assert load_config(LDAlignConfig, ROOT / "configs" / "tiny.yaml") == LDAlignConfig()


def _node_ports() -> list[str]:
    """Every listening port of a node explicit (a default taken by another Ray on this
    machine, like the agent's 52365, would leave the node without a job agent)."""
    return [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _ray(env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _nodes(env) -> list[dict]:
    """The ALIVE nodes; [] while the state API cannot answer yet (a starting head can exit 0
    with output that is not JSON: seen once in a full-suite run)."""
    out = _ray(env, "list", "nodes", "--format=json", "--filter", "state=ALIVE")
    try:
        return json.loads(out.stdout) if out.returncode == 0 else []
    except json.JSONDecodeError:
        return []


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    saved = CURRENT.read_text() if CURRENT.exists() else None
    # token auth, as Ray's CLI requires here; both nodes and the CLI read it from the env
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "TOKENIZERS_PARALLELISM": "false",
           # a loaded machine starts a node's dashboard agent slowly; the raylet's default
           # wait for it (~15 s) then aborts the node
           "RAY_agent_register_timeout_ms": "120000",
           "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    logs = tmp_path_factory.mktemp("ray_start")
    procs = [_start(["--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     f"--ray-client-server-port={free_port()}", *_node_ports()], env,
                    logs / "head.log")]
    try:
        env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 300
        while _ray(env, "job", "list").returncode:
            assert procs[0].poll() is None and time.time() < deadline, \
                f"head did not start: {(logs / 'head.log').read_text()[-2000:]}"
            time.sleep(2)
        for attempt in range(5):  # a loaded machine can time out the join's first RPCs
            log = logs / f"node_b.{attempt}.log"
            procs.append(_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=4",
                                 '--resources={"node_b": 8}', *_node_ports()], env, log))
            while len(_nodes(env)) < 2 and procs[-1].poll() is None and time.time() < deadline:
                time.sleep(2)
            if len(_nodes(env)) >= 2:
                break
        assert len(_nodes(env)) >= 2, f"node B did not join: {log.read_text()[-2000:]}"
        yield env
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                stop_process_group(proc, grace_s=15)
        if saved is None:
            CURRENT.unlink(missing_ok=True)
        else:
            CURRENT.write_text(saved)


def _job(env, *args: str, check: bool = True) -> str:
    out = _ray(env, "job", *args, timeout=1200)
    if check and out.returncode != 0:
        raise AssertionError(f"ray job {args[0]} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


def _submit(env, run_dir: Path, wait: bool) -> str:
    """Submit the small job; retry while the fresh head's job agent is still starting."""
    sets = [a for s in SETS + [f"run_dir={run_dir}"] for a in ("--set", s)]
    args = ("submit", *([] if wait else ["--no-wait"]), "--",
            sys.executable, str(ROOT / "jobs" / "ld_align.py"), *sets)
    deadline = time.time() + 300
    while "No available agent" in (out := _job(env, *args, check=False)) and time.time() < deadline:
        time.sleep(3)
    assert "raysubmit_" in out, out
    assert not wait or "succeeded" in out.lower(), out[-4000:]
    return out


def _stop_during_iter1_training(env, run_dir: Path) -> dict:
    """Submit, stop the job once iteration 1's training stage runs; the manifest then."""
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", _submit(env, run_dir, wait=False)).group(0)
    deadline, checked = time.time() + 900, time.time()
    # the manifest is read every 0.2 s; the job's status (a CLI call, seconds on a loaded
    # machine, long enough to miss a short stage) only every 15 s
    while (manifest := read_manifest(run_dir)).get("running") != "iter_001/train":
        assert time.time() < deadline, f"iter_001/train never started: {manifest}"
        assert "iter_001/train" not in manifest.get("stages", {}), \
            "iter_001/train finished before the test saw it running"
        if time.time() - checked > 15:
            status, checked = _job(env, "status", job_id, check=False), time.time()
            assert "FAILED" not in status, _job(env, "logs", job_id, check=False)
        time.sleep(0.2)
    _job(env, "stop", job_id)
    return read_manifest(run_dir)["stages"]


@pytest.mark.slow
def test_stopped_job_resumes_and_every_worker_ran_on_the_second_node(two_nodes, tmp_path):
    env, run_dir = two_nodes, tmp_path / "run"
    node_b = next(n["node_id"] for n in _nodes(env) if "node_b" in n["resources_total"])
    before = _stop_during_iter1_training(env, run_dir)
    assert "iter_001/train" not in before and not (run_dir / "iter_001" / "policy").exists()

    logs = _submit(env, run_dir, wait=True)
    after = read_manifest(run_dir)["stages"]
    for stage, entry in before.items():
        assert after[stage]["finished_at"] == entry["finished_at"], f"{stage} was redone"
        assert f"[{stage}] done earlier, skipped" in logs
    assert "[iter_001/train] running" in logs and "report" in after
    assert "| theta_2 |" in logs
    config = json.loads((run_dir / "iter_001" / "policy" / "config.json").read_text())
    assert config["n_layer"] == 2

    listed = _ray(env, "list", "actors", "--format=json", "--detail", "--limit=10000")
    actors = json.loads(listed.stdout)
    # an actor the stop killed before Ray placed it never ran anywhere: its node_id is None
    placed = {kind: {a["node_id"] for a in actors if kind in a["class_name"] and a["node_id"]}
              for kind in ("PolicySampler", "RayTrainWorker")}
    assert placed == {"PolicySampler": {node_b}, "RayTrainWorker": {node_b}}, \
        sorted({(a["class_name"], a["state"], str(a["node_id"])[:8]) for a in actors})
