"""The Ray Train driver (actors/trainer.py) with 2 CPU workers on the session's local Ray.

One `run_phases` job trains the tiny model through one phase per objective (sft, dpo,
weighted_dpo, ipo, aot, aot_unpaired) on toy data, so Ray Train starts once; each phase
must lower its loss, write a Hugging Face export that `transformers` loads, and change the
exported model's log-probs relative to the model before the phase.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayalign import toytask
from rayalign.config import DataConfig
from rayalign.config_train import TrainConfig
from rayalign.data import collate_pairs
from rayalign.logprobs import sequence_logprobs
from rayalign.models import load_model, load_tokenizer

pytestmark = pytest.mark.slow  # one Ray Train job with 6 phases, ~60 s

OBJECTIVES = ["sft", "dpo", "weighted_dpo", "ipo", "aot", "aot_unpaired"]
ROWS = 24
LIMITS = dict(max_prompt_length=32, max_length=64)


def _write_data(directory) -> dict[str, str]:
    pairs = toytask.make_preference_rows(ROWS, seed=5)
    files = {
        "sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs],
        "preference": [dict(r, weight=0.5 + i % 3) for i, r in enumerate(pairs)],
        "unpaired": [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"],
                      "label": bool(i % 2)} for i, r in enumerate(pairs * 2)],
    }
    return {kind: str(toytask.write_jsonl(directory / f"{kind}.jsonl", rows))
            for kind, rows in files.items()}


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_gpt2, tmp_path_factory):
    from actors.trainer import PhaseSpec, run_phases

    root = tmp_path_factory.mktemp("ray_train")
    files = _write_data(root)
    phases = []
    for objective in OBJECTIVES:
        kind = {"sft": "sft", "aot_unpaired": "unpaired"}.get(objective, "preference")
        train = TrainConfig(objective=objective, lr=1e-3, beta=0.5, epochs=3, micro_batch_size=4,
                            warmup_ratio=0.0, num_workers=2, checkpoint_every=4)
        phases.append(PhaseSpec(objective, DataConfig(path=files[kind], kind=kind, **LIMITS),
                                train, str(root / objective)))
    result = run_phases(tiny_gpt2, phases, storage=root / "ray")
    return result


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_phase_learns_and_exports(trained, tiny_gpt2, objective):
    out = trained.exports[objective]
    history = json.loads(open(f"{out}/train_metrics.json").read())["history"]
    assert len(history) == 9  # 24 rows / 2 workers / 4 = 3 micro-batches per epoch, 3 epochs
    assert history[-1]["loss"] < 0.9 * history[0]["loss"], [h["loss"] for h in history]
    assert trained.metrics[objective] == history[-1]
    before_dir = (tiny_gpt2 if objective == OBJECTIVES[0]
                  else trained.exports[OBJECTIVES[OBJECTIVES.index(objective) - 1]])
    tok = load_tokenizer(out)
    r = toytask.make_preference_rows(4, seed=5)
    batch = collate_pairs(tok, [x["prompt"] for x in r], [x["chosen"] for x in r],
                          [x["rejected"] for x in r], **LIMITS)
    with torch.no_grad():
        before, _ = sequence_logprobs(load_model(before_dir), batch)
        after, _ = sequence_logprobs(AutoModelForCausalLM.from_pretrained(out), batch)
    assert (before - after).abs().max() > 1e-2, (before, after)
