"""Cost of Hbat's modified EWC: training step time with the penalty / without it, in one run.

    .venv/bin/python bench/ewc_overhead.py [--zero 0 2 3] [--workers 2] [--hidden-size 256]
                                           [--layers 4] [--steps 60] [--block 5] [--batch 8]

For each ZeRO stage: ``--workers`` gloo ranks (CPU) build one `rayalign.train.Trainer` on a
random-init GPT-2 of the given size (rayalign.tiny, no download) and run one DPO phase on toy
preference pairs with reference log-probs precomputed (as Hbat's preference phases do). The
gradient hook alternates in blocks of ``--block`` optimizer steps between Hbat's EWC term
(`rayalign.hbat_penalty.ewc_hook`: anchor on the CPU, F over all tensors, lambda F_i (theta - theta*)
added to every local gradient piece) and nothing, so both kinds of step share the same engine,
data, warm caches and machine load. Step times are taken between step-end callbacks on rank 0,
the first two blocks being warm-up, as wall-clock time and as the CPU time of the rank's
process (`time.process_time`: what the step itself computes, insensitive to other processes
competing for the cores). Each step with EWC is paired with the step after it (without), and
the ratio reported is the median over pairs of t_with / t_without, so slow drifts in machine
load cancel. The time inside the hook alone is reported too, and the once-per-phase costs
(anchor snapshot, C with its all-reduce).

The paper reports 1.26x for its implementation (Table 7 of shared/papers/hbat.txt, 8 GPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayalign import toytask  # noqa: E402
from rayalign.models import load_model  # noqa: E402
from rayalign.tiny import build_tiny_checkpoint  # noqa: E402


def _worker(rank: int, args, port: int, checkpoint: str, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(args.workers))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    from rayalign.config import DataConfig
    from rayalign.config_train import TrainConfig
    from rayalign.data import PreferenceExample
    from rayalign.ewc import Snapshot, importance
    from rayalign.hbat_data import rank_shard, reference_logps
    from rayalign.hbat_penalty import ewc_hook, global_change
    from rayalign.train import Trainer
    from rayalign.train_batches import plan_data, to_rows, tokenize_rows
    from rayalign.train_phase import Phase

    cfg = TrainConfig(objective="dpo", zero_stage=stage, micro_batch_size=args.batch,
                      max_steps=args.steps, lr=1e-4, warmup_ratio=0.0, num_workers=args.workers)
    data = DataConfig(path="toy.jsonl", kind="preference", max_prompt_length=32, max_length=64)
    trainer = Trainer(checkpoint, cfg)
    examples = [PreferenceExample(**r) for r in toytask.make_preference_rows(
        args.batch * args.workers * 8, seed=7)]
    rows = tokenize_rows(trainer.tokenizer, to_rows(rank_shard(examples, rank, args.workers)),
                         "preference", data)
    rows = reference_logps(trainer, rows, args.batch)
    plan = dataclasses.replace(plan_data(examples, cfg, args.workers), precomputed_ref=True)

    t0 = time.perf_counter()
    anchor = Snapshot.take(trainer.local_params(), device="cpu")
    snapshot_s = time.perf_counter() - t0
    names = list(anchor.tensors)
    f = importance({n: float(i + 1) for i, n in enumerate(names)}, 100.0)  # a spread-out F
    ewc = ewc_hook(anchor, {n: 1.0 * v for n, v in f.items()})
    hook_s: list[float] = []
    step = {"n": 0}

    def hook(t) -> None:
        if (step["n"] // args.block) % 2 == 0:
            start = time.perf_counter()
            ewc(t)
            hook_s.append(time.perf_counter() - start)

    stamps: list[tuple[float, float]] = []

    def on_step(state, metrics) -> None:
        stamps.append((time.perf_counter(), time.process_time()))
        step["n"] = state.step

    phase_start = time.perf_counter()
    trainer.run_phase(Phase("bench", cfg, data, rows, plan), on_step=on_step, grad_hook=hook)
    phase_s = time.perf_counter() - phase_start
    t0 = time.perf_counter()
    global_change(trainer, anchor)
    change_s = time.perf_counter() - t0
    if rank == 0:
        # step k (0-based) ends at stamps[k] and ran with EWC iff (k // block) is even; pair
        # it with step k + block (the same position in the next block, without EWC)
        took = [tuple(b - a for a, b in zip(stamps[k - 1], stamps[k]))
                for k in range(1, len(stamps))]  # took[k - 1] = (wall, cpu) of step k
        pairs = [(took[k - 1], took[k - 1 + args.block])
                 for k in range(2 * args.block, len(stamps) - args.block)
                 if (k // args.block) % 2 == 0]
        torch.save({"pairs": pairs, "hook": hook_s[1:], "snapshot": snapshot_s,
                    "change": change_s, "phase": phase_s}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="pairs per rank per step")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(build_tiny_checkpoint(Path(tmp) / "model", toytask.corpus(),
                                               hidden_size=args.hidden_size,
                                               num_layers=args.layers))
        n_params = sum(p.numel() for p in load_model(checkpoint).parameters())
        print(f"GPT-2 hidden {args.hidden_size}, {args.layers} layers, {n_params / 1e6:.2f}M "
              f"parameters; {args.workers} CPU ranks (gloo); DPO, {args.batch} pairs/rank/step; "
              f"{args.steps} steps, EWC on/off in blocks of {args.block}")
        print("| ZeRO | step without EWC, wall / CPU (ms) | with EWC, wall / CPU (ms) "
              "| ratio, wall | ratio, CPU | hook (ms) | hook / step "
              "| snapshot + C per phase (ms) |")
        print("|---|---|---|---|---|---|---|---|")
        for stage in args.zero:
            out = str(Path(tmp) / f"zero{stage}.pt")
            mp.spawn(_worker, args=(args, _free_port(), checkpoint, stage, out),
                     nprocs=args.workers, join=True)
            r = torch.load(out)
            med = lambda side, i: statistics.median(p[side][i] for p in r["pairs"])  # noqa: E731
            ratio = [statistics.median(p[0][i] / p[1][i] for p in r["pairs"]) for i in (0, 1)]
            hook = statistics.median(r["hook"])
            print(f"| {stage} | {1e3 * med(1, 0):.1f} / {1e3 * med(1, 1):.1f} "
                  f"| {1e3 * med(0, 0):.1f} / {1e3 * med(0, 1):.1f} | {ratio[0]:.3f} "
                  f"| {ratio[1]:.3f} | {1e3 * hook:.2f} | {hook / med(1, 0):.3f} "
                  f"| {1e3 * (r['snapshot'] + r['change']):.0f} |", flush=True)


if __name__ == "__main__":
    main()
