"""DPO training throughput and memory: rayalign's DeepSpeed loop vs TRL's DPOTrainer, in one run.

    .venv/bin/pip install -e ".[bench]"      # trl (does not change torch / transformers)
    .venv/bin/python bench/dpo_vs_trl.py [--steps 30] [--rounds 3] [--batch 8] [--hidden-size 64]
    .venv/bin/python bench/dpo_vs_trl.py --checkpoint DIR --data pairs.jsonl --pack 2 \\
        --threads 2 --reference live precomputed     # a real model (bench/prepare_real.py)

Same model (a locally built tiny checkpoint, or ``--checkpoint``), same pairs, same batch size,
same precision (float32 on CPU, bfloat16 on GPU), plain sigmoid DPO with AdamW at a constant
learning rate, one fresh process per measurement with ``--threads`` torch threads, ``--warmup``
untimed steps then ``--steps`` timed optimizer steps between step-end callbacks, in wall-clock
and in CPU time of the process (CPU time stays comparable on a busy machine). Rounds alternate
the sides (and which goes first); medians are reported.

Data. ``--data`` is a TRL preference file (message lists or strings); it is rendered once, by
`rayalign.data.load_examples` (the prompt through the tokenizer's chat template), and both sides
get the same plain-text prompt / chosen / rejected strings, tokenized before training by both.
``--pack K`` joins K consecutive rows into one (user turns joined into one user message, chosen
and rejected replies joined likewise) to reach realistic lengths when the rows are short.

Reference. ``live``: a reference model evaluated every step by both sides. ``precomputed``:
TRL's ``precompute_ref_log_probs=True`` (computed inside its process before the first step,
untimed) against our reference columns, computed by the pipeline stage's own class
(`pipelines.refs.ReferenceLogps`) in this parent process, as a Ray Data stage would, so the
training process never holds a reference model.

Reported per side: pairs/s and tokens/s (non-padding tokens of prompt + chosen + rejected,
rayalign's tokenization, the same count for both sides), peak RSS of the training process, and
model FLOP/s against this machine's float32 matmul peak measured in the same run (a square
matmul with the same thread count, between rounds). Model FLOPs are the standard count for the
work the step delivers, the same for both sides: per sequence of T tokens a forward is
2 N T + 2 L T^2 d (N = weights of the linear layers incl. the output head, L layers, d the
attention width, causal), the policy 3 forwards' worth, a live reference one more. They count
every sequence whole, the work both sides deliver; rayalign's packed pairs (``train.pack_pairs``,
off with ``--no-pack``) compute each pair's shared prefix once, and the report says what share
of the tokens that leaves. Each measurement records the machine's load average at its start
and end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from rayalign.config import DataConfig  # noqa: E402
from rayalign.config_train import TrainConfig  # noqa: E402
from rayalign.data import PreferenceExample, encode, load_examples  # noqa: E402
from rayalign.models import load_tokenizer  # noqa: E402
from rayalign.tiny import build_tiny_checkpoint  # noqa: E402


def pack_rows(path: str, tokenizer, k: int, n: int) -> list[dict]:
    """The first ``n`` rows of ``k`` consecutive rows each of a TRL preference file, as plain
    text (module docstring)."""
    raw = [json.loads(line) for line in open(path) if line.strip()][: n * k]
    if len(raw) < n * k:
        raise SystemExit(f"{path}: {len(raw)} rows, need {n * k} (--pack {k} x {n} pairs)")

    def content(value) -> str:
        return value[-1]["content"] if isinstance(value, list) else value

    packed = [{"prompt": [{"role": "user", "content": "\n".join(content(r["prompt"]) for r in g)}],
               "chosen": "\n".join(content(r["chosen"]) for r in g),
               "rejected": "\n".join(content(r["rejected"]) for r in g)}
              for g in (raw[i:i + k] for i in range(0, n * k, k))]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in packed))
    examples = load_examples(f.name, "preference", tokenizer)  # renders the chat template
    os.unlink(f.name)
    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples]


def add_ref_columns(checkpoint: str, rows: list[dict], data: DataConfig, batch: int) -> None:
    """Reference log-prob columns by the pipeline stage's class, in this (parent) process."""
    import numpy as np

    from pipelines.refs import ReferenceLogps

    stage = ReferenceLogps(checkpoint, data.max_prompt_length, data.max_length, device="cpu")
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        out = stage({k: np.array([r[k] for r in chunk]) for k in ("prompt", "chosen", "rejected")})
        for r, c, j in zip(chunk, out["ref_chosen_logps"], out["ref_rejected_logps"]):
            r["ref_chosen_logps"], r["ref_rejected_logps"] = float(c), float(j)


