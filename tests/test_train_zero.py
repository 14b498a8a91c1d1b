"""ZeRO 0, 2 and 3 on 2 CPU processes (gloo) take the same first step as plain PyTorch.

One `torch.multiprocessing` spawn of 2 ranks runs every case of `CASES` on the real
`rayalign.train.Trainer` (DeepSpeed): each rank trains on its half of a global batch of 8
toy pairs for one optimizer step; rank 0 saves the reduced gradients (read in the gradient
hook, before clipping) and the gathered parameters after the step. The test process then
takes one step of plain `torch.optim.AdamW` on the whole global batch in one process (same
loss, clipping, learning rate) and compares.

The comparison has two halves, because Adam's first step ``lr * g / (|g| + eps)`` is
nearly sign(g): it hides a wrong gradient *scale* (summing instead of averaging over ranks)
and it amplifies float noise 1e4-fold on coordinates with |g| ~ eps (a 1e-9 difference in
such a gradient moves the parameter by ~2e-5 of the 1e-3 step). So (1) the reduced,
unclipped gradients equal the single-process gradients of the global batch (rtol 1e-4,
atol 1e-7), and (2) the parameters after the step equal plain clipping + AdamW applied to
those gradients from the initial weights (atol 1e-6 = 0.1% of a step).

The "hook" cases add ``C * theta`` to every gradient piece through
`Trainer.update_local_grads` (what Hbat's EWC does with ``lambda F_i (theta - theta*)``); the
reference adds the penalty ``C/2 ||theta||^2`` to the loss.
"""

from __future__ import annotations

import os

import pytest
import torch

from rayalign import aot, losses, toytask
from rayalign.config import DataConfig
from rayalign.config_train import TrainConfig
from rayalign.data import collate_pairs
from rayalign.logprobs import sequence_logprobs
from rayalign.models import load_model, load_tokenizer
from conftest import free_port, gloo_group, spawn_ranks

pytestmark = pytest.mark.slow  # one 2-process spawn running 9 DeepSpeed engines, ~35 s

WORLD, PAIRS, HOOK_C = 2, 8, 0.5
LIMITS = dict(max_prompt_length=32, max_length=64)
# (zero stage, objective, micro-batch size, accumulation steps, hook)
CASES = [(z, "dpo", 2, 2, False) for z in (0, 2, 3)] + \
        [(z, "aot", 4, 1, False) for z in (0, 2, 3)] + \
        [(z, "dpo", 4, 1, True) for z in (0, 2, 3)]
TRAIN = dict(lr=1e-3, beta=0.5, warmup_ratio=0.0, max_steps=1, max_grad_norm=1.0,
             weight_decay=0.01)


def _pairs(objective: str) -> list[dict]:
    """The global batch. AOT rows carry precomputed reference log-probs that differ per pair:
    with the reference model itself every log-ratio is 0 at the first step, the sorts would
    be arbitrary and AOT's gradient would equal DPO's."""
    rows = toytask.make_rows(PAIRS, seed=3)
    aot = objective == "aot"
    return [{"prompt": r["prompt"], "chosen": r["completion"],
             "rejected": rows[(i + 1) % PAIRS]["completion"], "weight": 1.0,
             "ref_chosen_logps": -40.0 + 3.0 * ((5 * i) % PAIRS) if aot else None,
             "ref_rejected_logps": -40.0 + 2.0 * ((3 * i) % PAIRS) if aot else None}
            for i, r in enumerate(rows)]


def _config(case) -> TrainConfig:
    stage, objective, mbs, gas, _ = case
    return TrainConfig(objective=objective, zero_stage=stage, micro_batch_size=mbs,
                       gradient_accumulation_steps=gas, **TRAIN)


