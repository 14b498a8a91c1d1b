"""AOT distributional preference alignment (aot, aot_unpaired) as a Ray Train + DeepSpeed job.

    python jobs/aot.py --set train.objective=aot_unpaired

Tiny default: configs/aot.yaml; usage, config and resuming: jobs/_train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The submitted working directory's code, not an older installed copy, is what runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._train import training_job  # noqa: E402

OBJECTIVES = ("aot", "aot_unpaired")
main = training_job("aot", OBJECTIVES, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