def _lengths(tokenizer, rows: list[dict], data: DataConfig) -> tuple[list[int], int]:
    """Token counts of every sequence (chosen and rejected of each pair), as rayalign encodes,
    and the tokens of the packed rows (`rayalign.pairpack`: the shared prefix once)."""
    out, packed = [], 0
    for r in rows:
        a, b = (sum(encode(tokenizer, r["prompt"], r[side], data.max_prompt_length,
                           data.max_length), []) for side in ("chosen", "rejected"))
        out += [len(a), len(b)]
        packed += len(a) + len(b) - len(os.path.commonprefix([a, b]))
    return out, packed


def model_flops_per_pair(checkpoint: str, lengths: list[int], live_ref: bool) -> float:
    """Training FLOPs per pair (module docstring), averaged over the pairs."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # the head is a Linear (a tied one shares the embedding's weight; lookups are no FLOPs)
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, (torch.nn.Linear, Conv1D)))
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    forward = sum(2 * linear * t + 2 * layers * t * t * width for t in lengths)
    return forward * (4 if live_ref else 3) / (len(lengths) / 2)


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """Best float32 FLOP/s of an n x n matmul on ``threads`` torch threads, per wall-clock
    second and per CPU second of this process (all its threads)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    wall = cpu = float("inf")
    for _ in range(reps + 1):
        (w0, c0) = _stamp()
        a @ b
        (w1, c1) = _stamp()
        wall, cpu = min(wall, w1 - w0), min(cpu, c1 - c0)
    torch.set_num_threads(saved)
    return 2 * n**3 / wall, 2 * n**3 / cpu


def _total_steps(args) -> int:
    """Warmup steps, then the timed ones (a step-end stamp opens them, unless warmup is 0)."""
    return args.warmup + args.steps + (1 if args.warmup else 0)


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _result(stamps: list[tuple[float, float]], warmup: int, batch: int) -> dict:
    """Pairs per wall-clock second and per CPU second (all threads of the process) over the
    steps after ``warmup`` (``stamps`` are taken at each step end), and the peak RSS."""
    (wall0, cpu0), (wall1, cpu1) = stamps[warmup], stamps[-1]
    pairs = batch * (len(stamps) - 1 - warmup)
    return {"wall": pairs / (wall1 - wall0), "cpu": pairs / (cpu1 - cpu0),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_rayalign(checkpoint: str, rows: list[dict], args, data: DataConfig) -> dict:
    import torch.distributed as dist

    from rayalign.train import Trainer
    from rayalign.train_batches import plan_data, to_rows, tokenize_rows
    from rayalign.train_phase import Phase

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A one-rank process group as torchrun would set it up (this process runs only this side).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    train = TrainConfig(objective="dpo", beta=args.beta, lr=args.lr, warmup_ratio=0.0,
                        max_steps=_total_steps(args), micro_batch_size=args.batch,
                        use_gpu=torch.cuda.is_available(), max_grad_norm=1e9,
                        length_window=args.length_window, pack_pairs=not args.no_pack,
                        gradient_checkpointing=args.gradient_checkpointing)
    examples = [PreferenceExample(**r) for r in rows]
    trainer = Trainer(checkpoint, train)
    # tokenized before training, as TRL does (and as the Ray driver does)
    rows = tokenize_rows(trainer.tokenizer, to_rows(examples), "preference", data)
    phase = Phase("bench", train, data, rows, plan_data(examples, train, 1))
    stamps = [_stamp()] if args.warmup == 0 else []  # warmup 0: time every step
    trainer.run_phase(phase, on_step=lambda state, metrics: stamps.append(_stamp()))
    dist.destroy_process_group()
    return _result(stamps, args.warmup, args.batch)


def bench_trl(checkpoint: str, rows: list[dict], args, data: DataConfig) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *_, **__):
            if args.warmup == 0:  # time every step
                stamps.append(_stamp())

        def on_step_end(self, *_, **__):
            stamps.append(_stamp())

    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    precompute = args.reference == "precomputed"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    # precomputed: TRL scores the data with the initial policy and keeps no reference model
    ref = None if precompute else AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, learning_rate=args.lr,
            beta=args.beta, max_steps=_total_steps(args), lr_scheduler_type="constant",
            max_grad_norm=1e9, max_length=data.max_length, logging_steps=10**9,
            save_strategy="no", report_to=[], use_cpu=not gpu, bf16=gpu,
            dataloader_num_workers=0, disable_dropout=True, seed=0,
            precompute_ref_log_probs=precompute,
            gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        trainer = DPOTrainer(model=model, ref_model=ref, args=config,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=load_tokenizer(checkpoint), callbacks=[Stamp()])
        trainer.train()
    return _result(stamps, args.warmup, args.batch)


