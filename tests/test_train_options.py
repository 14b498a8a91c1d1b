"""Engine options for big models on one gloo rank with real DeepSpeed and real peft:
gradient checkpointing, attention implementation, ZeRO-3 CPU offload and LoRA.

Tolerances: checkpointing recomputes the same float32 ops in the same order, so loss and
gradients agree to 1e-6 (they are in fact bitwise equal here). ZeRO-3 with and without
offload runs the same AdamW on the same fp32 partitions (CPU tensors either way on this
machine), but the offloaded engine moves the gradients through its CPU buffers, so they agree
to float32 rounding, not bitwise, and AdamW's normalized update (~lr * g / sqrt(v)) magnifies
that rounding for entries whose gradient is near 0: measured up to 0.7e-6 (foreach AdamW) and
1.03e-6 (fused) after two steps of lr 1e-3. That error scales with lr, so the test steps at
lr 1e-4: parameters must agree to 1e-6 (1% of one step, ~1e-7 expected), while an offload that
skipped or repeated an update is off by ~1e-4. Eager and sdpa attention are different kernels:
float32 losses of a few nats agree to 1e-5.
"""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForCausalLM

from rayalign import toytask
from rayalign.config import DataConfig
from rayalign.config_train import LoraConfig, TrainConfig
from rayalign.data import PreferenceExample, collate_pairs
from rayalign.logprobs import sequence_logprobs
from rayalign.models import load_model
from rayalign.train import Trainer
from rayalign.train_batches import plan_data, to_rows
from rayalign.train_phase import Phase

LIMITS = dict(max_prompt_length=32, max_length=64)


def _pairs(n: int = 4) -> list[PreferenceExample]:
    rows = toytask.make_rows(n, seed=6)
    return [PreferenceExample(r["prompt"], r["completion"], rows[(i + 1) % n]["completion"])
            for i, r in enumerate(rows)]


def _phase(steps: int = 1, **train) -> Phase:
    cfg = TrainConfig(**{"objective": "dpo", "lr": 1e-3, "micro_batch_size": 2,
                         "warmup_ratio": 0.0, "max_steps": steps, **train})
    examples = _pairs()
    return Phase("p", cfg, DataConfig(path="toy.jsonl", kind="preference", **LIMITS),
                 to_rows(examples), plan_data(examples, cfg, 1))


def _first_step(checkpoint: str, **train) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and (reduced, unclipped) gradients of the first optimizer step."""
    phase = _phase(**train)
    grads: dict[str, torch.Tensor] = {}

    def keep(name, param, grad):
        grads[name] = grad.detach().clone()
        return grad

    trainer = Trainer(checkpoint, phase.train)
    assert trainer.module.is_gradient_checkpointing == phase.train.gradient_checkpointing
    history = trainer.run_phase(phase, grad_hook=lambda t: t.update_local_grads(keep)).history
    return history[0]["loss"], grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(gloo_rank, tiny_llama):
    loss, grads = _first_step(tiny_llama)
    loss_ckpt, grads_ckpt = _first_step(tiny_llama, gradient_checkpointing=True)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6)
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4


def test_attention_implementation_from_config(gloo_rank, tiny_llama):
    eager = Trainer(tiny_llama, _phase(attn_implementation="eager").train)
    assert eager.module.config._attn_implementation == "eager"
    loss_eager = eager.run_phase(_phase(attn_implementation="eager")).history[0]["loss"]
    loss_sdpa, _ = _first_step(tiny_llama, attn_implementation="sdpa")
    assert loss_sdpa == pytest.approx(loss_eager, abs=1e-5)


def _zero3_params(checkpoint: str, offload: str) -> dict[str, torch.Tensor]:
    import deepspeed

    phase = _phase(steps=2, zero_stage=3, offload=offload, lr=1e-4)
    trainer = Trainer(checkpoint, phase.train)
    assert trainer.engine.zero_cpu_offload() == (offload == "cpu")
    # the policy was built partitioned (zero.Init); the reference model loaded later is plain
    assert all(hasattr(p, "ds_id") for p in trainer.module.parameters())
    assert not any(hasattr(p, "ds_id") for p in trainer.reference().parameters())
    trainer.run_phase(phase)
    named = list(trainer.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}


def test_zero3_cpu_offload_steps_like_the_unoffloaded_engine(gloo_rank, tiny_gpt2):
    offloaded = _zero3_params(tiny_gpt2, "cpu")
    plain = _zero3_params(tiny_gpt2, "none")
    initial = dict(load_model(tiny_gpt2).named_parameters())
    assert offloaded.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], rtol=0, atol=1e-6)
    moved = max(float((plain[n] - initial[n]).abs().max()) for n in plain)
    assert moved > 5e-5  # the steps moved it by far more than the tolerance


def test_offload_needs_zero3():
    with pytest.raises(ValueError, match="offload='cpu' needs zero_stage 3"):
        TrainConfig(offload="cpu", zero_stage=2)


LORA = LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def test_lora_trains_adapters_and_exports_a_plain_checkpoint(gloo_rank, tiny_llama, tmp_path):
    phase = _phase(steps=3, lr=5e-2, lora=LORA)
    trainer = Trainer(tiny_llama, phase.train)
    trainable = [n for n, p in trainer.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.run_phase(phase)
    # the reference (adapters disabled, no precomputed column) is the base model
    tok, base = trainer.tokenizer, load_model(tiny_llama)
    rows = _pairs()
    seqs = collate_pairs(tok, [r.prompt for r in rows], [r.chosen for r in rows],
                         [r.rejected for r in rows], **LIMITS)
    with torch.no_grad():
        want, _ = sequence_logprobs(base, seqs)
        policy, _ = sequence_logprobs(trainer.module, seqs)
    # same float32 weights and ops (the disabled adapters add nothing): abs 1e-5 on sums of
    # ~20 token log-probs
    torch.testing.assert_close(trainer.reference_logps(seqs), want, rtol=0, atol=1e-5)
    assert float((policy - want).abs().max()) > 1e-3  # while the adapted policy moved

    out = trainer.export(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base_params = dict(base.named_parameters())
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base_params[n])]
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    with torch.no_grad():
        merged_logps, _ = sequence_logprobs(merged, seqs)
    # W + (alpha/r) B A merged vs applied on the fly: float32 re-association, abs 1e-4
    torch.testing.assert_close(merged_logps, policy, rtol=0, atol=1e-4)


def test_lora_adapter_export_loads_with_peft(gloo_rank, tiny_llama, tmp_path):
    from peft import PeftModel

    lora = LORA.model_copy(update={"export": "adapter"})
    phase = _phase(steps=1, lr=5e-2, lora=lora)
    trainer = Trainer(tiny_llama, phase.train)
    trainer.run_phase(phase)
    out = trainer.export(tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(load_model(tiny_llama), out)
    want = {n: p for n, p in trainer.module.named_parameters() if "lora_" in n}
    got = dict(loaded.named_parameters())
    assert want and all(torch.equal(got[n], p.detach()) for n, p in want.items())


def test_lora_rejects_zero3():
    with pytest.raises(ValueError, match="lora with zero_stage 3"):
        TrainConfig(zero_stage=3, lora=LORA)
