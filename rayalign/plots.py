"""The report's PNGs (matplotlib, Agg backend), each written atomically.

- metrics.png: every held-out metric per policy theta_t;
- distances.png: histograms of the guide's latent distance of samples to gold;
- correlation.png: the LD-Align paper's §5.2 sanity check, latent distance s vs independent
  dissimilarities to gold (1 - cosine, 1 - ROUGE-L), with their Spearman correlations;
- training.png: per-step training curves (loss, reward margin, reward accuracy) per stage;
- jobs/compare.py's metrics.png (each metric by iteration per arm, the seeds' spread
  shaded), tradeoff.png (two metrics per arm at its last iteration, with error bars) and
  quantiles.png (held-out chosen vs rejected implied-reward quantiles per arm, AOT Fig. 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .io import atomic_file

CURVES = (("loss", "loss"), ("margin", "reward margin"), ("accuracy", "reward accuracy"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)
    return path


def _grid(plt, panels: int, width: float = 3.2, height: float = 2.6):
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_metrics(path: str | Path, rows: Sequence[Mapping],
                 columns: Sequence[tuple[str, str]]) -> Path:
    """One panel per metric of `columns` that some row has, its value per policy."""
    plt = _pyplot()
    shown = [(k, t) for k, t in columns if any(r.get(k) is not None for r in rows)]
    fig, axes = _grid(plt, len(shown))
    names = [str(r["policy"]) for r in rows]
    for ax, (key, title) in zip(axes, shown):
        ax.plot(range(len(rows)), [r.get(key) for r in rows], marker="o")
        ax.set_xticks(range(len(rows)), names)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_distances(path: str | Path, distances: Mapping[str, Sequence[float]]) -> Path:
    """Histograms of each policy's latent distances of samples to gold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in distances.items():
        ax.hist(list(values), bins=20, alpha=0.5, label=name)
    ax.set_xlabel("latent distance of sample to gold")
    ax.set_ylabel("count")
    ax.legend()
    return _save(fig, Path(path))


def plot_correlation(path: str | Path, scored: Mapping[str, Mapping[str, Sequence]],
                     corr: Mapping[tuple[str, str], tuple[float | None, int]]) -> Path:
    """Scatter of latent distance s vs 1 - measure per measure, one colour per policy."""
    plt = _pyplot()
    measures = sorted({m for _, m in corr})
    fig, axes = _grid(plt, len(measures), width=4.5, height=3.5)
    for ax, measure in zip(axes, measures):
        for (policy, m), (rho, n) in corr.items():
            if m != measure:
                continue
            cols = scored[policy]
            ax.scatter(cols["distance"], [1 - v for v in cols[measure]], s=8, alpha=0.6,
                       label=f"{policy} (rho={'-' if rho is None else f'{rho:.2f}'})")
        ax.set_xlabel("latent distance s")
        ax.set_ylabel(f"1 - {measure}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_curves(path: str | Path, curves: Mapping[str, Sequence[Mapping]]) -> Path:
    """Per-step curves: one panel per quantity of `CURVES` some stage logged, one line per
    stage (SFT's loss gets its own panel: a token NLL is not on a DPO loss's scale)."""
    plt = _pyplot()
    panels = []
    for key, title in CURVES:
        for kind in ("sft", "preference"):
            stages = {s: h for s, h in curves.items()
                      if (s == "sft") == (kind == "sft") and any(key in e for e in h)}
            if stages:
                panels.append((key, f"{'SFT ' if kind == 'sft' else ''}{title}", stages))
    fig, axes = _grid(plt, len(panels))
    for ax, (key, title, stages) in zip(axes, panels):
        for stage, history in stages.items():
            points = [(e["step"], e[key]) for e in history if key in e]
            ax.plot(*zip(*points), label=stage)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_comparison(path: str | Path, stats: Mapping[tuple[str, int, str], Mapping],
                    arms: Sequence[str], metrics: Sequence[str]) -> Path:
    """jobs/compare.py: one panel per metric, its mean over seeds by iteration, one line per
    arm, the band mean ± sample std of the seeds (`rayalign.compare.aggregate`'s table)."""
    plt = _pyplot()
    fig, axes = _grid(plt, max(len(metrics), 1))
    for ax, metric in zip(axes, metrics):
        for arm in arms:
            points = sorted((i, s) for (a, i, m), s in stats.items() if a == arm and m == metric)
            if not points:
                continue
            x = [i for i, _ in points]
            mean = [s["mean"] for _, s in points]
            spread = [s["std"] or 0.0 for _, s in points]
            ax.plot(x, mean, marker="o", label=arm)
            ax.fill_between(x, [m - d for m, d in zip(mean, spread)],
                            [m + d for m, d in zip(mean, spread)], alpha=0.2)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("iteration")
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_tradeoff(path: str | Path, stats: Mapping[tuple[str, int, str], Mapping],
                  arms: Sequence[str], x_metric: str, y_metric: str) -> Path:
    """One point per arm at its last iteration: `x_metric` vs `y_metric` (means over seeds,
    error bars one sample std): Hbat's trade-off between the two objectives."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for arm in arms:
        last = max((i for a, i, m in stats if a == arm and m == x_metric), default=None)
        if last is None or (arm, last, y_metric) not in stats:
            continue
        x, y = stats[(arm, last, x_metric)], stats[(arm, last, y_metric)]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0.0, yerr=y["std"] or 0.0,
                    marker="o", capsize=3, label=arm)
    ax.set_xlabel(x_metric)
    ax.set_ylabel(y_metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_quantiles(path: str | Path, stats: Mapping[tuple[str, int, str], Mapping],
                   arms: Sequence[str]) -> Path:
    """The AOT paper's Figure 1 per arm: the quantile functions of the held-out chosen and
    rejected implied rewards (`rayalign.compare.implied_rewards`' q<NN>_chosen /
    q<NN>_rejected at the arm's last iteration), means over seeds, bands one sample std."""
    plt = _pyplot()
    fig, axes = _grid(plt, max(len(arms), 1), width=3.4, height=2.8)
    for ax, arm in zip(axes, arms):
        last = max((i for a, i, m in stats if a == arm and m.startswith("q")), default=None)
        for side in ("chosen", "rejected"):
            points = sorted((int(m[1:3]) / 100, s) for (a, i, m), s in stats.items()
                            if a == arm and i == last and m.endswith(f"_{side}")
                            and m.startswith("q"))
            if not points:
                continue
            x = [q for q, _ in points]
            mean = [s["mean"] for _, s in points]
            spread = [s["std"] or 0.0 for _, s in points]
            ax.plot(x, mean, label=side)
            ax.fill_between(x, [m - d for m, d in zip(mean, spread)],
                            [m + d for m, d in zip(mean, spread)], alpha=0.2)
        ax.set_xlabel("quantile")
        ax.set_ylabel("log pi / pi_ref")
        ax.set_title(arm, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, Path(path))