SIDES = {"rayalign": bench_rayalign, "trl": bench_trl}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (0: time "
                        "every step from the start of training, one epoch of the rows)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds (rayalign, trl); medians are reported")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--checkpoint", help="a Hugging Face causal LM (default: a tiny one "
                        "built locally, of --hidden-size x --layers)")
    parser.add_argument("--data", help="TRL preference JSONL (default: toy sorting pairs)")
    parser.add_argument("--pack", type=int, default=1, help="rows of --data joined into one")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--reference", nargs="+", default=["live"],
                        choices=["live", "precomputed"], help="comparisons to run")
    parser.add_argument("--length-window", type=int, default=32,
                        help="rayalign's train.length_window (0: rows in order, as TRL)")
    parser.add_argument("--no-pack", action="store_true",
                        help="rayalign's two-row forward per pair (train.pack_pairs false)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the body's activations in the backward (both sides)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per side")
    parser.add_argument("--profile", action="store_true", help="every measurement under "
                        "torch.profiler (both sides), printing the ops that take the CPU time")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_side(side: str, reference: str, checkpoint: str, rows_file: str) -> dict:
    argv = [a for a in sys.argv[1:]]
    argv += ["--side", side, "--checkpoint", checkpoint, "--rows", rows_file,
             "--reference", reference]
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{side} ({reference}) failed:\n{out.stderr[-4000:]}")
    table, result = out.stdout.rsplit("RESULT ", 1)
    if "--profile" in argv:
        print(f"== {side}, {reference} reference ==\n{table.strip()}")
    # the machine's 1-minute load average when the measurement started and ended
    return {**json.loads(result), "load": [load, os.getloadavg()[0]]}


