"""The informativeness gate of the LD-Align controller and policy.dtype in its stages.

One real run on the session's Ray (tiny GPT-2 as policy, toy data, no SFT): the guide's
within-prompt figure is below an impossible threshold, so the job stops after the guide stage
and before any pairs, with both figures and the override in the message; a controller with the
threshold overridden opens the same run directory (the threshold is not part of the run's
identity) and passes the gate on the recorded figures, so a rerun resumes at the pairs.
"""

from __future__ import annotations

import pytest

from orchestration.controller import GuideNotInformative, LDAlignController
from rayalign import toytask
from rayalign.config import DataConfig, ModelConfig, SamplingConfig
from rayalign.config_ldalign import GuideConfig, LDAlignConfig, PairsConfig
from rayalign.guide_train import informativeness_verdict


def test_verdict_passes_at_or_above_the_threshold_and_says_what_to_change():
    assert informativeness_verdict(0.05, 0.3, 0.05) is None
    assert informativeness_verdict(-1.0, -1.0, None) is None  # null: never stop
    message = informativeness_verdict(0.001, 0.2, 0.02)
    assert "within-prompt gap 0.0010" in message and "across-prompt gap 0.2000" in message
    assert "--set guide.min_informativeness=null" in message
    assert "guide.decoder_layers" in message and "guide.word_dropout" in message


@pytest.mark.slow
def test_gate_stops_before_pairs_and_an_override_resumes(ray_cluster, tiny_gpt2, tmp_path):
    rows = toytask.make_rows(12, seed=3)
    train = DataConfig(path=str(toytask.write_jsonl(tmp_path / "train.jsonl", rows)),
                       max_prompt_length=24, max_length=48)
    evals = DataConfig(path=str(toytask.write_jsonl(tmp_path / "eval.jsonl", rows[:4])),
                       max_prompt_length=24, max_length=48)
    sampling = SamplingConfig(max_new_tokens=8, batch_size=4)
    cfg = LDAlignConfig(
        run_dir=str(tmp_path / "run"), policy=ModelConfig(path=tiny_gpt2, dtype="bfloat16"),
        data=train, eval_data=evals, sft=None, sampling=sampling,
        guide=GuideConfig(epochs=1, min_informativeness=1e6), pairs=PairsConfig(progress_bars=False))
    lines: list[str] = []
    with pytest.raises(GuideNotInformative, match=r"within-prompt gap .* < guide.min_informativeness"
                                                  r"=1000000.0; across-prompt gap"):
        LDAlignController(cfg, log=lines.append).run_all()
    run = LDAlignController(cfg).run
    assert run.done("guide") and not run.done("iter_000/pairs")
    assert any(line.startswith("[guide] epoch 1/1: loss") and "rows/s" in line for line in lines)
    assert run.get("guide").metrics["peak_rss_gb"] > 0
    # policy.dtype reached the sampling stage (and the evaluation's, which runs the same
    # sample_stage); the sampler and reference actors load it: test_pairs_pipeline
    assert run.get("iter_000/samples").metrics["policy_dtype"] == "bfloat16"
    # the override opens the same run (no config-hash mismatch) and passes on the same figures
    relaxed = LDAlignController(cfg.model_copy(update={"guide": cfg.guide.model_copy(
        update={"min_informativeness": None})}))
    relaxed._gate(relaxed.run.get("guide").metrics)
