"""Supervised fine-tuning (objective sft) as a Ray Train + DeepSpeed job.

    python jobs/sft.py --set train.zero_stage=2

Tiny default: configs/sft.yaml; usage, config and resuming: jobs/_train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The submitted working directory's code, not an older installed copy, is what runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._train import training_job  # noqa: E402

OBJECTIVES = ("sft",)
main = training_job("sft", OBJECTIVES, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