def report(args, checkpoint, results, flops, peaks, lengths, packed) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    tokens = sum(lengths) / (len(lengths) / 2)
    # the machine's best; a busy machine only lowers a measurement
    peak, peak_cpu = max(p[0] for p in peaks), max(p[1] for p in peaks)
    print(f"device {device}, {args.threads} torch thread(s) per side, model {checkpoint}, batch "
          f"{args.batch} pairs, {args.steps} timed steps x {args.rounds} rounds, {tokens:.1f} "
          f"tokens/pair (longest sequence {max(lengths)}); float32 {2048}^2 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s wall, {peak_cpu / 1e9:.1f} GFLOP/CPU-s (best of: "
          + " ".join(f"{p[0] / 1e9:.1f}/{p[1] / 1e9:.1f}" for p in peaks)
          + "); rates are medians over rounds")
    print(f"rayalign's packed pairs (train.pack_pairs) compute {packed / sum(lengths):.1%} of "
          f"these tokens (each pair's shared prefix once); FLOP figures count all of them, "
          f"the work both sides deliver")
    for reference, by_side in results.items():
        print(f"\n[{reference} reference]  model GFLOP/pair {flops[reference] / 1e9:.2f}")
        print(f"{'':10} {'pairs/s':>8} {'tokens/s':>9} {'pairs/cpu-s':>12} {'GFLOP/s':>8} "
              f"{'of peak':>8} {'GFLOP/cpu-s':>12} {'of peak':>8} {'peak RSS MB':>12}")
        for side, values in by_side.items():
            wall = statistics.median(v["wall"] for v in values)
            cpu = statistics.median(v["cpu"] for v in values)
            rate, rate_cpu = wall * flops[reference], cpu * flops[reference]
            rss = max(v["rss_mb"] for v in values)
            print(f"{side:10} {wall:8.2f} {wall * tokens:9.0f} {cpu:12.3f} {rate / 1e9:8.1f} "
                  f"{rate / peak:8.0%} {rate_cpu / 1e9:12.1f} {rate_cpu / peak_cpu:8.0%} "
                  f"{rss:12.0f}")
        for key in ("wall", "cpu", "rss_mb"):
            ratios = [a[key] / b[key] for a, b in zip(by_side["rayalign"], by_side["trl"])]
            print(f"ratio rayalign / trl ({key}): {statistics.median(ratios):.2f}x  (rounds: "
                  + " ".join(f"{r:.2f}" for r in ratios) + ")")
        for side, values in by_side.items():
            print(f"load average (1 min) at start-end of each {side} measurement: "
                  + ", ".join(f"{v['load'][0]:.0f}-{v['load'][1]:.0f}" for v in values))


def main() -> None:
    args = parse_args()
    data = DataConfig(path="bench", kind="preference", max_prompt_length=args.max_length // 2,
                      max_length=args.max_length)
    if args.side:  # one measurement in a fresh process, so the two sides never share state
        torch.set_num_threads(args.threads)
        rows = json.loads(Path(args.rows).read_text())
        if not args.profile:
            print("RESULT " + json.dumps(SIDES[args.side](args.checkpoint, rows, args, data)))
            return
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:  # the whole process, loading too
            result = SIDES[args.side](args.checkpoint, rows, args, data)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print("RESULT " + json.dumps(result))
        return
    n = args.batch * _total_steps(args)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(build_tiny_checkpoint(
            Path(tmp) / "tiny", toytask.corpus(), hidden_size=args.hidden_size,
            num_layers=args.layers))
        tokenizer = load_tokenizer(checkpoint)
        rows = (pack_rows(args.data, tokenizer, args.pack, n) if args.data
                else toytask.make_preference_rows(n, 0))
        lengths, packed = _lengths(tokenizer, rows, data)
        files = {"live": Path(tmp) / "rows.json", "precomputed": Path(tmp) / "rows_ref.json"}
        files["live"].write_text(json.dumps(rows))
        if "precomputed" in args.reference:
            add_ref_columns(checkpoint, rows, data, args.batch)
            files["precomputed"].write_text(json.dumps(rows))
        flops = {r: model_flops_per_pair(checkpoint, lengths, r == "live") for r in args.reference}
        results = {r: {side: [] for side in SIDES} for r in args.reference}
        peaks = []
        for i in range(args.rounds):  # alternate, so load changes on the machine hit both
            peaks.append(matmul_peak(args.threads))
            for reference in args.reference:
                order = list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]
                for side in order:
                    results[reference][side].append(
                        run_side(side, reference, checkpoint, str(files[reference])))
                    print(f"round {i} {reference} {side}: {results[reference][side][-1]}",
                          file=sys.stderr, flush=True)
        peaks.append(matmul_peak(args.threads))
        report(args, checkpoint, results, flops, peaks, lengths, packed)


if __name__ == "__main__":
    main()
