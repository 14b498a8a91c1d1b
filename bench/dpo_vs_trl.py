"""DPO training throughput: rayalign's DeepSpeed loop vs TRL's DPOTrainer, in one run.

    .venv/bin/pip install -e ".[bench]"      # trl (does not change torch / transformers)
    .venv/bin/python bench/dpo_vs_trl.py [--steps 30] [--rounds 3] [--batch 8] [--hidden-size 64]

Same tiny model (one locally built checkpoint, loaded by both), same toy preference pairs
(tokenized before training by both), same batch size, same precision (float32 on CPU,
bfloat16 on GPU), one process per side with ``--threads`` torch threads, the reference model
evaluated on the fly by both (no precomputed reference log-probs), plain sigmoid DPO with
AdamW at a constant learning rate. Each measurement runs in a fresh subprocess, ``--warmup``
untimed steps then ``--steps`` timed optimizer steps, timed between step-end callbacks, both
in wall-clock and in CPU time of the process (CPU time is what stays comparable on a busy
machine); rounds alternate rayalign and TRL, and medians are reported. tokens/s counts the
non-padding tokens the pairs of a step hold (prompt + chosen + rejected, rayalign's
tokenization, the same count for both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayalign import toytask  # noqa: E402
from rayalign.config import DataConfig, TrainConfig  # noqa: E402
from rayalign.data import PreferenceExample, encode  # noqa: E402
from rayalign.models import load_tokenizer  # noqa: E402
from rayalign.tiny import build_tiny_checkpoint  # noqa: E402


def _pairs(n: int, seed: int) -> list[dict]:
    return toytask.make_preference_rows(n, seed)


def _tokens_per_pair(tokenizer, rows: list[dict], data: DataConfig) -> float:
    total = 0
    for r in rows:
        for side in ("chosen", "rejected"):
            p, c = encode(tokenizer, r["prompt"], r[side], data.max_prompt_length, data.max_length)
            total += len(p) + len(c)
    return total / len(rows)


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _rate(stamps: list[tuple[float, float]], warmup: int, batch: int) -> tuple[float, float]:
    """Pairs per wall-clock second and per CPU second (all threads of the process) over the
    steps after ``warmup``; ``stamps`` are taken at each step end."""
    (wall0, cpu0), (wall1, cpu1) = stamps[warmup], stamps[-1]
    pairs = batch * (len(stamps) - 1 - warmup)
    return pairs / (wall1 - wall0), pairs / (cpu1 - cpu0)


def bench_rayalign(checkpoint: str, rows: list[dict], args, data: DataConfig) -> tuple[float, float]:
    import torch.distributed as dist

    from rayalign.train import Phase, Trainer, plan_data, to_rows, tokenize_rows

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A one-rank process group as torchrun would set it up (this process runs only this side).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    train = TrainConfig(objective="dpo", beta=args.beta, lr=args.lr, warmup_ratio=0.0,
                        max_steps=args.warmup + args.steps + 1, micro_batch_size=args.batch,
                        use_gpu=torch.cuda.is_available(), max_grad_norm=1e9)
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    trainer = Trainer(checkpoint, train)
    # tokenized before training, as TRL does (and as the Ray driver does)
    rows = tokenize_rows(trainer.tokenizer, to_rows(examples), "preference", data)
    phase = Phase("bench", train, data, rows, plan_data(examples, train, 1))
    stamps: list[tuple[float, float]] = []
    trainer.run_phase(phase, on_step=lambda state, metrics: stamps.append(_stamp()))
    dist.destroy_process_group()
    return _rate(stamps, args.warmup, args.batch)


def bench_trl(checkpoint: str, rows: list[dict], args, data: DataConfig) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(_stamp())

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, learning_rate=args.lr,
            beta=args.beta, max_steps=args.warmup + args.steps + 1, lr_scheduler_type="constant",
            max_grad_norm=1e9, max_length=data.max_length, logging_steps=10**9,
            save_strategy="no", report_to=[], use_cpu=not gpu, bf16=gpu,
            dataloader_num_workers=0, disable_dropout=True, seed=0,
        )
        trainer = DPOTrainer(model=model, ref_model=ref, args=config,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=load_tokenizer(checkpoint), callbacks=[Stamp()])
        trainer.train()
    return _rate(stamps, args.warmup, args.batch)


SIDES = {"rayalign": bench_rayalign, "trl": bench_trl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds (rayalign, trl); medians are reported")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per side")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = DataConfig(path="toy", kind="preference", max_prompt_length=64, max_length=128)
    rows = _pairs(args.batch * (args.warmup + args.steps + 1), seed=0)
    if args.side:  # one measurement in a fresh process, so the two sides never share state
        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(SIDES[args.side](args.checkpoint, rows, args, data)))
        return
    rates: dict[str, list[tuple[float, float]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(build_tiny_checkpoint(Path(tmp) / "tiny", toytask.corpus(),
                                               hidden_size=args.hidden_size,
                                               num_layers=args.layers))
        tokens = _tokens_per_pair(load_tokenizer(checkpoint), rows, data)
        for _ in range(args.rounds):  # alternate, so load changes on the machine hit both
            for side in SIDES:
                out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side,
                                      "--checkpoint", checkpoint], capture_output=True,
                                     text=True, check=True).stdout
                rates[side].append(tuple(json.loads(out.rsplit("RESULT ", 1)[1])))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device {device}, {args.threads} torch thread(s) per side, model hidden "
          f"{args.hidden_size} x {args.layers} layers, batch {args.batch} pairs, {args.steps} "
          f"timed steps x {args.rounds} rounds, {tokens:.1f} tokens/pair; medians over rounds")
    print(f"{'':10} {'pairs/s':>9} {'tokens/s':>9} {'pairs/cpu-s':>12} {'tokens/cpu-s':>13}")
    for name, values in rates.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{name:10} {wall:9.1f} {wall * tokens:9.0f} {cpu:12.1f} {cpu * tokens:13.0f}")
    for i, label in ((0, "wall"), (1, "cpu")):
        ratios = [a[i] / b[i] for a, b in zip(rates["rayalign"], rates["trl"])]
        print(f"ratio rayalign / trl ({label} time): {statistics.median(ratios):.2f}x  (rounds: "
              + " ".join(f"{r:.2f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
