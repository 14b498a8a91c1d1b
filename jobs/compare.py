"""Compare methods: several arms of one job, several seeds, mean ± std tables (issue 13).

    python jobs/compare.py --config configs/compare/ld_align.yaml   # LD-Align vs SPIN vs SFT
    python jobs/compare.py --config configs/compare/hbat.yaml       # Hbat and its baselines
    python jobs/compare.py --config configs/compare/ld_align.yaml --set seeds=[0,1]
    python jobs/compare.py --config configs/compare/ld_align.yaml --report   # tables so far

Every arm is the config's `base` job config plus its overrides, run once per seed in its own
resumable run directory under `run_dir`; re-running the same command after a kill skips the
finished arms and resumes the interrupted one. It ends with one table per metric (mean ±
sample std over seeds per arm and iteration), per_seed.csv, plots and comparison.md in
`run_dir` (orchestration/compare.py). On a laptop this starts a local Ray; under
`ray job submit` (RAY_ADDRESS is set) it attaches to the cluster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The submitted working directory's code, not an older installed copy, is what runs.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayalign.cli import exit_on_input_error, parse_job_config  # noqa: E402
from rayalign.compare import CompareConfig, check_arm_inputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    # --arm / --seed: one arm of a `parallel` comparison, run by its driver (not recorded here)
    child = argparse.ArgumentParser(add_help=False)
    child.add_argument("--arm")
    child.add_argument("--seed", type=int)
    child.add_argument("--report", action="store_true",
                       help="only write the tables and plots of the arms finished so far")
    only, argv = child.parse_known_args(argv)
    cfg = parse_job_config(CompareConfig, __doc__.splitlines()[0], argv,
                           str(ROOT / "configs" / "compare" / "ld_align.yaml"))
    with exit_on_input_error():
        check_arm_inputs(cfg)  # every arm's model paths and data rows, before Ray
    # torch, transformers and Ray only now, after the input checks
    from actors.runtime import init_ray
    from orchestration.compare import CompareRunner
    from rayalign.compare import comparison_markdown

    start = time.time()
    with exit_on_input_error():  # a run_dir made by another comparison: named before Ray starts
        runner = CompareRunner(cfg, log=lambda line: print(line, flush=True))
    if only.report:  # no Ray: the recorded arms' rows only
        table = runner.report()
        print(comparison_markdown(f"Comparison: {cfg.job}", table, list(cfg.arms), cfg.seeds,
                                  cfg.metrics))
        return 0
    init_ray()
    if only.arm is not None:
        runner.run_one(only.arm, only.seed)
        return 0
    print(f"compare: run_dir={Path(cfg.run_dir).absolute()} job={cfg.job} "
          f"arms={list(cfg.arms)} seeds={list(cfg.seeds)}", flush=True)
    with exit_on_input_error():  # an arm changed since it finished
        table = runner.run_all()
    print("\n" + comparison_markdown(f"Comparison: {cfg.job}", table, list(cfg.arms), cfg.seeds,
                                     cfg.metrics))
    print(f"comparison: {runner.run.path('comparison.md')}  ({time.time() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
