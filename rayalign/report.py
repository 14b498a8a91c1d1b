"""The LD-Align run report: summary.md with the metric tables and sample texts, and plots.

One row per policy theta_t (t = 0 is the SFT starting point) with its held-out metrics
(rayalign.evaluate.summarize) and, for t >= 1, the training statistics of the weighted-DPO
update that produced it; a ``gold`` row gives the surface statistics of the gold answers, the
values a policy's are read against. Then k sample texts per theta on the same k held-out
prompts, and the plots of rayalign.plots. Columns that no row has (a metric whose model was
not configured) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .evaluate import guide_correlations, text_stats
from .io import atomic_file
from .plots import plot_correlation, plot_curves, plot_distances, plot_metrics

EVAL_COLUMNS = (
    ("eval_exact_match", "exact match"),
    ("eval_position_accuracy", "position acc"),
    ("eval_edit_distance", "edit distance"),
    ("eval_gold_nll", "gold NLL/tok"),
    ("eval_rouge_l", "ROUGE-L"),
    ("eval_cosine", "cosine"),
    ("eval_reward", "reward"),
    ("eval_win_rate", "win vs theta_0"),
    ("eval_mean_length", "length"),
    ("eval_truncated_share", "cut"),
    ("eval_distinct_1", "distinct-1"),
    ("eval_distinct_2", "distinct-2"),
    ("eval_loop_share", "loops"),
    ("eval_duplicate_share", "duplicates"),
    ("eval_mean_distance", "mean distance"),
)
TRAIN_COLUMNS = (
    ("train_loss", "train loss"),
    ("train_reward_margin", "reward margin"),
    ("train_reward_accuracy", "reward acc"),
    ("train_reward_accuracy_distinct", "reward acc (sample != gold)"),
    ("train_identical_share", "sample == gold"),
)
SAMPLE_CHARS = 400  # longer sample texts are cut in summary.md (the parquet files have them whole)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]]) -> str:
    shown = [(k, t) for k, t in columns if any(r.get(k) is not None for r in rows)]
    head = "| policy | " + " | ".join(t for _, t in shown) + " |"
    rule = "|---|" + "|".join("---" for _ in shown) + "|"
    body = ["| " + " | ".join([str(r["policy"]), *(_cell(r.get(k)) for k, _ in shown)]) + " |"
            for r in rows]
    return "\n".join([head, rule, *body])


def summary_table(rows: Sequence[Mapping]) -> str:
    """Markdown: the held-out metrics of each row (missing values '-')."""
    return _table(rows, EVAL_COLUMNS)


def training_table(rows: Sequence[Mapping]) -> str:
    """Markdown: the final-step training statistics of the rows that were trained ('' if none)."""
    trained = [r for r in rows if any(r.get(k) is not None for k, _ in TRAIN_COLUMNS)]
    return _table(trained, TRAIN_COLUMNS) if trained else ""


def gold_row(scored: Mapping[str, Sequence]) -> dict:
    """The ``gold`` reference row: `text_stats` of the gold answers of one scored file."""
    stats = text_stats(list(scored["gold"]), list(scored["prompt"]))
    return {"policy": "gold", **{f"eval_{k}": v for k, v in stats.items()}}


def sample_rows(n: int, k: int) -> list[int]:
    """min(k, n) row indices spread evenly over n rows (0, n/k, 2n/k, ... rounded down), the
    same for every theta."""
    m = min(k, n)
    return [i * n // m for i in range(m)]


def _quote(text: str) -> str:
    text = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " [...]"
    return "\n".join("> " + line for line in (text.splitlines() or [""]))


def sample_texts(scored: Mapping[str, Mapping[str, Sequence]], k: int) -> str:
    """Markdown: for k held-out prompts, the prompt, the gold answer and every theta's answer."""
    first = next(iter(scored.values()))
    out = []
    for number, i in enumerate(sample_rows(len(first["prompt"]), k), start=1):
        out.append(f"### Prompt {number} (held-out row {first['row'][i]})\n\n"
                   f"{_quote(first['prompt'][i])}\n\n**gold**\n\n{_quote(first['gold'][i])}\n")
        for policy, columns in scored.items():
            out.append(f"**{policy}**\n\n{_quote(columns['sample'][i])}\n")
    return "\n".join(out)


def write_report(out_dir: str | Path, rows: Sequence[Mapping],
                 scored: Mapping[str, Mapping[str, Sequence]],
                 curves: Mapping[str, Sequence[Mapping]], k: int = 3) -> tuple[Path, dict]:
    """Write summary.md and the PNGs into `out_dir`: metrics.png always, distances.png and
    correlation.png (LD-Align §5.2) when a guide scored the samples, training.png when
    there are training `curves` (stage name -> per-step history). `scored`: policy ->
    columns of its scored held-out file. Returns summary.md and the §5.2 correlations."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_rows = [*rows, gold_row(next(iter(scored.values())))]
    images = [("metrics", plot_metrics(out / "metrics.png", rows, EVAL_COLUMNS))]
    distances = {p: c["distance"] for p, c in scored.items()
                 if c["distance"] and all(d is not None for d in c["distance"])}
    corr = guide_correlations(scored)
    if distances:
        images.append(("distances", plot_distances(out / "distances.png", distances)))
    if corr:
        images.append(("correlation", plot_correlation(out / "correlation.png", scored, corr)))
    if curves:
        images.append(("training curves", plot_curves(out / "training.png", curves)))
    corr_lines = [f"- {policy}: Spearman(s, 1 - {measure}) = "
                  f"{'undefined (a constant side)' if rho is None else f'{rho:.3f}'} over {n} samples"
                  for (policy, measure), (rho, n) in corr.items()]
    text = ("# LD-Align run summary\n\n## Held-out metrics\n\n" + summary_table(table_rows)
            + "\n\n## Training (last step of each update)\n\n" + (training_table(rows) or "-")
            + "\n\n" + "\n\n".join(f"![{title}]({path.name})" for title, path in images) + "\n")
    if corr_lines:
        text += ("\n## Guide distance vs independent dissimilarity (LD-Align §5.2)\n\n"
                 + "\n".join(corr_lines) + "\n")
    if k:
        text += f"\n## Sample texts\n\n{sample_texts(scored, k)}"
    summary = out / "summary.md"
    with atomic_file(summary) as tmp:
        tmp.write_text(text)
    return summary, {f"spearman_{p}_{m}": rho for (p, m), (rho, _) in corr.items()}
