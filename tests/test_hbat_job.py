"""jobs/hbat.py end to end: the tiny default on 2 CPU Ray Train workers (ZeRO-2), then a rerun.

The job builds the tiny model and toy data, runs Algorithm 1 with N = 2 in one Ray Train job,
prints the per-phase table and exports the policy. The manifest must hold the four phases in
order, each penalized phase with the importance statistics it used; the export must load in
`transformers` and score the data differently from the initial model. Rerunning the same
command finds everything recorded and trains nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from rayalign.config import load_config
from rayalign.config_hbat import HbatConfig
from rayalign.data import collate_pairs
from rayalign.io import read_json
from rayalign.logprobs import sequence_logprobs
from rayalign.models import load_model, load_tokenizer
from rayalign.toytask import make_preference_rows

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["tiny.train_rows=64", "sft.micro_batch_size=8", "preference.micro_batch_size=8",
         "sft.epochs=1", "preference.epochs=1"]


def _job():
    spec = importlib.util.spec_from_file_location("hbat_job", ROOT / "jobs" / "hbat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yaml_parses_and_is_the_tiny_default():
    cfg = load_config(HbatConfig, ROOT / "configs" / "hbat.yaml")
    assert (cfg.policy, cfg.ifa, cfg.hpa) == (None, None, None)
    assert (cfg.variant, cfg.num_splits) == ("hbat", 2)
    assert (cfg.sft.num_workers, cfg.sft.zero_stage) == (2, 2)


def _scores(policy: str) -> torch.Tensor:
    rows = make_preference_rows(8, seed=99)
    tok = load_tokenizer(policy)
    batch = collate_pairs(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows], 32, 64)
    with torch.no_grad():
        return sequence_logprobs(load_model(policy), batch)[0]


@pytest.mark.slow
def test_tiny_hbat_job_end_to_end(ray_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--set", f"run_dir={run_dir}", *[a for s in SMALL for a in ("--set", s)]]
    assert _job().main(args) == 0
    out = capsys.readouterr().out
    manifest = read_json(run_dir / "manifest.json")["stages"]
    phases = ["phase_00_sft1", "phase_01_pref1", "phase_02_sft2", "phase_03_pref2"]
    assert list(manifest) == phases + ["policy"]
    for phase in phases:
        metrics = manifest[phase]["metrics"]
        assert metrics["steps"] == 2 and math.isfinite(metrics["last"]["loss"])
        assert all(c >= 0 for c in metrics["change"].values())
        assert max(metrics["change"].values()) > 0
        penalty = metrics["penalty"]
        if phase == "phase_00_sft1":
            assert penalty is None
            continue
        assert penalty["mode"] == "ewc" and 0 < penalty["normalized_entropy"] <= 1
        assert 0 < penalty["max_share"] < 1 and penalty["top"][0][1] == penalty["max_share"]
        assert f"| {phase} |" in out
    for phase in phases:  # both objectives scored on the held-out toy sets after every phase
        held_out = manifest[phase]["metrics"]["eval"]
        assert held_out["ifa_nll"] > 0 and 0 <= held_out["hpa_accuracy"] <= 1
        logs = run_dir / "logs" / phase  # every step of every phase, from rank 0
        steps = [json.loads(line) for line in (logs / "steps.jsonl").open()]
        assert [(r["step"], r["steps"]) for r in steps] == [(1, 2), (2, 2)]
        assert steps[-1]["loss"] == pytest.approx(manifest[phase]["metrics"]["last"]["loss"])
        assert list(logs.glob("events.out.tfevents.*"))
    policy = str(run_dir / "policy")
    assert not torch.allclose(_scores(policy), _scores(str(run_dir / "inputs" / "base")))

    assert _job().main(args) == 0  # everything recorded: nothing is trained again
    assert read_json(run_dir / "manifest.json")["stages"] == manifest
