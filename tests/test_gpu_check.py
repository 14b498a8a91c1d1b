"""bench/gpu_check.py --cpu --tiny: the GPU check's code path runs in CI (on the CPU).

The figures on a tiny random model only show that every section runs and agrees with
itself: the DPO loss of policy = reference at initialisation is ln 2 (the lr of 1e-6 barely
moves it in two steps), the chunked log-probs equal the naive log-softmax to bf16 rounding
of the logits (~1e-2 relative on sums of 16 tokens: abs 0.05), and bf16 vs fp32 weights
give DPO losses within 0.01 of each other.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--tiny",
                    "--out", str(tmp_path)], check=True, timeout=600, cwd=tmp_path)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"dpo_step", "logprobs", "sampling", "guide", "bf16_vs_fp32"}
    assert abs(sections["dpo_step"]["loss"] - math.log(2)) < 1e-3
    assert sections["dpo_step"]["tokens_per_s"] > 0 and sections["dpo_step"]["mfu"] is None
    assert sections["logprobs"]["max_abs_diff"] < 0.05
    assert sections["sampling"]["new_tokens"] == 2 * 8
    assert sections["guide"]["pairs_per_s"] > 0
    assert sections["bf16_vs_fp32"]["loss_abs_diff"] < 0.01
    assert "| dpo_step | tokens_per_s |" in (tmp_path / "gpu_check.md").read_text()
