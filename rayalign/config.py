"""Typed, validated, immutable configuration loaded from YAML: the loader and the shared sections.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in a YAML file
or a `--set` override fails at load time with the dotted key path and the reason, before any
cluster time is spent. Jobs load one top-level model with `load_config`; the models live by
concept: this module holds the base `Section`, the sections every job shares (model, data,
sampling, resources, the tiny default) and the loader; `rayalign.config_train` the training
phase (`TrainConfig`, `TrainJobConfig`), `rayalign.config_ldalign` LD-Align (`LDAlignConfig`,
its guide, pairs and evaluation), `rayalign.config_hbat` Hbat (`HbatConfig`) and
`rayalign.config_services` the Serve apps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key path."""


# Marks a string field as a checkpoint path that rayalign.preflight checks before Ray starts.
MODEL_INPUT = {"input": "model"}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """A Hugging Face causal LM (and its tokenizer) loaded by local path or URI."""

    path: str = Field(description="Checkpoint directory (config.json, safetensors, tokenizer).",
                      json_schema_extra=MODEL_INPUT)
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
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {node_b: 1} to "
        "place the pool on the nodes started with that resource (ray start --resources).",
    )


def check_sampler_fits(sampling: SamplingConfig, resources: ResourcesConfig, key: str) -> None:
    """The sampler actors' GPUs fit vLLM: ``tensor_parallel_size`` GPUs per actor, and on a
    fractional GPU (actors sharing a card) ``gpu_memory_utilization`` (vLLM's share of the
    card's memory) no larger than the share of the card the actor holds."""
    if sampling.engine == "hf" or (sampling.engine == "auto" and resources.num_gpus == 0):
        return
    tp = sampling.tensor_parallel_size
    if resources.num_gpus == 0 or (tp > 1 and resources.num_gpus < tp):
        raise ValueError(f"{key}.num_gpus ({resources.num_gpus}) must cover "
                         f"sampling.tensor_parallel_size ({tp}): vLLM runs one shard per GPU")
    if resources.num_gpus < 1 and sampling.gpu_memory_utilization > resources.num_gpus:
        raise ValueError(f"sampling.gpu_memory_utilization ({sampling.gpu_memory_utilization}) "
                         f"exceeds {key}.num_gpus ({resources.num_gpus}): actors sharing a GPU "
                         "would each claim more of its memory than their share")


class TinyDefaultConfig(Section):
    """The embedded default: a tiny random-init model and the toy sorting task (toytask.py),
    generated into the run directory when `policy` / `data` are not given."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    train_rows: int = Field(512, gt=0)
    eval_rows: int = Field(64, gt=0)
    min_digits: int = Field(3, gt=0, description="Shortest list the toy task sorts.")
    max_digits: int = Field(6, gt=0, description="Longest list the toy task sorts.")
    seed: int = 0

    @model_validator(mode="after")
    def _lengths(self) -> "TinyDefaultConfig":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) exceeds max_digits ({self.max_digits})")
        return self


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


def _default_sections(cls: type[BaseModel]) -> dict:
    """The job's own defaults of its nested sections, so that a partial section in YAML or a
    `--set sft.max_steps=30` changes only that key of the job's default `sft`, instead of
    replacing it with the section class's generic defaults."""
    out = {}
    for name, field in cls.model_fields.items():
        default = field.default
        if isinstance(default, BaseModel) and default != _generic(type(default)):
            out[name] = default.model_dump()
    return out


def _generic(cls: type[BaseModel]) -> BaseModel | None:
    try:
        return cls()
    except ValidationError:
        return None


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


_SECRET_KEYS = ("token", "secret", "password")


def _redacted(override: str) -> str:
    """An override as error messages show it: the value of a secret key is never printed."""
    key, sep, _ = override.partition("=")
    last = key.strip().rsplit(".", 1)[-1].lower()
    return f"{key}=***" if sep and any(word in last for word in _SECRET_KEYS) else override


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file's top-level mapping (empty file: {}); a missing file, invalid YAML or a
    non-mapping top level is a `ConfigError` naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    cls: type[Cfg], path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()
) -> Cfg:
    """Load `cls` from a YAML file (or its defaults when `path` is None) plus `key=value` overrides."""
    data: dict = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        data = read_yaml(path)
    data = _merge(_default_sections(cls), data)
    if overrides:
        data = _merge(data, parse_overrides(list(overrides)))
        source += " with overrides " + " ".join(_redacted(o) for o in overrides)
    return build_config(cls, data, source)
