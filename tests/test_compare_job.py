"""jobs/compare.py end to end: a comparison killed after its first arm resumes without redoing it.

Two continual-SFT arms (the cheapest LD-Align-controller arms: no sampling, pairs or guide) on
one tiny seed, started from one shared theta_0, with ``parallel: 2`` as the shipped configs
(theta_0 and each arm a child process). The driver attaches to the session's Ray and is
SIGKILLed with its children as soon as the comparison's manifest records an arm. ``b`` trains 50
epochs to ``a``'s one (~15 s more): with equal step counts both arms, which spend their time in
Ray Train's start and the evaluations, finished in the same second and were recorded together.
The rerun must skip theta_0 and the first arm (their records unchanged), finish the second, and
write the tables.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import read_manifest, stop_process_group

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path) -> Path:
    arm = {"weights": "uniform", "train.objective": "sft", "train.max_steps": 2,
           "eval_sampling.max_new_tokens": 12}
    cfg = {"run_dir": str(tmp_path / "cmp"), "job": "ld_align", "seeds": [0], "parallel": 2,
           "seed_keys": ["tiny.seed", "sft.seed", "train.seed"],
           "base": {"tiny": {"train_rows": 32, "eval_rows": 8},
                    "sft": {"objective": "sft", "lr": 3e-3, "max_steps": 2,
                            "micro_batch_size": 16, "num_workers": 1}, "iterations": 1},
           "arms": {"a": {**arm, "train.lr": 1e-3},
                    "b": {**arm, "train.lr": 1e-4, "train.max_steps": 100}},
           "metrics": ["eval_exact_match", "eval_position_accuracy", "eval_edit_distance"]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "jobs/compare.py", "--config", str(config)],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_killed_comparison_resumes_without_redoing_a_finished_arm(ray_cluster, tmp_path):
    config, run_dir = _config(tmp_path), tmp_path / "cmp"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT)}
    proc = _start(config, env, tmp_path / "first.log")
    deadline = time.time() + 600
    while not {"a/seed_0", "b/seed_0"} & set(read_manifest(run_dir).get("stages", {})):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        assert time.time() < deadline, "the first arm never finished"
        time.sleep(0.5)
    stop_process_group(proc, grace_s=0)  # SIGTERM then at once SIGKILL: a killed driver
    before = read_manifest(run_dir)["stages"]
    first, other = ("a", "b") if "a/seed_0" in before else ("b", "a")
    assert f"{other}/seed_0" not in before and not (run_dir / "comparison.md").exists()

    second = subprocess.run([sys.executable, "jobs/compare.py", "--config", str(config)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    after = read_manifest(run_dir)["stages"]
    for stage in ("theta0/seed_0", f"{first}/seed_0"):
        assert after[stage]["finished_at"] == before[stage]["finished_at"], f"{stage} redone"
    assert f"[compare] {first}/seed_0 done earlier, skipped" in second.stdout
    assert f"[compare] {other}/seed_0 started" in second.stdout
    assert "theta0/seed_0 started" not in second.stdout
    # both arms started from the one theta_0: the same theta_0 evaluation
    rows = list(csv.DictReader((run_dir / "per_seed.csv").open()))
    theta0 = {r["arm"]: r["value"] for r in rows
              if r["iteration"] == "0" and r["metric"] == "eval_edit_distance"}
    assert set(theta0) == {"a", "b"} and theta0["a"] == theta0["b"]
    text = (run_dir / "comparison.md").read_text()
    assert "## eval_position_accuracy" in text and "| b |" in text
    assert "## eval_position_accuracy" in second.stdout
    assert (run_dir / "plots" / "metrics.png").stat().st_size > 0
