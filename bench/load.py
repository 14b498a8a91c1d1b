"""Load shedding under overload: both services at 256 connections on loopback, in one run.

    .venv/bin/python bench/load.py                               # 2,000 requests per run
    .venv/bin/python bench/load.py --requests 4000 --connections 512

Starts a local Ray, deploys the scoring app (POST /v1/distances, tiny guide) and the sampler
(POST /v1/completions, tiny policy), each twice: with the shipped load shedding
(`http.max_ongoing_requests` / `http.max_queued_requests` of configs/*.yaml) and with
shedding made ineffective (queue and concurrency far above the load: what the services did
before issue 15). `--connections` clients send `--requests` requests back to back, with the
bearer token. Counts every status (anything but 200 and 503 is an error) and the latency of
served (200) and shed (503) requests; writes bench/results/load.md.

Latency bound: a served request waited behind at most ``max_ongoing + max_queued`` requests,
so its latency is at most about ``(max_ongoing + max_queued) / throughput`` (reported as the
bound), while without shedding every request queues behind all `--connections`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench.scoring import bench_guide, make_requests  # noqa: E402
from rayalign import toytask  # noqa: E402
from rayalign.config import (  # noqa: E402
    HTTPServiceConfig, ResourcesConfig, SamplerServiceConfig, SamplingConfig, ScoringConfig,
    load_config,
)
from rayalign.tiny import build_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "load.md"
TOKEN = "bench-load-token"
UNBOUNDED = {"max_ongoing_requests": 100_000, "max_queued_requests": 100_000}


async def drive(url: str, bodies: list[dict], connections: int, requests: int) -> dict:
    """`connections` workers send `requests` POSTs back to back; statuses and latencies."""
    statuses: Counter = Counter()
    served, shed = [], []

    async def worker(client: httpx.AsyncClient, tickets) -> None:
        for i in tickets:
            start = time.perf_counter()
            try:
                status = (await client.post(url, json=bodies[i % len(bodies)])).status_code
            except httpx.HTTPError as err:
                status = type(err).__name__
            statuses[status] += 1
            (served if status == 200 else shed if status == 503 else []).append(
                time.perf_counter() - start)

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers) as client:
        tickets, start = iter(range(requests)), time.perf_counter()
        await asyncio.gather(*(worker(client, tickets) for _ in range(connections)))
        wall = time.perf_counter() - start

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(np.array(xs) * 1000, q)) if xs else None

    return {"statuses": dict(statuses), "seconds": wall, "served_rps": len(served) / wall,
            "served_p50_ms": pct(served, 50), "served_p99_ms": pct(served, 99),
            "served_max_ms": pct(served, 100), "shed_p99_ms": pct(shed, 99),
            "errors": sum(n for s, n in statuses.items() if s not in (200, 503))}


def run_case(app, name: str, route: str, path: str, bodies: list[dict], args) -> dict:
    from ray import serve

    serve.run(app, name=name, route_prefix=route)
    try:
        url = f"http://127.0.0.1:8000{route}{path}"
        asyncio.run(drive(url, bodies, 4, 16))  # warm-up
        return asyncio.run(drive(url, bodies, args.connections, args.requests))
    finally:
        serve.delete(name)


def cases(args, work: Path):
    from services import sampler, scoring

    guide = bench_guide(work, 64, 2)
    policy = str(build_tiny_checkpoint(work / "policy", toytask.corpus()))
    shipped = {"scoring": load_config(ScoringConfig, ROOT / "configs" / "scoring.yaml",
                                      [f"guide_path={guide}"]).http,
               "sampler": load_config(SamplerServiceConfig,
                                      ROOT / "configs" / "sampler_service.yaml",
                                      [f"model_path={policy}"]).http}
    items = make_requests(256, 4)
    prompts = [{"model": "tiny", "prompt": it["prompt"], "max_tokens": 8, "seed": i}
               for i, it in enumerate(items)]
    for service, label, extra in [(s, label, extra) for s in ("scoring", "sampler")
                                  for label, extra in (("shipped shedding", {}),
                                                       ("no shedding", UNBOUNDED))]:
        http = HTTPServiceConfig.model_validate({**shipped[service].model_dump(),
                                                 "auth_token": TOKEN, **extra})
        if service == "scoring":
            cfg = ScoringConfig(guide_path=guide, http=http, app_name="load-scoring",
                                route_prefix="/load-scoring", replicas=ResourcesConfig(num_cpus=1))
            app, path, bodies = scoring.build_app(cfg), "/v1/distances", items
        else:
            cfg = SamplerServiceConfig(model_path=policy, served_model_name="tiny", http=http,
                                       sampling=SamplingConfig(max_new_tokens=8, batch_size=16),
                                       app_name="load-sampler", route_prefix="/load-sampler")
            app, path, bodies = sampler.build_app(cfg), "/v1/completions", prompts
        result = run_case(app, cfg.app_name, cfg.route_prefix, path, bodies, args)
        queue = http.max_ongoing_requests + http.max_queued_requests
        result["bound_ms"] = 1000 * queue / result["served_rps"] if extra == {} else None
        result.update(service=service, case=label, max_ongoing=http.max_ongoing_requests,
                      max_queued=http.max_queued_requests)
        print(result, flush=True)
        yield result


def table(rows: list[dict], args) -> str:
    def ms(x):
        return "-" if x is None else f"{x:,.0f}"

    lines = [f"`bench/load.py --requests {args.requests} --connections {args.connections}` on "
             f"{platform.machine()} ({os.cpu_count()} CPUs, shared with other jobs), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. One replica per "
             "deployment, tiny models, loopback, bearer token.", "",
             "| service | case | max ongoing / queued | 200 | 503 | other | served req/s | "
             "served p50 ms | served p99 ms | served max ms | bound ms | shed p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["statuses"]
        lines.append(f"| {r['service']} | {r['case']} | {r['max_ongoing']:,} / {r['max_queued']:,}"
                     f" | {s.get(200, 0)} | {s.get(503, 0)} | {r['errors']} | "
                     f"{r['served_rps']:.1f} | {ms(r['served_p50_ms'])} | {ms(r['served_p99_ms'])} "
                     f"| {ms(r['served_max_ms'])} | {ms(r['bound_ms'])} | {ms(r['shed_p99_ms'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=256)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as work:
        rows = list(cases(args, Path(work)))
    ray.shutdown()
    text = table(rows, args)
    print(text)
    RESULTS.write_text("# Load shedding (bench/load.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
