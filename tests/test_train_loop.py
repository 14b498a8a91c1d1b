"""rayalign.train without Ray: one rank (gloo process group of size 1), real DeepSpeed.

Every objective trains on a small toy set until its loss drops, exports a Hugging Face
checkpoint that `transformers` loads, and the exported model scores the data differently
from the initial one. The schedule, micro-batching and data planning are checked as pure
functions; resume, precomputed reference columns, weights and NaN skipping against a
second run of the same loop.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from rayalign import toytask
from rayalign.config import DataConfig
from rayalign.config_train import TrainConfig
from rayalign.data import PreferenceExample, SFTExample, UnpairedExample, collate_pairs
from rayalign.logprobs import sequence_logprobs
from rayalign.models import load_model, load_tokenizer
from rayalign.train import NonFiniteLossError, Trainer
from rayalign.train_batches import (
    OBJECTIVE_DATA_KIND,
    DataPlan,
    build_micro_batch,
    kl_pairs,
    micro_batches,
    plan_data,
    to_rows,
    tokenize_rows,
)
from rayalign.train_engine import deepspeed_config
from rayalign.train_phase import Phase, lr_at, total_steps

LIMITS = dict(max_prompt_length=32, max_length=64)


def toy_examples(kind: str, n: int = 16, seed: int = 1) -> list:
    """SFT rows of the sorting task; pairs = (gold, another prompt's gold); unpaired halves."""
    rows = toytask.make_rows(n, seed)
    if kind == "sft":
        return [SFTExample(r["prompt"], r["completion"]) for r in rows]
    wrong = [rows[(i + 1) % n]["completion"] for i in range(n)]
    if kind == "preference":
        return [PreferenceExample(r["prompt"], r["completion"], w) for r, w in zip(rows, wrong)]
    return [UnpairedExample(r["prompt"], r["completion"] if i % 2 else w, bool(i % 2))
            for i, (r, w) in enumerate(zip(rows, wrong))]


def make_phase(examples, name="p", world_size=1, **train) -> Phase:
    cfg = TrainConfig(**{"lr": 1e-3, "micro_batch_size": 4, "beta": 0.5, "warmup_ratio": 0.0,
                         **train})
    kind = OBJECTIVE_DATA_KIND[cfg.objective]
    return Phase(name, cfg, DataConfig(path="toy.jsonl", kind=kind, **LIMITS), to_rows(examples),
                 plan_data(examples, cfg, world_size))


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


# -- pure pieces ---------------------------------------------------------------------------


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.25)
    lrs = [lr_at(s, 8, cfg) for s in range(8)]
    # warmup = 2 steps: 1/2, 2/2; then 0.5 (1 + cos(pi k / 6)), k = 0..5
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs == pytest.approx(expected)


def test_total_steps_counts_full_accumulation_cycles():
    cfg = TrainConfig(epochs=3, gradient_accumulation_steps=2)
    assert total_steps(cfg, 5) == 7  # 15 micro-batches -> 7 steps, the 15th is dropped
    assert total_steps(cfg.model_copy(update={"max_steps": 4}), 5) == 4
    with pytest.raises(ValueError, match="less than one optimizer step"):
        total_steps(TrainConfig(gradient_accumulation_steps=4), 3)


def test_deepspeed_config_follows_train_config():
    cfg = TrainConfig(micro_batch_size=3, gradient_accumulation_steps=2, zero_stage=3,
                      max_grad_norm=0.5, lr=2e-5, weight_decay=0.1)
    ds = deepspeed_config(cfg, world_size=4, dtype=torch.bfloat16)
    assert ds["train_batch_size"] == 24 and ds["zero_optimization"] == {"stage": 3}
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["lr"] == 2e-5
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1
    fp32_zero0 = deepspeed_config(cfg.model_copy(update={"zero_stage": 0}), 1, torch.float32)
    assert fp32_zero0["gradient_clipping"] == 0.0  # the loop clips (clips_in_torch)
    with pytest.raises(ValueError, match="float16"):
        deepspeed_config(cfg, 1, torch.float16)


