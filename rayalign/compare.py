"""Comparing methods (jobs/compare.py): the config, each arm's job config, and the statistics.

A comparison runs several *arms* of one job (`job`: ld_align or hbat) from one config: every
arm is the shared `base` job config plus its own dotted overrides, run once per seed in its
own resumable run directory ``<run_dir>/<arm>/seed_<s>``. This module holds the pure part:
building and validating each arm's config (errors name ``arms.<arm>.<key>`` before any
cluster time), and turning the arms' per-iteration result rows into the per-seed CSV rows,
the mean +- sample std over seeds per (arm, iteration, metric), and the Markdown tables.
The Ray side (running the arms, resuming) is orchestration/compare.py.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .config import (
    ConfigError,
    DataConfig,
    Section,
    _default_sections,
    _merge,
    _set_dotted,
    build_config,
    read_yaml,
)
from .config_hbat import HbatConfig
from .config_ldalign import LDAlignConfig
from .config_train import TrainJobConfig

JOB_CONFIGS = {"ld_align": LDAlignConfig, "hbat": HbatConfig, "train": TrainJobConfig}
# the key of the run directory in each job's config
RUN_DIR_KEY = {"ld_align": "run_dir", "hbat": "run_dir", "train": "output_dir"}
QUANTILES = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95
THETA0 = "theta0"  # the shared theta_0's directory and stage name, so not an arm name


class CompareConfig(Section):
    """jobs/compare.py: arms x seeds of one job, the same data, evaluation and budget."""

    run_dir: str = Field("runs/compare", description="Parent of every arm's run directories "
                         "(<run_dir>/<arm>/seed_<s>) and the comparison's outputs; resumable.")
    job: Literal["ld_align", "hbat", "train"] = Field(
        description="The job every arm runs: ld_align, hbat, or train (one training phase of "
        "jobs/sft.py / dpo.py / aot.py, then held-out implied rewards).")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="One run per arm and seed.")
    seed_keys: tuple[str, ...] = Field(
        ("tiny.seed", "sampling.seed", "train.seed"), description="Dotted job-config keys set "
        "to the seed in every arm (model init, toy data, sampling, data order); a key under a "
        "null section is skipped.")
    shared_theta0: bool = Field(
        True, description="ld_align: make theta_0 (setup + sft of `base`) once per seed and "
        "start every arm from it (arms then run with sft: null), so every arm's theta_0 is the "
        "same policy.")
    base_config: str | None = Field(
        None, description="A YAML file `base` extends, key by key (`base` wins): a job's config "
        "file, or another comparison's config (its `base`, after its own base_config); a path "
        "relative to the working directory, like every path of a config. A sweep or a "
        "real-model comparison names the config it varies instead of copying it.")
    base: dict[str, Any] = Field(default_factory=dict, description="The job config every arm "
                                 "shares (as that job's YAML file), over `base_config`'s.")
    arms: dict[str, dict[str, Any]] = Field(min_length=1, description="Arm name -> dotted "
                                            "overrides of `base` (e.g. weights: uniform).")
    metrics: tuple[str, ...] = Field((), description="Metrics tabulated and plotted (keys of "
                                     "the result rows); empty = every numeric one.")
    parallel: int = Field(1, ge=1, description="Arms run at once (ld_align, hbat: as their "
                          "jobs' entrypoints on the same Ray cluster); 1 = one after another.")
    heldout: DataConfig | None = Field(
        None, description="train: held-out preference pairs scored after training (implied "
        "rewards); None = toy pairs (tiny.eval_rows rows, seed tiny.seed + 1000).")

    @model_validator(mode="before")
    @classmethod
    def _inherit_base(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("base_config") is not None:
            data = {**data, "base": _merge(inherited_base(data["base_config"]),
                                           data.get("base") or {})}
        return data

    @model_validator(mode="after")
    def _arms_valid(self) -> "CompareConfig":
        for arm in self.arms:
            if not arm.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"arms.{arm}: an arm name must be letters, digits, - and _")
            if arm == THETA0:
                raise ValueError(f"arms.{THETA0}: the name is the shared theta_0's directory")
            for seed in self.seeds:
                try:
                    arm_config(self, arm, seed, run_dir=f"{self.run_dir}/{arm}/seed_{seed}")
                except ConfigError as err:
                    raise ValueError(f"seed {seed}: {err}") from None
        return self


def inherited_base(path: str, seen: tuple[str, ...] = ()) -> dict:
    """The job-config dict a comparison's ``base_config: <path>`` names: the file itself when
    it is a job's config, its `base` over its own `base_config` when it is a comparison's
    (it has `arms`)."""
    if str(Path(path).resolve()) in seen:
        raise ConfigError(f"base_config: {path} names itself through "
                          + " -> ".join(seen + (path,)))
    tree = read_yaml(path)
    if "arms" not in tree:
        return tree
    parent = tree.get("base_config")
    inherited = {} if parent is None else inherited_base(parent, seen + (str(Path(path).resolve()),))
    return _merge(inherited, tree.get("base") or {})


def job_tree(cfg: CompareConfig, seed: int, run_dir: str,
             overrides: Mapping[str, Any] | None = None) -> dict:
    """The job-config dict of one run: the job's defaults, then `base`, then the dotted
    `overrides`, then the seed keys and the run directory."""
    # a deep copy: `_merge` keeps the nested dicts it does not merge, and the overrides below
    # would otherwise write into `cfg.base` itself (one arm's override leaking into the next)
    tree = _merge(_default_sections(JOB_CONFIGS[cfg.job]), copy.deepcopy(cfg.base))
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    for key in cfg.seed_keys:
        if _section_present(tree, key):
            _set_dotted(tree, key, seed)
    _set_dotted(tree, RUN_DIR_KEY[cfg.job], run_dir)
    return tree


def _section_present(tree: dict, dotted: str) -> bool:
    """False when a section on the key's path is null (e.g. ``sft.seed`` once an arm runs with
    ``sft: null``): a seed key of a section that is off is skipped, not an error."""
    node = tree
    for key in dotted.split(".")[:-1]:
        node = node.get(key, {}) if isinstance(node, dict) else None
        if node is None:
            return False
    return True


def arm_tree(cfg: CompareConfig, arm: str, seed: int, run_dir: str,
             extra: Mapping[str, Any] | None = None) -> dict:
    """`job_tree` of one arm: `base`, the arm's overrides, then `extra` (the runner's shared
    theta_0: policy, data, sft: null)."""
    return job_tree(cfg, seed, run_dir, {**cfg.arms[arm], **(extra or {})})


def arm_config(cfg: CompareConfig, arm: str, seed: int, run_dir: str,
               extra: Mapping[str, Any] | None = None):
    """`arm_tree` validated as the job's config (a ConfigError names the key)."""
    return build_config(JOB_CONFIGS[cfg.job], arm_tree(cfg, arm, seed, run_dir, extra),
                        f"arms.{arm}")


