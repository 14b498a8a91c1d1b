"""DPO-family preference training (dpo, weighted_dpo, ipo, kto) as a Ray Train + DeepSpeed job.

    python jobs/dpo.py --set train.objective=ipo
    python jobs/dpo.py --set train.objective=kto      # unpaired (prompt, completion, label) rows

Tiny default: configs/dpo.yaml; usage, config and resuming: jobs/_train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The submitted working directory's code, not an older installed copy, is what runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._train import training_job  # noqa: E402

OBJECTIVES = ("dpo", "weighted_dpo", "ipo", "kto")
main = training_job("dpo", OBJECTIVES, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