def test_unpaired_micro_batches_balance_labels_and_drop_leftovers():
    rows = [{"label": lab, "i": i} for i, lab in enumerate([1, 1, 1, 0, 1, 0, 0, 1, 0])]
    batches = list(micro_batches(rows, "aot_unpaired", 2))
    # chosen 0,1 + rejected 3,5 once 5 is seen; then chosen 2,4 + rejected 6,8; 7 is left over
    assert [[r["i"] for r in b] for b in batches] == [[0, 1, 3, 5], [2, 4, 6, 8]]
    assert [len(b) for b in micro_batches(rows, "dpo", 4)] == [4, 4, 1]


def test_plan_data_checks_kind_and_reference_columns():
    pairs = toy_examples("preference", 10)
    assert plan_data(pairs, TrainConfig(micro_batch_size=2), 2) == DataPlan(3, False)
    with_ref = [dataclasses.replace(e, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0)
                for e in pairs]
    assert plan_data(with_ref, TrainConfig(), 1).precomputed_ref
    with pytest.raises(ValueError, match="not in row 10"):
        plan_data(with_ref[:9] + pairs[9:], TrainConfig(), 1)
    with pytest.raises(ValueError, match="needs sft data, got PreferenceExample"):
        plan_data(pairs, TrainConfig(objective="sft"), 1)
    unpaired = toy_examples("unpaired", 10)  # 5 true, 5 false -> 2 per rank of each
    assert plan_data(unpaired, TrainConfig(objective="aot_unpaired", micro_batch_size=2),
                     2).batches_per_epoch == 1


# -- the loop --------------------------------------------------------------------------------

OBJECTIVES = ["sft", "dpo", "weighted_dpo", "ipo", "aot", "aot_unpaired", "kto"]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_learns_and_exports(gloo_rank, tiny_gpt2, tmp_path, objective):
    kind = OBJECTIVE_DATA_KIND[objective]
    examples = toy_examples(kind)
    if objective == "weighted_dpo":
        examples = [dataclasses.replace(e, weight=0.5 + i % 3) for i, e in enumerate(examples)]
    phase = make_phase(examples, objective=objective, epochs=4,
                       beta=0.5)
    trainer = Trainer(tiny_gpt2, phase.train)
    history = trainer.run_phase(phase).history
    first, last = history[0]["loss"], history[-1]["loss"]
    assert len(history) == phase.steps == 4 * math.ceil(len(examples) / 2 / 4 if kind ==
                                                         "unpaired" else len(examples) / 4)
    assert last < 0.9 * first, [h["loss"] for h in history]
    if objective in ("dpo", "weighted_dpo", "ipo"):
        # over the last epoch (every pair once; the rows are shuffled each epoch, so the last
        # step alone is 4 random pairs)
        last_epoch = history[-len(history) // 4:]
        assert sum(h["margin"] for h in last_epoch) > 0
        assert sum(h["accuracy"] for h in last_epoch) / len(last_epoch) > 0.5
    out = trainer.export(tmp_path / "policy")
    exported = AutoModelForCausalLM.from_pretrained(out)
    initial = load_model(tiny_gpt2)
    tok = load_tokenizer(out)
    e = examples[0]
    batch = collate_pairs(tok, [e.prompt], [getattr(e, "chosen", None) or
                                            getattr(e, "response", None) or e.completion],
                          ["x"], **LIMITS)
    with torch.no_grad():
        before, _ = sequence_logprobs(initial, batch)
        after, _ = sequence_logprobs(exported, batch)
    assert not torch.allclose(before, after, atol=1e-3), (before, after)


def test_precomputed_reference_columns_equal_reference_model(gloo_rank, tiny_gpt2):
    examples = toy_examples("preference", 8)
    tok, ref = load_tokenizer(tiny_gpt2), load_model(tiny_gpt2)
    batch = collate_pairs(tok, [e.prompt for e in examples], [e.chosen for e in examples],
                          [e.rejected for e in examples], **LIMITS)
    with torch.no_grad():
        logps, _ = sequence_logprobs(ref, batch)
    with_ref = [dataclasses.replace(e, ref_chosen_logps=float(logps[i]),
                                    ref_rejected_logps=float(logps[8 + i]))
                for i, e in enumerate(examples)]
    results = []
    for data in (examples, with_ref):
        phase = make_phase(data, max_steps=3)
        assert phase.plan.precomputed_ref == (data is with_ref)
        trainer = Trainer(tiny_gpt2, phase.train)
        trainer.run_phase(phase)
        results.append(params(trainer))
    # The two runs differ only in float32 rounding of the reference log-probs (one batch of 16
    # vs micro-batches of 8 rows): a relative perturbation delta ~1e-6 of the loss weights.
    # Adam's step lr * m / (sqrt(v) + eps) moves by at most ~lr * delta / 4 under a relative
    # perturbation of the gradients, so 3 steps at lr 1e-3 differ by < 1e-8 - except where a
    # coordinate's gradient is near Adam's eps (1e-8), where m / (sqrt(v) + eps) is not
    # scale-free: with length-grouped micro-batches (each padded to its own width) one
    # coordinate of 12k moved 2.8e-6. atol 1e-5 is 1% of one step, while a wrong reference
    # (e.g. chosen/rejected swapped) moves ~lr.
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=1e-5)


