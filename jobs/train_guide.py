"""Train LD-Align's guide T = (phi, psi) on SFT gold responses plus policy samples (Eq. 2).

    python jobs/train_guide.py --config configs/guide.yaml
    python jobs/train_guide.py --config configs/guide.yaml --set guide.latent_dim=32 --set out_dir=runs/g
    ray job submit --working-dir . -- python jobs/train_guide.py --config configs/guide.yaml

Writes `out_dir/` (guide checkpoint + metrics.json with the latent informativeness) atomically.
On a laptop this starts a local Ray; under `ray job submit` (RAY_ADDRESS is set) it attaches
to the cluster, and `workers` decides how many Ray Train workers (and CPUs/GPUs each) it uses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The submitted working directory's code, not an older installed copy, is what runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayalign.cli import parse_job_config  # noqa: E402
from rayalign.config_ldalign import GuideJobConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_config(GuideJobConfig, __doc__.splitlines()[0], argv)  # inputs checked
    # torch, transformers and Ray only now, after the input checks (a second, not ten)
    from actors.guide_trainer import METRICS_FILE, train_guide
    from actors.runtime import init_ray

    init_ray()
    out = train_guide(cfg.sft, cfg.samples, cfg.base_model, cfg.out_dir, cfg.guide, cfg.workers,
                      render_model=cfg.policy, log=lambda line: print(line, flush=True))
    metrics = json.loads((out / METRICS_FILE).read_text())
    across, within = metrics["informativeness"], metrics["within_prompt"]
    print(f"guide: {out}  informativeness within a prompt {within['gap']:.3f} nats/token "
          f"(nll own h {within['nll_true']:.3f}, other answer's h {within['nll_swapped']:.3f}), "
          f"across prompts {across['gap']:.3f} (nll true h {across['nll_true']:.3f}, "
          f"shuffled h {across['nll_shuffled']:.3f}); worker peak RSS "
          f"{metrics['peak_rss_gb']:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
