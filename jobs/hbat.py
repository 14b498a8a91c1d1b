"""Hbat: alternating SFT / preference training with the modified EWC (Hbat, Algorithm 1).

    python jobs/hbat.py                                   # embedded tiny default, local Ray, CPU
    python jobs/hbat.py --config configs/hbat.yaml --set variant=sequential --set run_dir=runs/seq
    ray job submit --working-dir . -- python jobs/hbat.py --config ...

Variants: hbat, hbat_freeze, no_ewc, no_alternating, sequential (rayalign.config_hbat.HBAT_VARIANTS).
On a laptop this starts a local Ray; under `ray job submit` (RAY_ADDRESS is set) it attaches to
the cluster. Re-running with the same run_dir resumes after the last finished phase.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# The submitted working directory's code, not an older installed copy, is what runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayalign.cli import exit_on_input_error, parse_job_config  # noqa: E402
from rayalign.config_hbat import HbatConfig  # noqa: E402

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "hbat.yaml")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_config(HbatConfig, __doc__.splitlines()[0], argv, DEFAULT_CONFIG)
    # torch, transformers and Ray only now, after the input checks (a second, not ten)
    from orchestration.hbat import run_hbat
    from actors.runtime import init_ray
    from rayalign.hbat import fingerprint, summary_table
    from rayalign.rundir import check_resumable

    with exit_on_input_error():  # a run_dir made by another config: named before Ray starts
        check_resumable(cfg.run_dir, fingerprint(cfg))
    init_ray()
    start = time.time()
    print(f"Hbat: run_dir={Path(cfg.run_dir).absolute()} variant={cfg.variant} "
          f"N={cfg.num_splits} preference={cfg.preference.objective} "
          f"workers={cfg.sft.num_workers} zero={cfg.sft.zero_stage}", flush=True)
    rows = run_hbat(cfg)
    print("\n" + summary_table(rows))
    print(f"\npolicy: {Path(cfg.run_dir).absolute() / 'policy'}  ({time.time() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