def test_zero_weights_leave_the_policy_unchanged(gloo_rank, tiny_gpt2):
    """weighted_dpo reads the weight column: w = 0 gives zero gradients and no Adam update."""
    examples = [dataclasses.replace(e, weight=0.0) for e in toy_examples("preference", 8)]
    phase = make_phase(examples, objective="weighted_dpo", max_steps=2)
    trainer = Trainer(tiny_gpt2, phase.train)
    before = params(trainer)
    history = trainer.run_phase(phase).history
    assert history[-1]["weight"] == 0.0 and history[-1]["loss"] == 0.0
    for name, value in params(trainer).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_non_finite_loss_is_skipped_then_fails(gloo_rank, tiny_gpt2):
    examples = toy_examples("preference", 12)
    good = [dataclasses.replace(e, ref_chosen_logps=-20.0, ref_rejected_logps=-20.0)
            for e in examples]
    nan = [dataclasses.replace(e, ref_chosen_logps=float("nan")) for e in good]
    # rows in their given order (length_window 0), so the NaN rows form the first micro-batch
    cfg = TrainConfig(lr=1e-3, micro_batch_size=4, max_steps=1, max_nan_steps=1,
                      length_window=0)
    data = DataConfig(path="toy.jsonl", kind="preference", **LIMITS)
    # a NaN micro-batch before good ones is skipped (no backward) and training goes on
    phase = Phase("p", cfg, data, to_rows(nan[:4] + good[4:]), DataPlan(3, True))
    history = Trainer(tiny_gpt2, cfg).run_phase(phase).history
    assert history[0]["skipped"] == 1.0 and math.isfinite(history[0]["loss"])
    # max_nan_steps consecutive skips are tolerated, one more is an error
    phase = Phase("p", cfg, data, to_rows(nan), DataPlan(3, True))
    with pytest.raises(NonFiniteLossError, match="2 consecutive micro-batches.*max_nan_steps=1"):
        Trainer(tiny_gpt2, cfg).run_phase(phase)


def test_resume_equals_uninterrupted_run(gloo_rank, tiny_gpt2, tmp_path):
    """Stop after 3 of 6 steps (mid-epoch, ZeRO-2, accumulation 2), resume, compare."""
    phase = make_phase(toy_examples("preference", 20), max_steps=6, zero_stage=2,
                       gradient_accumulation_steps=2, micro_batch_size=3, warmup_ratio=0.3)
    assert phase.plan.batches_per_epoch == 7  # 3 steps = 6 micro-batches: mid-epoch
    full = Trainer(tiny_gpt2, phase.train)
    full.run_phase(phase)

    class Stop(Exception):
        pass

    first = Trainer(tiny_gpt2, phase.train)

    def stop_after_3(state, metrics):
        if state.step == 3:
            first.save_state(tmp_path / "ckpt", state)
            raise Stop

    with pytest.raises(Stop):
        first.run_phase(phase, on_step=stop_after_3)
    resumed = Trainer(tiny_gpt2, phase.train)
    state = resumed.load_state(tmp_path / "ckpt")
    assert (state.step, state.epoch, state.batch_in_epoch) == (3, 0, 6)
    resumed.run_phase(phase, state)
    expected = params(full)
    for name, value in params(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("objective", ["sft", "weighted_dpo", "aot_unpaired"])
def test_pretokenized_rows_give_the_same_micro_batch(tiny_gpt2, objective):
    kind = {"sft": "sft", "aot_unpaired": "unpaired"}.get(objective, "preference")
    data = DataConfig(path="toy.jsonl", kind=kind, max_prompt_length=4, max_length=9)  # truncates
    tok = load_tokenizer(tiny_gpt2)
    rows = to_rows(toy_examples(kind, 6))
    raw = build_micro_batch(tok, rows, objective, data, False)
    pre = build_micro_batch(tok, tokenize_rows(tok, rows, kind, data), objective, data, False)
    for field in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(raw.sequences, field), getattr(pre.sequences, field))
    assert raw.num_examples == pre.num_examples == (3 if kind == "unpaired" else 6)
    if objective == "weighted_dpo":
        assert torch.equal(raw.weights, pre.weights)


