"""Samples/s of the HF sampling engine: batched vs one prompt at a time, in one run.

    .venv/bin/python bench/sampling.py [--prompts 32] [--batch-size 32] [--max-new-tokens 32]
                                       [--hidden-size 256] [--layers 4] [--device cpu] [--repeats 2]
                                       [--threads 1]

Builds a random-init GPT-2 of the given size with rayalign.tiny (no download), samples the
same toy-task prompts with the same per-prompt seeds three ways and prints samples/s:

- ``one at a time``: `HFEngine.generate` called once per prompt (batch of 1);
- ``batched``: one call, `--batch-size` prompts per ``generate`` (left-padded);
- ``batched, HF do_sample``: the same batches through plain ``model.generate(do_sample=True)``
  with one global RNG: the cost of the engine's per-row seeded streams is the gap to it.

It also checks that the batched and one-at-a-time samples are identical (per-row seeds make a
sample independent of its batch), so the speed-up is not bought with different outputs.
A random model rarely emits EOS, so every sample has exactly --max-new-tokens tokens.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from rayalign import toytask
from rayalign.config import SamplingConfig
from rayalign.sampling import HFEngine, derive_seed, prompt_token_ids
from rayalign.tiny import build_tiny_checkpoint


def _rate(fn, samples: int) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return samples / (time.perf_counter() - start), out


def _native_batched(engine: HFEngine, prompts: list[str], cfg: SamplingConfig) -> None:
    """Plain HF sampling of the same batches (global RNG), for the overhead comparison."""
    tok = engine.tokenizer
    for start in range(0, len(prompts), cfg.batch_size):
        ids = [prompt_token_ids(tok, p, None) for p in prompts[start:start + cfg.batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(x) for x in ids])[:, None])
        engine.model.generate(input_ids=input_ids.to(engine.device),
                              attention_mask=mask.long().to(engine.device), do_sample=True,
                              temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="best of N interleaved runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 = as a Ray sampler actor with num_cpus=1 runs")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SamplingConfig(engine="hf", max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, temperature=1.0, seed=0)
    prompts = [r["prompt"] for r in toytask.make_rows(args.prompts, seed=0)]
    seeds = [derive_seed(cfg.seed, i) for i in range(len(prompts))]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(f"{tmp}/policy", toytask.corpus(), hidden_size=args.hidden_size,
                                     num_layers=args.layers)
        engine = HFEngine(str(path), cfg, device=args.device)
    params = sum(p.numel() for p in engine.model.parameters())
    engine.generate(prompts[:2], seeds[:2])  # warm-up

    rates: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, best of: robust to a busy machine
        for name, fn in (
            ("one", lambda: [engine.generate([p], [s])[0] for p, s in zip(prompts, seeds)]),
            ("batched", lambda: engine.generate(prompts, seeds)),
            ("native", lambda: _native_batched(engine, prompts, cfg)),
        ):
            rate, out = _rate(fn, len(prompts))
            rates[name] = max(rate, rates.get(name, 0.0))
            if name == "one":
                one_by_one = out
            elif name == "batched":
                together = out
    single, batched, native = rates["one"], rates["batched"], rates["native"]

    print(f"model: GPT-2, {params / 1e6:.1f}M params, hidden {args.hidden_size}, "
          f"{args.layers} layers, {args.device}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, batch size "
          f"{args.batch_size}, best of {args.repeats}")
    print(f"one at a time          {single:8.1f} samples/s")
    print(f"batched                {batched:8.1f} samples/s")
    print(f"batched, HF do_sample  {native:8.1f} samples/s")
    print(f"batched / one at a time = {batched / single:.2f}x; "
          f"per-row seeded streams cost {100 * (1 - batched / native):.0f}% vs global-RNG sampling")
    print(f"batched samples identical to one-at-a-time samples: {together == one_by_one}")


if __name__ == "__main__":
    main()