def _worker(rank: int, port: int, checkpoint: str, out_dir: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from rayalign.train import Trainer
    from rayalign.train_batches import DataPlan
    from rayalign.train_phase import Phase

    with gloo_group(rank, port, WORLD):
        data = DataConfig(path="toy.jsonl", kind="preference", **LIMITS)
        for i, case in enumerate(CASES):
            cfg = _config(case)
            trainer = Trainer(checkpoint, cfg)
            grads = {}

            def hook(t: Trainer) -> None:
                if case[4]:
                    t.update_local_grads(lambda name, theta, g: g.add_(theta.to(g.dtype),
                                                                       alpha=HOOK_C))
                for name, p in t.module.named_parameters():  # full gradient, all stages
                    shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
                    grads[name] = safe_get_full_grad(p).detach().clone().reshape(shape)

            rows = _pairs(case[1])[rank::WORLD]
            plan = DataPlan(len(rows) // cfg.micro_batch_size, case[1] == "aot")
            phase = Phase("p", cfg, data, rows, plan)
            trainer.run_phase(phase, grad_hook=hook)
            named = list(trainer.module.named_parameters())
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                params = {n: p.detach().clone() for n, p in named}
            if rank == 0:
                torch.save({"params": params, "grads": grads}, os.path.join(out_dir, f"{i}.pt"))


@pytest.fixture(scope="module")
def distributed_steps(tiny_gpt2, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("zero")
    spawn_ranks(_worker, WORLD, free_port(), tiny_gpt2, str(out))
    return [torch.load(out / f"{i}.pt") for i in range(len(CASES))]


def _reference_grads(checkpoint: str, case) -> dict[str, torch.Tensor]:
    """Gradient of the loss on the whole global batch in one process (plain PyTorch)."""
    _, objective, _, _, hook = case
    cfg = _config(case)
    policy, ref = load_model(checkpoint, trainable=True), load_model(checkpoint)
    tok, rows = load_tokenizer(checkpoint), _pairs(objective)
    batch = collate_pairs(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows], **LIMITS)
    logps, _ = sequence_logprobs(policy, batch)
    with torch.no_grad():
        ref_logps, _ = sequence_logprobs(ref, batch)
    if objective == "aot":
        ref_logps = torch.tensor([r["ref_chosen_logps"] for r in rows] +
                                 [r["ref_rejected_logps"] for r in rows])
    args = (logps[:PAIRS], logps[PAIRS:], ref_logps[:PAIRS], ref_logps[PAIRS:])
    loss = (losses.dpo_loss(*args, beta=cfg.beta) if objective == "dpo"
            else aot.aot_loss(*args, beta=cfg.beta))
    if hook:
        loss = loss + HOOK_C / 2 * sum(p.square().sum() for p in policy.parameters())
    loss.backward()
    return {n: p.grad for n, p in policy.named_parameters()}


def _reference_step(checkpoint: str, case, grads: dict[str, torch.Tensor]) -> dict:
    """Plain clipping + `torch.optim.AdamW` step from the initial weights with ``grads``."""
    cfg = _config(case)
    policy = load_model(checkpoint, trainable=True)
    for name, p in policy.named_parameters():
        p.grad = grads[name].clone()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay).step()
    return {n: p.detach() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"zero{c[0]}-{c[1]}-gas{c[3]}{'-hook' if c[4] else ''}"
                              for c in CASES])
def test_first_step_matches_single_process_reference(distributed_steps, tiny_gpt2, index):
    got, case = distributed_steps[index], CASES[index]
    expected = _reference_grads(tiny_gpt2, case)
    assert got["grads"].keys() == expected.keys() == got["params"].keys()
    for name, value in expected.items():
        torch.testing.assert_close(got["grads"][name], value, rtol=1e-4, atol=1e-7,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
    initial = {n: p.detach() for n, p in load_model(tiny_gpt2).named_parameters()}
    for name, value in _reference_step(tiny_gpt2, case, got["grads"]).items():
        assert not torch.equal(value, initial[name]), f"{name} did not move"
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=1e-6,
                                   msg=lambda m, name=name: f"param {name}: {m}")