def long_rows(results: Mapping[str, Mapping[int, Sequence[Mapping]]]) -> list[dict]:
    """One CSV row per (arm, seed, iteration, metric) from ``results[arm][seed]`` = the arm's
    result rows in iteration order (numeric values only; booleans and None are skipped)."""
    out = []
    for arm, seeds in results.items():
        for seed, rows in seeds.items():
            for iteration, row in enumerate(rows):
                for metric, value in row.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        out.append({"arm": arm, "seed": seed, "iteration": iteration,
                                    "label": str(row.get("policy", row.get("phase", iteration))),
                                    "metric": metric, "value": float(value)})
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1: the spread a new seed would show);
    std is None for a single value, where it is undefined."""
    if not values:
        raise ValueError("no values")
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: Sequence[Mapping]) -> dict[tuple[str, int, str], dict]:
    """(arm, iteration, metric) -> {mean, std, n, label} over the seeds present."""
    groups: dict[tuple[str, int, str], list] = {}
    labels: dict[tuple[str, int, str], str] = {}
    for r in rows:
        key = (r["arm"], r["iteration"], r["metric"])
        groups.setdefault(key, []).append(r["value"])
        labels[key] = r["label"]
    out = {}
    for key, values in groups.items():
        mean, std = mean_std(values)
        out[key] = {"mean": mean, "std": std, "n": len(values), "label": labels[key]}
    return out


def metric_names(stats: Mapping[tuple[str, int, str], dict], wanted: Sequence[str] = ()) -> list[str]:
    """The metrics to show: `wanted` (those present, in that order), else all in first-seen order."""
    present = list(dict.fromkeys(metric for _, _, metric in stats))
    return [m for m in wanted if m in present] if wanted else present


def cell(stat: Mapping | None) -> str:
    """``mean ± std`` (4 significant digits; no ± for a single seed)."""
    if stat is None:
        return "-"
    text = f"{stat['mean']:.4g}"
    return text if stat["std"] is None else f"{text} ± {stat['std']:.2g}"


def metric_table(stats: Mapping[tuple[str, int, str], dict], metric: str,
                 arms: Sequence[str]) -> str:
    """A Markdown table of one metric: a row per arm, a column per iteration (the label of
    the arm's row, e.g. theta_1 or a phase name, is shown when the arms agree on it)."""
    iterations = sorted({i for a, i, m in stats if m == metric})
    heads = []
    for i in iterations:
        labels = {stats[(a, i, metric)]["label"] for a in arms if (a, i, metric) in stats}
        heads.append(labels.pop() if len(labels) == 1 else f"iter {i}")
    lines = [f"| arm | {' | '.join(heads)} |", "|---" * (len(heads) + 1) + "|"]
    for arm in arms:
        cells = [cell(stats.get((arm, i, metric))) for i in iterations]
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    return "\n".join(lines)


def comparison_markdown(title: str, stats: Mapping[tuple[str, int, str], dict],
                        arms: Sequence[str], seeds: Sequence[int], wanted: Sequence[str] = (),
                        notes: Sequence[str] = ()) -> str:
    """comparison.md: what was compared, then one table per metric (mean ± std over seeds)."""
    parts = [f"# {title}", "",
             f"Arms: {', '.join(arms)}. Seeds: {', '.join(map(str, seeds))}. Each cell is "
             f"mean ± sample std (ddof 1) over seeds; per-seed values in per_seed.csv.", ""]
    parts += [f"- {note}" for note in notes]
    for metric in metric_names(stats, wanted):
        parts += ["", f"## {metric}", "", metric_table(stats, metric, arms)]
    return "\n".join(parts) + "\n"


def check_arm_inputs(cfg: CompareConfig) -> None:
    """`rayalign.preflight.check_inputs` on every arm's job config (first seed), so a bad model
    path or data row of `base` or an arm is named (``arms.<arm>.<key>``) before Ray starts."""
    from .preflight import check_inputs

    for arm in cfg.arms:
        seed = cfg.seeds[0]
        check_inputs(arm_config(cfg, arm, seed, f"{cfg.run_dir}/{arm}/seed_{seed}"), f"arms.{arm}.")


def implied_rewards(policy_chosen: Sequence[float], policy_rejected: Sequence[float],
                    ref_chosen: Sequence[float], ref_rejected: Sequence[float]) -> dict[str, float]:
    """Held-out implied rewards of a trained policy, per pair r = log pi(y|x) - log pi_ref(y|x)
    (DPO's implied reward divided by beta, so arms trained with different betas compare):
    the share of pairs with r_chosen > r_rejected (ties are not wins), the mean margin, both
    means, and the `QUANTILES` of r_chosen and of r_rejected (numpy's linear interpolation):
    the AOT paper's Figure 1 compares these two quantile functions (AOT aims at the chosen
    rewards dominating the rejected ones at every quantile)."""
    import numpy as np

    pc, pr, rc, rr = (np.asarray(v, dtype=np.float64) for v in
                      (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    if not (pc.shape == pr.shape == rc.shape == rr.shape) or pc.ndim != 1 or not pc.size:
        raise ValueError("implied rewards need four equally long, non-empty 1-D sequences")
    chosen, rejected = pc - rc, pr - rr
    out = {"heldout_reward_accuracy": float(np.mean(chosen > rejected)),
           "heldout_margin": float(np.mean(chosen - rejected)),
           "heldout_chosen_reward": float(chosen.mean()),
           "heldout_rejected_reward": float(rejected.mean())}
    for side, values in (("chosen", chosen), ("rejected", rejected)):
        for q, v in zip(QUANTILES, np.quantile(values, QUANTILES)):
            out[f"q{round(q * 100):02d}_{side}"] = float(v)
    return out
