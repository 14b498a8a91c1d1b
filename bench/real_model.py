"""LD-Align on a real pretrained model: run the job, measure seconds and peak RSS per stage.

    python bench/prepare_real.py --out /work/real          # once: model + dialogs, offline
    python bench/real_model.py --config configs/ld_align_smollm2.yaml [--set key=value ...]

Starts `jobs/ld_align.py` with the given config in its own process group and samples, every
second, the resident memory of the job's whole process tree (driver, Ray's daemons, every
actor and Ray Train worker) against the stage the run's manifest says is running. Prints, and
writes to ``<run_dir>/bench.json``: per stage the seconds (from the manifest), the largest
single process (and its name: the guide stage's is the Ray Train worker), the largest sum over
the tree, and the stage metrics (informativeness, §5.2 correlations, ...), plus the load
average before and after (the machine may be shared). The job's own output passes through.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayalign.config import load_config  # noqa: E402
from rayalign.config_ldalign import LDAlignConfig  # noqa: E402


def _tree_rss(pid: int) -> list[tuple[str, int]]:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            cmd = p.cmdline()
            out.append(((cmd[0] if cmd else p.name())[:60],
                        p.memory_info().rss))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _running(manifest: Path) -> str:
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return "startup"
    return data.get("running", "between stages")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(LDAlignConfig, args.config, args.overrides)
    run_dir = Path(cfg.run_dir)
    cmd = [sys.executable, str(ROOT / "jobs" / "ld_align.py"), "--config", args.config]
    cmd += [x for o in args.overrides for x in ("--set", o)]
    load_before, start = os.getloadavg(), time.time()
    job = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    peaks: dict[str, dict] = {}
    while job.poll() is None:
        stage = _running(run_dir / "manifest.json")
        rss = _tree_rss(job.pid)
        if rss:
            name, biggest = max(rss, key=lambda r: r[1])
            peak = peaks.setdefault(stage, {"max_process_gb": 0.0, "max_total_gb": 0.0})
            if biggest / 2**30 > peak["max_process_gb"]:
                peak.update(max_process_gb=biggest / 2**30, max_process=name)
            peak["max_total_gb"] = max(peak["max_total_gb"], sum(r for _, r in rss) / 2**30)
        time.sleep(1.0)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    result = {"config": args.config, "overrides": args.overrides, "returncode": job.returncode,
              "wall_seconds": round(time.time() - start, 1), "load_before": load_before,
              "load_after": os.getloadavg(), "stages": {}}
    for name, entry in manifest["stages"].items():
        result["stages"][name] = {"seconds": entry["seconds"], "metrics": entry["metrics"],
                                  **peaks.get(name, {})}
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'stage':<22}{'seconds':>9}{'peak proc GB':>14}{'peak tree GB':>14}  process")
    for name, row in result["stages"].items():
        print(f"{name:<22}{row['seconds']:>9.1f}{row.get('max_process_gb', 0):>14.2f}"
              f"{row.get('max_total_gb', 0):>14.2f}  {row.get('max_process', '')}")
    print(f"wall {result['wall_seconds']}s, load average before {load_before}, after "
          f"{result['load_after']}; {run_dir / 'bench.json'}")
    return job.returncode


if __name__ == "__main__":
    raise SystemExit(main())