def test_kl_pairs_shift_the_completions_by_one():
    """TRL's KL dataset: prompt i with completion i - 1, the first prompt with the last one;
    a completion that would overflow max_length is cut."""
    seqs = [([1], [10, 11]), ([2, 2], [20]), ([3], [30, 31, 32])]
    assert kl_pairs(seqs, 16) == [([1], [30, 31, 32]), ([2, 2], [10, 11]), ([3], [20])]
    assert kl_pairs(seqs, 3)[0] == ([1], [30, 31])


def test_kto_reference_point_of_the_trainer(gloo_rank, tiny_gpt2):
    """After a few KTO steps the policy differs from the reference; the trainer's z0 for a
    micro-batch's KL pairs equals max(0, mean(log pi - log pi_ref)) computed here with the
    trained module and a fresh copy of the initial policy, on the pairs of `kl_pairs`
    (float32, same batch and code path: 1e-5)."""
    examples = toy_examples("unpaired", 16)
    phase = make_phase(examples, objective="kto", max_steps=3, lr=5e-3)
    trainer = Trainer(tiny_gpt2, phase.train)
    trainer.run_phase(phase)
    tok = load_tokenizer(tiny_gpt2)
    data = DataConfig(path="toy.jsonl", kind="unpaired", **LIMITS)
    batch = build_micro_batch(tok, to_rows(examples[:8]), "kto", data, False)
    assert batch.kl_sequences.input_ids.shape[0] == batch.sequences.input_ids.shape[0] == 8
    z0 = trainer.kto_reference_point(batch.kl_sequences)
    with torch.no_grad():
        policy, _ = sequence_logprobs(trainer.module, batch.kl_sequences)
        ref, _ = sequence_logprobs(load_model(tiny_gpt2), batch.kl_sequences)
    expected = (policy - ref).mean().clamp(min=0)
    assert float((policy - ref).abs().max()) > 1e-3  # the policy moved: a real check
    torch.testing.assert_close(z0, expected, rtol=0, atol=1e-5)


def test_micro_batch_marks_identical_pairs(tiny_gpt2):
    """A pair whose rejected text equals its chosen one is marked identical (token for token);
    one that differs by a digit is not."""
    data = DataConfig(path="toy.jsonl", kind="preference")
    rows = [{"prompt": "sort: 2 1 =>", "chosen": " 1 2", "rejected": " 1 2"},
            {"prompt": "sort: 2 1 =>", "chosen": " 1 2", "rejected": " 1 1"}]
    batch = build_micro_batch(load_tokenizer(tiny_gpt2), rows, "dpo", data, False)
    assert batch.identical.tolist() == [True, False]


