"""LD-Align on a two-node Ray cluster on one machine: nothing assumes one node.

A head (`ray start --head`) and a second node (`ray start --address`, custom resource
``node_b``) are started here, each `--block`ed in its own process group; the job is submitted
with every actor pool and the training workers asking for ``node_b``, which only the second
node has. The test then reads Ray's state API: every sampler actor and every Ray Train
worker ran on the second node, and the job finished. What the nodes share is the run
directory and here the code (one filesystem here; NFS on a cluster, README "Multi-node").

Teardown signals only the two process groups started here (`ray stop` would stop every Ray
on the machine) and restores ``/tmp/ray/ray_current_cluster``, which `ray start` points at
the new head, so no later `ray.init()` looks for a dead cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
CURRENT = Path("/tmp/ray/ray_current_cluster")
ON_B = "{node_b: 1}"
SETS = [
    "tiny.train_rows=32", "tiny.eval_rows=8", "sft=null", "iterations=1",
    "guide.epochs=1", "sampling.max_new_tokens=8", "eval_sampling.max_new_tokens=8",
    f"pairs.sampler.resources={ON_B}", f"pairs.scorer.resources={ON_B}",
    f"pairs.refs.resources={ON_B}", f"guide_workers.resources={ON_B}",
    f"train.resources_per_worker={ON_B}",
]


def _node_ports() -> list[str]:
    """Every listening port of a node explicit (a default taken by another Ray on this
    machine would leave the node without an agent)."""
    return [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _ray(env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    saved = CURRENT.read_text() if CURRENT.exists() else None
    # token auth, as Ray's CLI requires here; both nodes and the CLI read it from the env
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "TOKENIZERS_PARALLELISM": "false",
           # a loaded machine starts a node's dashboard agent slowly; the raylet's default
           # wait for it (~15 s) then aborts the node
           "RAY_agent_register_timeout_ms": "120000",
           "TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("torch_ext")),
           # the code reaches both nodes as a shared directory, not a --working-dir upload:
           # two nodes on one machine share one session directory, and one node's runtime-env
           # agent deleted the unpacked working_dir under the other's running driver
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
            _stop(proc)
        if saved is None:
            CURRENT.unlink(missing_ok=True)
        else:
            CURRENT.write_text(saved)


def _nodes(env) -> list[dict]:
    out = _ray(env, "list", "nodes", "--format=json", "--filter", "state=ALIVE")
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []


@pytest.mark.slow
def test_ld_align_runs_its_workers_on_the_second_node(two_nodes, tmp_path):
    env = two_nodes
    node_b = next(n["node_id"] for n in _nodes(env) if "node_b" in n["resources_total"])
    sets = [a for s in SETS + [f"run_dir={tmp_path / 'run'}"] for a in ("--set", s)]
    args = ["job", "submit", "--", sys.executable, str(ROOT / "jobs" / "ld_align.py"), *sets]
    deadline = time.time() + 300
    while "No available agent" in (out := _ray(env, *args, timeout=1200)).stdout + out.stderr:
        assert time.time() < deadline, out.stdout + out.stderr
        time.sleep(3)
    assert out.returncode == 0 and "succeeded" in (out.stdout + out.stderr).lower(), \
        out.stdout[-4000:] + out.stderr[-4000:]
    assert (tmp_path / "run" / "iter_000" / "policy" / "config.json").is_file()
    listed = _ray(env, "list", "actors", "--format=json", "--detail", "--limit=10000")
    actors = json.loads(listed.stdout)
    placed = {kind: {a["node_id"] for a in actors if kind in a["class_name"]}
              for kind in ("PolicySampler", "RayTrainWorker")}
    assert placed == {"PolicySampler": {node_b}, "RayTrainWorker": {node_b}}, \
        sorted({(a["class_name"], a["node_id"][:8]) for a in actors})
