"""A Hbat run stopped inside a phase resumes at that phase and ends as if never stopped.

2 CPU ranks (gloo), real DeepSpeed, `rayalign.hbat.run_schedule` with N = 2 (four phases).
Each case runs the schedule once uninterrupted, and once stopped after the first optimizer
step of phase 2 (SFT 2, whose penalty needs AC^HPA of phase 1) and restarted with a new
Trainer on the same run directory. The restarted run must train exactly phases 2 and 3
(resuming from phase 1's checkpoint, AC rebuilt from the manifest), record the same C for
every phase and export the same weights (atol 1e-6; float32, deterministic data order).
Cases: hbat under ZeRO-3, and hbat_freeze under ZeRO-2, whose frozen tensors must also keep
C = 0 exactly after the restart (the momentum reset must reach a freshly loaded optimizer).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rayalign import toytask
from rayalign.io import read_json
from conftest import free_port, gloo_group, spawn_ranks

WORLD = 2
CASES = [("hbat", 3), ("hbat_freeze", 2)]


class Stop(Exception):
    """Stands for a crash in the middle of a phase."""


def _config(root: str, variant: str, stage: int, run: str):
    from rayalign.config import build_config
    from rayalign.config_hbat import HbatConfig

    train = {"lr": 1e-2, "max_steps": 2, "micro_batch_size": 2, "warmup_ratio": 0.0,
             "zero_stage": stage, "num_workers": WORLD}
    limits = {"max_prompt_length": 32, "max_length": 64}
    return build_config(HbatConfig, {
        "policy": {"path": os.path.join(root, "model")}, "variant": variant, "num_splits": 2,
        "ifa": {"path": os.path.join(root, "ifa.jsonl"), **limits},
        "hpa": {"path": os.path.join(root, "hpa.jsonl"), "kind": "preference", **limits},
        "ewc": {"f_max": 50.0, "freeze_fraction": 0.2},
        "sft": {"objective": "sft", **train}, "preference": {"objective": "dpo", **train},
        "run_dir": os.path.join(root, run)})


def _run(cfg, stop_in: str | None = None) -> list[str]:
    """run_schedule on a fresh Trainer; returns the phases it trained."""
    from rayalign.hbat import run_schedule
    from rayalign.train import Trainer

    trainer = Trainer(cfg.policy.path, cfg.sft)
    original = trainer.run_phase

    def run_phase(phase, state=None, on_step=None, grad_hook=None):
        def stop(state, metrics):
            if state.step == 1:
                raise Stop(phase.name)
        return original(phase, state, stop if phase.name == stop_in else on_step, grad_hook)

    trainer.run_phase = run_phase
    trained: list[str] = []
    try:
        run_schedule(cfg, trainer, on_phase=lambda phase, metrics: trained.append(phase.name))
    except Stop:
        pass
    return trained


def _worker(rank: int, port: int, root: str) -> None:
    from rayalign.hbat import fingerprint
    from rayalign.rundir import RunDir

    with gloo_group(rank, port, WORLD):
        for variant, stage in CASES:
            runs = {}
            for name, stop_in in (("whole", None), ("stopped", "phase_02_sft2")):
                cfg = _config(root, variant, stage, f"{variant}_{name}")
                if rank == 0:
                    RunDir(cfg.run_dir, fingerprint(cfg))
                dist.barrier()
                runs[name] = [_run(cfg, stop_in)]
                if stop_in:
                    runs[name].append(_run(cfg))
            if rank == 0:
                torch.save(runs, os.path.join(root, f"{variant}_trained.pt"))


@pytest.mark.slow
def test_stopped_run_resumes_at_the_phase_it_stopped_in(tiny_gpt2, tmp_path):
    os.symlink(tiny_gpt2, tmp_path / "model")
    toytask.write_jsonl(tmp_path / "ifa.jsonl", toytask.make_rows(16, seed=11))
    toytask.write_jsonl(tmp_path / "hpa.jsonl", toytask.make_preference_rows(16, seed=12))
    spawn_ranks(_worker, WORLD, free_port(), str(tmp_path))
    phases = ["phase_00_sft1", "phase_01_pref1", "phase_02_sft2", "phase_03_pref2"]
    for variant, _ in CASES:
        trained = torch.load(tmp_path / f"{variant}_trained.pt")
        assert trained["whole"] == [phases]
        assert trained["stopped"] == [phases[:2], phases[2:]]
        whole = read_json(tmp_path / f"{variant}_whole" / "manifest.json")["stages"]
        stopped = read_json(tmp_path / f"{variant}_stopped" / "manifest.json")["stages"]
        assert list(stopped) == phases + ["policy"]
        for phase in phases:
            a, b = whole[phase]["metrics"], stopped[phase]["metrics"]
            assert b["change"] == pytest.approx(a["change"], rel=1e-5, abs=1e-12), phase
            if a["penalty"] is None:
                assert b["penalty"] is None, phase
            else:
                for key in ("mode", "frozen", "n"):
                    assert b["penalty"][key] == a["penalty"][key], phase
                for key in ("entropy", "max_share"):
                    assert b["penalty"][key] == pytest.approx(a["penalty"][key], rel=1e-9)
            if b["penalty"] and b["penalty"]["frozen"]:
                assert all(b["change"][n] == 0.0 for n in b["penalty"]["frozen"]), phase
        # only the newest phase checkpoint is kept
        assert not (tmp_path / f"{variant}_stopped" / phases[2] / "checkpoint").exists()
        assert (tmp_path / f"{variant}_stopped" / phases[3] / "checkpoint").exists()
        got = load_file(tmp_path / f"{variant}_stopped" / "policy" / "model.safetensors")
        want = load_file(tmp_path / f"{variant}_whole" / "policy" / "model.safetensors")
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
