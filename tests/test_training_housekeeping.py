"""A training stage of the LD-Align controller on the session's Ray: progress lines and
TensorBoard event files while it runs, and only the HF export left once it is recorded."""

from __future__ import annotations

import pytest

from orchestration.controller import LDAlignController
from rayalign import toytask
from rayalign.config import DataConfig
from rayalign.config_ldalign import LDAlignConfig
from rayalign.config_train import TrainConfig

pytestmark = pytest.mark.slow  # one Ray Train job, ~1 min

SFT = TrainConfig(objective="sft", lr=1e-3, max_steps=3, micro_batch_size=4, num_workers=1,
                  warmup_ratio=0.0)


def test_progress_events_and_checkpoint_cleanup(ray_cluster, tiny_gpt2, tmp_path):
    data = DataConfig(path=str(toytask.write_jsonl(tmp_path / "d.jsonl", toytask.make_rows(12, 1))),
                      max_prompt_length=24, max_length=48)
    run_dir = tmp_path / "run"
    logs, events_during = [], []

    def log(line: str) -> None:  # called by the driver's progress thread while fit() runs
        logs.append(line)
        if " step " in line:
            events_during.append(bool(list((run_dir / "logs" / "sft").glob("events.out.tfevents.*"))))

    keep = LDAlignController(LDAlignConfig(run_dir=str(run_dir), keep_checkpoints=True), log=log)
    keep._training_stage("sft", SFT, data, tiny_gpt2, run_dir / "sft" / "policy")
    assert [line.split(" loss=")[0] for line in logs if " step " in line] == \
        ["[sft] step 1/3", "[sft] step 2/3", "[sft] step 3/3"]
    assert events_during == [True] * 3
    assert list((run_dir / ".ray_train" / "sft").rglob("*.pt"))  # kept: DeepSpeed state

    # the same run resumed with the default: the recorded stage is skipped, its checkpoints go
    logs.clear()
    LDAlignController(LDAlignConfig(run_dir=str(run_dir)), log=log)._training_stage(
        "sft", SFT, data, tiny_gpt2, run_dir / "sft" / "policy")
    assert logs[0] == "[sft] done earlier, skipped" and "checkpoints deleted" in logs[1]
    assert sorted(p.name for p in run_dir.iterdir()) == ["logs", "manifest.json", "sft"]
    assert (run_dir / "sft" / "policy" / "model.safetensors").exists()
