"""LD-Align: latent-distance guided, annotation-free iterative DPO (LD-Align, Algorithm 1).

    python jobs/ld_align.py                                  # embedded tiny default, local Ray, CPU
    python jobs/ld_align.py --config configs/tiny.yaml --set iterations=3
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/ld_align.py --config ...

On a laptop this starts a local Ray; under `ray job submit` (RAY_ADDRESS is set) it attaches to
the cluster. Re-running with the same run_dir resumes at the first unfinished stage.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# The submitted working directory's code, not an older installed copy, is what runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayalign.cli import exit_on_input_error, parse_job_config  # noqa: E402
from rayalign.config_ldalign import LDAlignConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_config(LDAlignConfig, __doc__.splitlines()[0], argv)  # inputs checked
    # torch, transformers and Ray only now, after the input checks (a second, not ten)
    from actors.runtime import init_ray
    from orchestration.controller import GuideNotInformative, LDAlignController
    from rayalign.report import summary_table, training_table

    start = time.time()
    with exit_on_input_error():  # a run_dir made by another config: named before Ray starts
        controller = LDAlignController(cfg, log=lambda line: print(line, flush=True))
    init_ray()
    print(f"LD-Align: run_dir={Path(cfg.run_dir).absolute()} iterations={cfg.iterations} "
          f"weights={cfg.weights}", flush=True)
    try:
        rows = controller.run_all()
    except GuideNotInformative as err:  # the gate: stop before any pairs, say what to change
        print(f"error: {err}", file=sys.stderr)
        return 3
    print("\n" + summary_table(rows) + "\n\n" + training_table(rows))
    print(f"\nreport: {controller.run.path('report', 'summary.md')}  "
          f"({time.time() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
