"""The LD-Align run report: a per-iteration summary table, plots and a Markdown file.

One row per policy theta_t (t = 0 is the SFT starting point): the held-out task metric and the
mean latent distance of its greedy samples to gold, and, for t >= 1, the training statistics
of the weighted-DPO update that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .io import atomic_file

COLUMNS = (
    ("policy", "policy"),
    ("eval_exact_match", "exact match"),
    ("eval_mean_distance", "mean distance"),
    ("train_loss", "train loss"),
    ("train_reward_margin", "reward margin"),
    ("train_reward_accuracy", "reward acc"),
)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_table(rows: Sequence[dict]) -> str:
    """A Markdown table of the per-iteration rows (missing values shown as '-')."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r.get(key)) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_report(out_dir: str | Path, rows: Sequence[dict],
                 distances: dict[str, Sequence[float]]) -> Path:
    """Write summary.md, metrics.png and distances.png into `out_dir`; return summary.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = range(len(rows))
    for ax, key, title in ((axes[0], "eval_exact_match", "held-out exact match"),
                           (axes[1], "eval_mean_distance", "mean latent distance to gold")):
        ax.plot(steps, [r.get(key) for r in rows], marker="o")
        ax.set_xticks(list(steps), [r["policy"] for r in rows])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(out / "metrics.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in distances.items():
        ax.hist(list(values), bins=20, alpha=0.5, label=name)
    ax.set_xlabel("latent distance of sample to gold")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out / "distances.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

    summary = out / "summary.md"
    with atomic_file(summary) as tmp:
        tmp.write_text("# LD-Align run summary\n\n" + summary_table(rows)
                       + "\n\n![metrics](metrics.png)\n\n![distances](distances.png)\n")
    return summary
