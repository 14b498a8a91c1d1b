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

Latency bound (services/http.py): a served request waits behind at most
``max_ongoing * replicas + max_queued`` others (held by the replicas, in arrival order, plus
the proxy's queue), so its latency is at most about that over the throughput (reported as
the bound; one engine call more at most), while without shedding every request queues
behind all `--connections`. 503s are counted by who answered: Serve's router (plain text) or
the app (its error body; the sampler's ingress when its sampler deployment is full). Each
latency is also read from Serve's proxy access log, which leaves out the client. The 1-minute
load average of the machine is read before and after each case: the bound holds only while
the proxy and this client get CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
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
from rayalign.config import ResourcesConfig, SamplingConfig, load_config  # noqa: E402
from rayalign.config_services import (  # noqa: E402
    HTTPServiceConfig, SamplerServiceConfig, ScoringConfig,
)
from rayalign.tiny import build_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "load.md"
TOKEN = "bench-load-token"
UNBOUNDED = {"max_ongoing_requests": 100_000, "max_queued_requests": 100_000}


async def drive(url: str, bodies: list[dict], connections: int, requests: int) -> dict:
    """`connections` workers send `requests` POSTs back to back; statuses and latencies."""
    statuses: Counter = Counter()
    served, shed, by_app = [], [], 0

    async def worker(client: httpx.AsyncClient, tickets) -> None:
        nonlocal by_app
        for i in tickets:
            start = time.perf_counter()
            try:
                response = await client.post(url, json=bodies[i % len(bodies)])
                status = response.status_code
                by_app += status == 503 and b"overloaded" in response.content
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
            "shed_by_app": by_app,
            "errors": sum(n for s, n in statuses.items() if s not in (200, 503))}


def proxy_logs() -> dict[Path, int]:
    """Serve's proxy access logs of this Ray session and their sizes now."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return {log: log.stat().st_size for log in (session / "logs" / "serve").glob("proxy_*.log")}


def proxy_view(since: dict[Path, int], route: str) -> dict:
    """Latency as Serve's proxy logged it (from the proxy's handler to the answer), for the
    lines about `route` written after `since`: what the client adds is outside it."""
    ms: dict[int, list[float]] = {200: [], 503: []}
    for log in proxy_logs():
        with open(log, "rb") as f:
            f.seek(since.get(log, 0))
            text = f.read().decode("utf-8", "replace")
        for status, value in re.findall(rf"POST {re.escape(route)} (\d+) ([\d.]+)ms", text):
            ms.setdefault(int(status), []).append(float(value))

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    return {"proxy_logged": sum(len(v) for v in ms.values()),
            "proxy_served_p50_ms": pct(ms[200], 50), "proxy_served_p99_ms": pct(ms[200], 99),
            "proxy_shed_p99_ms": pct(ms[503], 99)}


def run_case(app, name: str, route: str, path: str, bodies: list[dict], args) -> dict:
    from ray import serve

    serve.run(app, name=name, route_prefix=route)
    try:
        url = f"http://127.0.0.1:8000{route}{path}"
        asyncio.run(drive(url, bodies, 4, 16))  # warm-up
        load, since = os.getloadavg()[0], proxy_logs()
        result = asyncio.run(drive(url, bodies, args.connections, args.requests))
        load = (load, os.getloadavg()[0])
        time.sleep(5)  # the proxy writes its access log in batches
        return {**result, **proxy_view(since, route + path), "load": load}
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
    for service, label, extra in [(s, label, extra) for s in args.services
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
        route = f"{cfg.route_prefix}-{'shed' if extra == {} else 'unbounded'}"
        result = run_case(app, cfg.app_name, route, path, bodies, args)
        ingresses = cfg.replicas.num_actors if service == "scoring" else 1  # sampler: 1 ingress
        held = http.max_ongoing_requests * ingresses + http.max_queued_requests  # one proxy
        result["bound_ms"] = 1000 * held / result["served_rps"] if extra == {} else None
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
             "| service | case | max ongoing / queued | 200 | 503 (by the app) | other | "
             "served req/s | served p50 ms | served p99 ms | served max ms | bound ms | "
             "shed p99 ms | proxy: served p50 / p99 ms, shed p99 ms | load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["statuses"]
        lines.append(f"| {r['service']} | {r['case']} | {r['max_ongoing']:,} / {r['max_queued']:,}"
                     f" | {s.get(200, 0)} | {s.get(503, 0)} ({r['shed_by_app']}) | {r['errors']} | "
                     f"{r['served_rps']:.1f} | {ms(r['served_p50_ms'])} | {ms(r['served_p99_ms'])} "
                     f"| {ms(r['served_max_ms'])} | {ms(r['bound_ms'])} | {ms(r['shed_p99_ms'])} "
                     f"| {ms(r['proxy_served_p50_ms'])} / {ms(r['proxy_served_p99_ms'])}, "
                     f"{ms(r['proxy_shed_p99_ms'])} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--services", nargs="+", choices=("scoring", "sampler"),
                        default=["scoring", "sampler"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as work:
        rows = list(cases(args, Path(work)))
    ray.shutdown()
    text = table(rows, args)
    print(text)
    args.out.write_text("# Load shedding (bench/load.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
