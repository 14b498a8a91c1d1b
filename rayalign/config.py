"""Typed, validated, immutable configuration loaded from YAML.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in a YAML file
or a `--set` override fails at load time with the dotted key path and the reason, before any
cluster time is spent. Jobs load one top-level model (`LDAlignConfig`, `TrainJobConfig`,
`HbatConfig`, ...) with `load_config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key path."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """A Hugging Face causal LM (and its tokenizer) loaded by local path or URI."""

    path: str = Field(description="Checkpoint directory (config.json, safetensors, tokenizer).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU."
    )


class DataConfig(Section):
    """A dataset file in one of the TRL formats of DESIGN.md, and its truncation limits.

    Truncation: the prompt keeps its *last* `max_prompt_length` tokens (the end of a prompt
    is what the response answers); the response (with its EOS) is then cut on the right to
    fit `max_length` tokens in total.
    """

    path: str = Field(description="JSONL or Parquet file, local path or URI (s3://, gs://).")
    kind: Literal["sft", "preference", "unpaired"] = "sft"
    max_prompt_length: int = Field(128, gt=0)
    max_length: int = Field(256, gt=0, description="Prompt + response tokens.")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows.")

    @model_validator(mode="after")
    def _lengths(self) -> "DataConfig":
        if self.max_length <= self.max_prompt_length:
            raise ValueError(
                f"max_length ({self.max_length}) must exceed max_prompt_length "
                f"({self.max_prompt_length}) to leave room for the response"
            )
        return self


class SamplingConfig(Section):
    """How the policy samples responses (both engines read the same fields)."""

    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto = vLLM when installed and a GPU is visible, else HF generate."
    )
    n: int = Field(1, ge=1, description="Samples per prompt.")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, gt=0)
    seed: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int = Field(16, gt=0, description="Prompts per generate call / Ray Data batch.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM only.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vLLM only.")


class ResourcesConfig(Section):
    """Ray resources of one actor pool (sampler, scorer, ...): never hard-coded in code."""

    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)


class PairsConfig(Section):
    """pipelines/pairs.py: SFT rows -> samples -> distances -> weighted pairs + reference log-probs.

    Each stage is a Ray Data actor pool; the sampler's batch size is `sampling.batch_size`.
    """

    sampler: ResourcesConfig = Field(ResourcesConfig(), description="PolicySampler actor pool.")
    scorer: ResourcesConfig = Field(ResourcesConfig(), description="GuideScorer actor pool.")
    scorer_batch_size: int = Field(16, gt=0, description="Rows per guide-encoder call.")
    refs: ResourcesConfig = Field(ResourcesConfig(), description="Reference log-prob actor pool.")
    refs_batch_size: int = Field(8, gt=0, description="Pairs per reference forward (2x rows).")
    progress_bars: bool = Field(True, description="Ray Data progress bars.")


class SamplerServiceConfig(Section):
    """services/sampler.py: an OpenAI-compatible subset over the policy sampler (Ray Serve).

    A request's fields (max_tokens, temperature, top_p, n, seed, stop) override `sampling`;
    `sampling.max_new_tokens` is also the largest max_tokens a request may ask for.
    """

    model_path: str = Field(description="Policy checkpoint directory.")
    served_model_name: str | None = Field(
        None, description="The `model` name clients use; None = the checkpoint directory name."
    )
    sampling: SamplingConfig = SamplingConfig()
    max_prompt_length: int | None = Field(None, gt=0, description="Keep the last N prompt tokens.")
    max_completions: int = Field(64, gt=0, description="Largest prompts x n per request.")
    app_name: str = "sampler"
    route_prefix: str = Field("/", description="Clients use base_url <host>:8000<prefix>/v1.")
    replicas: ResourcesConfig = Field(
        ResourcesConfig(), description="num_actors sampler replicas, num_cpus / num_gpus each."
    )


class TrainConfig(Section):
    """One training phase: objective, optimisation and DeepSpeed settings."""

    objective: Literal["sft", "dpo", "weighted_dpo", "aot", "aot_unpaired", "ipo"] = "dpo"
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    aot_loss: Literal["logistic", "hinge", "squared"] = "logistic"
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(4, gt=0, description="Rows per worker per forward.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    max_nan_steps: int = Field(3, ge=0, description="Skipped non-finite steps before failing.")
    max_failures: int = Field(1, ge=0, description="Ray Train retries, resuming from checkpoint.")
    checkpoint_every: int | None = Field(None, gt=0, description="Optimizer steps; None = end only.")
    seed: int = 0


class EWCConfig(Section):
    """Hbat's modified EWC (DESIGN.md, Hbat): importance from accumulated parameter change."""

    mode: Literal["ewc", "freeze", "none"] = "ewc"
    lam: float = Field(1.0, ge=0.0, description="lambda of the penalty.")
    f_max: float = Field(1.0, gt=0.0)
    scale: float = Field(
        1.0, gt=0.0,
        description="Softmax inverse temperature: multiplies AC/mean(AC) (normalize=mean) or raw "
        "AC (normalize=none; the authors' code amounts to 1e20).",
    )
    normalize: Literal["mean", "none"] = "mean"
    freeze_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    offload_anchor: bool = Field(True, description="Keep theta* on the CPU.")


Cfg = TypeVar("Cfg", bound=BaseModel)


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """`["train.beta=0.05", "run_dir=runs/x"]` -> nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        reason = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {reason}")
    return "\n".join(lines)


def build_config(cls: type[Cfg], data: dict, source: str = "") -> Cfg:
    """Validate a plain dict as `cls`, turning pydantic errors into a `ConfigError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(
    cls: type[Cfg], path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()
) -> Cfg:
    """Load `cls` from a YAML file (or its defaults when `path` is None) plus `key=value` overrides."""
    data: dict = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data = _merge(data, parse_overrides(list(overrides)))
        source += " with overrides " + " ".join(overrides)
    return build_config(cls, data, source)