def test_zero3_export_gathers_the_full_weights(gloo_rank, tiny_gpt2, tmp_path):
    """Under ZeRO-3 the module holds empty placeholders; the export must hold the weights,
    equal to a ZeRO-0 run of the same steps."""
    exported = {}
    for stage in (0, 3):
        phase = make_phase(toy_examples("preference", 8), max_steps=2, zero_stage=stage)
        trainer = Trainer(tiny_gpt2, phase.train)
        trainer.run_phase(phase)
        # the update is torch's fused AdamW kernel at every stage (deepspeed_config)
        inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
        assert type(inner) is torch.optim.AdamW and inner.defaults["fused"] is True
        model = AutoModelForCausalLM.from_pretrained(trainer.export(tmp_path / f"z{stage}"))
        exported[stage] = dict(model.named_parameters())
    # one rank: the same forward and gradients, so only the optimizer's elementwise AdamW over
    # flat partitions vs per-tensor ones rounds differently (~1 ulp of a step of 1e-3, i.e.
    # ~1e-10); atol 1e-6 = 0.1% of a step, which an export of the wrong (placeholder or
    # un-gathered) weights cannot meet.
    for name, value in exported[0].items():
        assert value.numel() > 0
        torch.testing.assert_close(exported[3][name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout(gloo_rank, tiny_gpt2, tmp_path, disable):
    """A policy with dropout 0.5: two training-mode forwards agree only with dropout off."""
    import json
    import shutil

    ckpt = tmp_path / "dropout"
    shutil.copytree(tiny_gpt2, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    (ckpt / "config.json").write_text(json.dumps(config))
    trainer = Trainer(ckpt, TrainConfig(disable_dropout=disable))
    e = toy_examples("preference", 1)[0]
    batch = collate_pairs(trainer.tokenizer, [e.prompt], [e.chosen], [e.rejected], **LIMITS)
    with torch.no_grad():
        first, _ = sequence_logprobs(trainer.engine, batch)
        second, _ = sequence_logprobs(trainer.engine, batch)
    assert torch.equal(first, second) == disable


@pytest.mark.parametrize("pack", [False, True])
def test_step_metrics_report_the_padding_share(gloo_rank, tiny_gpt2, pack):
    """One step of one micro-batch of all 4 pairs: padding = 1 - real positions / (rows x
    width), rows = the 8 sequences, or packed the 4 pairs of |chosen| + |rejected| - shared
    prefix positions each (rayalign.pairpack)."""
    examples = toy_examples("preference", 4)
    phase = make_phase(examples, max_steps=1, micro_batch_size=4, pack_pairs=pack)
    history = Trainer(tiny_gpt2, phase.train).run_phase(phase).history
    tokenizer = load_tokenizer(tiny_gpt2)
    seqs = collate_pairs(tokenizer, [e.prompt for e in examples],
                         [e.chosen for e in examples], [e.rejected for e in examples], **LIMITS)
    expected = 1.0 - float(seqs.attention_mask.sum()) / seqs.attention_mask.numel()
    if pack:
        ids = [seqs.input_ids[i][seqs.attention_mask[i].bool()].tolist() for i in range(8)]
        rows = [len(a) + len(b) - len(os.path.commonprefix([a, b]))
                for a, b in zip(ids[:4], ids[4:])]
        expected = 1.0 - sum(rows) / (4 * max(rows))
    assert expected > 0.05
    assert history[0]["padding"] == pytest.approx(expected, abs=1e-12)
    assert history[0]["tokens_per_s"] > 0


@pytest.mark.parametrize("objective", ["dpo", "aot"])
def test_packed_pairs_train_like_two_rows(gloo_rank, tiny_llama, objective):
    """One step of two accumulated micro-batches: loss, rewards and gradient norm with packed
    pairs equal the two-row run's. Log-probs agree to float32 rounding (a few eps of sums of
    ~50 nats, tests/test_pairpack.py), so 1e-5 relative; the parameters are not compared: a
    first AdamW step is ~lr * sign(g), which rounding may flip for entries of g near 0."""
    metrics = {}
    for pack in (False, True):
        phase = make_phase(toy_examples("preference", 8), max_steps=1, micro_batch_size=2,
                           gradient_accumulation_steps=2, objective=objective, pack_pairs=pack)
        trainer = Trainer(tiny_llama, phase.train)
        assert trainer.packs_pairs
        metrics[pack] = trainer.run_phase(phase).history[0]
    for key in ("loss", "chosen_reward", "rejected_reward", "grad_norm"):
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-5, abs=1e-7), key
    assert metrics[True]["padding"] < metrics[False]["padding"]
