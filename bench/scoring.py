"""Throughput and latency of POST /v1/distances with dynamic batching on vs off, in one run.

    .venv/bin/python bench/scoring.py                      # tiny GPT-2-shaped guide, built here
    .venv/bin/python bench/scoring.py --guide runs/x/guide --clients 32 --requests 2000

Starts a local Ray, deploys the scoring app twice (`batching: true`, then `false`; same guide,
one replica with the same resources), and drives each with `--clients` concurrent HTTP
clients on loopback until `--requests` responses or `--seconds` have passed. Each request is
one item with a reference and `--candidates` candidates. With batching off it also drives
GET /healthz, the ceiling of the HTTP + Serve stack without any model work. Prints
requests/s, p50/p99 latency and the on/off throughput ratio, and writes them between the
markers of bench/results/scoring.md (the analysis around them is hand-written).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from rayalign import toytask  # noqa: E402
from rayalign.config import ResourcesConfig  # noqa: E402
from rayalign.config_ldalign import GuideConfig  # noqa: E402
from rayalign.config_services import HTTPServiceConfig, ScoringConfig  # noqa: E402
from rayalign.guide import GuideModel  # noqa: E402
from rayalign.io import atomic_file  # noqa: E402
from rayalign.tiny import build_tiny_checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scoring.md"
START, END = "<!-- bench/scoring.py: start -->", "<!-- bench/scoring.py: end -->"


def bench_guide(workdir: Path, hidden_size: int, num_layers: int) -> str:
    """An untrained guide of the given size (throughput does not depend on training)."""
    base = build_tiny_checkpoint(workdir / "base", toytask.corpus(), hidden_size=hidden_size,
                                 num_layers=num_layers)
    return str(GuideModel.create(GuideConfig(), str(base), 64, 128).save(workdir / "guide"))


def make_requests(n: int, candidates: int, seed: int = 0) -> list[dict]:
    """Distinct toy-task items: a gold answer and `candidates` near misses each."""
    rng, out = random.Random(seed), []
    for row in toytask.make_rows(n, seed):
        gold = row["completion"].split()
        cands = []
        for _ in range(candidates):
            c = gold[:]
            rng.shuffle(c)
            cands.append(" " + " ".join(c[: rng.randint(1, len(c))]))
        out.append({"prompt": row["prompt"], "reference": row["completion"], "candidates": cands})
    return out


async def drive(url: str, bodies: list[dict] | None, clients: int, max_requests: int,
                max_seconds: float) -> dict:
    """`clients` workers send requests back to back (POST bodies, or GET when `bodies` is None);
    returns throughput and latency figures."""
    latencies: list[float] = []
    errors = 0

    async def worker(client: httpx.AsyncClient, tickets, deadline: float):
        nonlocal errors
        for i in tickets:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            response = await (client.get(url) if bodies is None
                              else client.post(url, json=bodies[i % len(bodies)]))
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        warmup = iter(range(2 * clients))
        await asyncio.gather(*(worker(client, warmup, math.inf) for _ in range(clients)))
        latencies.clear()
        errors = 0
        tickets, start = iter(range(max_requests)), time.perf_counter()
        await asyncio.gather(*(worker(client, tickets, start + max_seconds)
                               for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "seconds": wall,
            "rps": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def run_mode(guide_path: str, batching: bool, args, bodies: list[dict]) -> dict[str, dict]:
    """Deploy the app with `batching` and drive /v1/distances; with batching off, also GET
    /healthz (the serving stack's ceiling without the model)."""
    from ray import serve

    from services.scoring import build_app

    cfg = ScoringConfig(
        guide_path=guide_path, app_name="scoring-bench", route_prefix="/scoring-bench",
        batching=batching, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s, replicas=ResourcesConfig(num_cpus=1),
        http=HTTPServiceConfig(max_ongoing_requests=args.clients * 2,
                               max_queued_requests=args.clients * 2),
    )
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    base = f"http://127.0.0.1:8000{cfg.route_prefix}"
    budget = (args.clients, args.requests, args.seconds)
    try:
        out = {"on" if batching else "off": asyncio.run(drive(f"{base}/v1/distances", bodies, *budget))}
        if not batching:
            out["no model: GET /healthz"] = asyncio.run(drive(f"{base}/healthz", None, *budget))
        return out
    finally:
        serve.delete(cfg.app_name)


def encoder_only(guide_path: str, bodies: list[dict], clients: int, max_batch_size: int,
                 seconds: float = 3.0) -> dict[str, float]:
    """Requests/s of the encoder alone on one thread (as in a num_cpus=1 replica): each
    request's pairs in their own call (batching off) vs `clients` requests' pairs in one call."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    guide = GuideModel.load(guide_path, decoder=False)
    groups = [[(b["prompt"], r) for r in [b["reference"], *b["candidates"]]]
              for b in bodies[:clients]]
    flat = [pair for group in groups for pair in group]

    def rate(step) -> float:
        step()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            done += len(groups)
        return done / (time.perf_counter() - start)

    out = {"per request": rate(lambda: [guide.embed(*zip(*g)) for g in groups]),
           f"{clients} requests per call": rate(lambda: guide.embed(*zip(*flat), max_batch_size))}
    torch.set_num_threads(threads)
    return out


def report(results: dict[str, dict], encoder: dict[str, float], args, ratio: float) -> str:
    lines = [
        "| batching | requests | errors | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    lines += ["", "| encoder alone, 1 thread | req/s |", "|---|---:|"]
    lines += [f"| {mode} | {rps:.1f} |" for mode, rps in encoder.items()]
    lines.append("")
    lines.append(f"throughput ratio on/off: **{ratio:.1f}x**  ({args.clients} clients, "
                 f"{args.candidates} candidates per request, guide hidden {args.hidden_size} x "
                 f"{args.num_layers} layers, max_batch_size {args.max_batch_size}, "
                 f"batch_wait_timeout_s {args.batch_wait_timeout_s}; "
                 f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()})")
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    """Replace the text between the bench markers of `path` (the rest is hand-written)."""
    body = path.read_text() if path.exists() else f"{START}\n{END}\n"
    if START not in body or END not in body:
        raise SystemExit(f"{path}: missing the markers {START} / {END}")
    head, rest = body.split(START, 1)
    with atomic_file(path) as tmp:
        tmp.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guide", help="guide checkpoint; default: build an untrained one")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000, help="per mode, at most")
    parser.add_argument("--seconds", type=float, default=60.0, help="per mode, at most")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--write", default=str(RESULTS), help="results markdown ('' = don't)")
    args = parser.parse_args(argv)

    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a stray cluster
    bodies = make_requests(256, args.candidates)
    with tempfile.TemporaryDirectory() as tmp:
        guide = args.guide or bench_guide(Path(tmp), args.hidden_size, args.num_layers)
        results = {**run_mode(guide, True, args, bodies), **run_mode(guide, False, args, bodies)}
        encoder = encoder_only(guide, bodies, args.clients, args.max_batch_size)
    ratio = results["on"]["rps"] / results["off"]["rps"]
    table = report(results, encoder, args, ratio)
    print(table)
    if args.write:
        command = " ".join(["bench/scoring.py", *(sys.argv[1:] if argv is None else argv)])
        write_results(Path(args.write), f"`{command}`\n\n{table}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
