"""Every preference objective Hbat accepts runs through `run_schedule` (one gloo rank).

N = 1 with EWC (variant no_alternating), two optimizer steps per phase, ZeRO-0: the SFT phase
and then the preference phase with dpo, weighted_dpo, aot (paired) and aot_unpaired (an
unpaired file: each toy pair as a true and a false row). Each run must record both phases,
a finite preference loss, reference log-probs taken from the policy at the phase start (the
first step of DPO-family losses then sits at ln 2 = 0.69315 exactly, and at the same value for
the logistic AOT loss), and the F^IFA statistics it used.
"""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from rayalign import toytask

OBJECTIVES = ("dpo", "weighted_dpo", "aot", "aot_unpaired")


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from rayalign.config import build_config
    from rayalign.config_hbat import HbatConfig
    from rayalign.hbat import fingerprint, run_schedule
    from rayalign.rundir import RunDir
    from rayalign.train import Trainer

    try:
        for objective in OBJECTIVES:
            train = {"lr": 1e-3, "max_steps": 2, "micro_batch_size": 4, "warmup_ratio": 0.0,
                     "num_workers": 1}
            unpaired = objective == "aot_unpaired"
            cfg = build_config(HbatConfig, {
                "policy": {"path": os.path.join(root, "model")}, "variant": "no_alternating",
                "ifa": {"path": os.path.join(root, "ifa.jsonl")},
                "hpa": {"path": os.path.join(root, "unpaired.jsonl" if unpaired else "hpa.jsonl"),
                        "kind": "unpaired" if unpaired else "preference"},
                "sft": {"objective": "sft", **train},
                "preference": {"objective": objective, **train},
                "run_dir": os.path.join(root, objective)})
            RunDir(cfg.run_dir, fingerprint(cfg))
            run_schedule(cfg, Trainer(cfg.policy.path, cfg.sft))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_preference_objective_runs_the_schedule(tiny_gpt2, tmp_path):
    os.symlink(tiny_gpt2, tmp_path / "model")
    pairs = toytask.make_preference_rows(16, seed=4)
    toytask.write_jsonl(tmp_path / "ifa.jsonl", toytask.make_rows(16, seed=3))
    toytask.write_jsonl(tmp_path / "hpa.jsonl", pairs)
    toytask.write_jsonl(tmp_path / "unpaired.jsonl", [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in pairs for side in ("chosen", "rejected")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=1, join=True)
    for objective in OBJECTIVES:
        stages = json.loads((tmp_path / objective / "manifest.json").read_text())["stages"]
        assert list(stages) == ["phase_00_sft1", "phase_01_pref1", "policy"], objective
        pref = stages["phase_01_pref1"]["metrics"]
        assert pref["objective"] == objective and pref["steps"] == 2
        assert pref["first"]["loss"] == pytest.approx(math.log(2), abs=1e-5), objective
        assert math.isfinite(pref["last"]["loss"]) and pref["last"]["loss"] != pref["first"]["loss"]
        assert pref["penalty"]["mode"] == "ewc" and pref["penalty"]["n"] > 1
