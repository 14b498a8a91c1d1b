"""What the first GPU run would break, reproduced on the CPU with real DeepSpeed and gloo.

Process group: NCCL serves CUDA tensors only, so the trainer's metric and flag all-reduces
of CPU tensors crashed a multi-GPU run on its first micro-batch. The GPU job now starts a
two-backend group (``cpu:gloo,cuda:nccl``) and the loop reduces tensors on its training
device. This torch has no NCCL: two ranks train in a ``cpu:gloo,cuda:gloo`` group (the same
two-backend dispatch, gloo standing in for NCCL). A CPU-only machine cannot train on a
device whose group lacks a CPU backend, so the CUDA half is checked on a GPU only
(bench/gpu_check.py runs the loop's reductions there).

bf16 at ZeRO-0: DeepSpeed wrapped it in ``FP16_UnfusedOptimizer`` (bf16 weights seen as
"fp32 master", state keyed by a hidden fp32 copy, gradients accumulated in bf16), so Hbat's
anchor, C and penalty used rounded weights and Hbat-Freeze's momentum reset found nothing.
DeepSpeed builds the same engine on the CPU, so these tests fail on that engine.
"""

from __future__ import annotations

import os

import torch

from rayalign import toytask
from rayalign.config import DataConfig
from rayalign.config_train import TrainConfig
from rayalign.data import PreferenceExample, SFTExample
from rayalign.hbat_penalty import freeze_hook, zero_first_moment
from rayalign.train import Trainer
from rayalign.train_batches import plan_data, to_rows
from rayalign.train_engine import process_group_backend
from rayalign.train_phase import Phase
from conftest import free_port, gloo_group, spawn_ranks

LIMITS = dict(max_prompt_length=32, max_length=64)


def _phase(examples, world_size: int = 1, **train) -> Phase:
    cfg = TrainConfig(**{"lr": 1e-3, "micro_batch_size": 2, "warmup_ratio": 0.0,
                         "weight_decay": 0.0, **train})
    kind = "sft" if cfg.objective == "sft" else "preference"
    return Phase("p", cfg, DataConfig(path="toy.jsonl", kind=kind, **LIMITS), to_rows(examples),
                 plan_data(examples, cfg, world_size))


def test_gpu_process_group_serves_cpu_tensors_too():
    assert process_group_backend(True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(False) == "gloo"


def _two_backend_worker(rank: int, port: int, checkpoint: str, out: str) -> None:
    with gloo_group(rank, port, 2, backend="cpu:gloo,cuda:gloo"):
        rows = toytask.make_rows(8, seed=3)
        pairs = [PreferenceExample(r["prompt"], r["completion"], rows[(i + 1) % 8]["completion"])
                 for i, r in enumerate(rows)]
        phase = _phase(pairs[rank * 4:(rank + 1) * 4], world_size=1, objective="dpo",
                       max_steps=2)
        history = Trainer(checkpoint, phase.train).run_phase(phase).history
        torch.save(history, os.path.join(out, f"{rank}.pt"))


def test_two_ranks_train_in_a_two_backend_group(tiny_gpt2, tmp_path):
    spawn_ranks(_two_backend_worker, 2, free_port(), tiny_gpt2, str(tmp_path))
    first, second = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert len(first) == 2
    # the metrics are all-reduced: both ranks log the same numbers although their rows differ
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if not k.endswith("_per_s")} == \
               {k: v for k, v in b.items() if not k.endswith("_per_s")}


def _sft_rows() -> list[SFTExample]:
    return [SFTExample(r["prompt"], r["completion"]) for r in toytask.make_rows(4, seed=2)]


def test_bf16_zero0_keeps_fp32_master_weights_and_gradients(gloo_rank, tiny_gpt2):
    phase = _phase(_sft_rows(), objective="sft", max_steps=1)
    trainer = Trainer(tiny_gpt2, phase.train, dtype="bfloat16")
    assert type(trainer.engine.optimizer).__name__ == "BF16_Optimizer"
    seen = {}

    def record(name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        seen[name] = grad.dtype
        return grad

    def hook(t: Trainer) -> None:
        t.update_local_grads(record)

    trainer.run_phase(phase, grad_hook=hook)
    assert set(seen.values()) == {torch.float32}  # accumulated in fp32
    # Hbat's anchor and C read fp32 master weights, which after a step hold values that
    # bf16 cannot represent (a bf16 engine's own weights would all round-trip exactly)
    local = trainer.local_params()
    assert set(local) == {n for n, _ in trainer.module.named_parameters()}
    for name, piece in local.items():
        assert piece.dtype == torch.float32, name
    assert any(not torch.equal(piece, piece.bfloat16().float()) for piece in local.values())


def test_bf16_zero0_freeze_leaves_frozen_master_weights_exactly(gloo_rank, tiny_gpt2):
    phase = _phase(_sft_rows(), objective="sft", max_steps=2, lr=1e-2)
    trainer = Trainer(tiny_gpt2, phase.train, dtype="bfloat16")
    trainer.run_phase(phase)  # two steps: AdamW's first moment is non-zero now
    frozen = ["transformer.h.0.mlp.c_fc.weight"]
    before = {n: t.clone() for n, t in trainer.local_params().items()}
    zero_first_moment(trainer, frozen)
    again = _phase(_sft_rows(), objective="sft", max_steps=1, lr=1e-2)
    trainer.run_phase(again, grad_hook=freeze_hook(frozen))
    after = trainer.local_params()
    assert torch.equal(after[frozen[0]], before[frozen[0]])
    moved = [n for n in before if not torch.equal(after[n], before[n])]
    assert len(moved) == len(before) - 1
