"""Every input path and data file of a job, checked before any cluster time.

A job calls `check_inputs(cfg)` right after parsing its config and before it imports torch,
transformers or Ray (seconds) or starts a local Ray (10-20 s): a bad input is then named in
about a second, by config key and, for data, by file, row and field. It walks the config
tree: every `ModelConfig` and every string field marked ``json_schema_extra={"input":
"model"}`` must be a checkpoint directory with ``config.json`` (a nonexistent path would
otherwise reach transformers, which takes it for a Hub repo id); every `DataConfig` file is
read whole and every row validated (`rayalign.data.check_examples`: UTF-8, JSON, fields,
types, chat roles; only the chat-template rendering waits for the tokenizer); ``"rows"``
fields (a samples file) must be readable row by row, ``"dir"`` fields must be directories.
URIs (``s3://``, ``gs://``, ...) are left to the readers that understand them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from .config import ConfigError, DataConfig, ModelConfig
from .data import check_examples, read_rows


def _local(key: str, path: str) -> Path | None:
    """The local path, or None for a URI; a missing local path is a `ConfigError`."""
    if "://" in path:
        return None
    local = Path(path)
    if not local.exists():
        raise ConfigError(f"{key}: {path!r} does not exist")
    return local


def check_model_dir(key: str, path: str) -> None:
    """`path` is a Hugging Face checkpoint directory (it has config.json)."""
    local = _local(key, path)
    if local is None:
        return
    if not local.is_dir():
        raise ConfigError(f"{key}: {path!r} is a file, not a checkpoint directory")
    if not (local / "config.json").is_file():
        raise ConfigError(f"{key}: {path!r} is not a Hugging Face checkpoint (no config.json)")


def check_data(key: str, data: DataConfig) -> None:
    """`data.path` exists and every row is valid for `data.kind` (raises `DataError`)."""
    local = _local(f"{key}.path", data.path)
    if local is not None and not local.is_file():
        raise ConfigError(f"{key}.path: {data.path!r} is not a file")
    check_examples(data)


def _check_marked(key: str, kind: str, path: str) -> None:
    if kind == "model":
        check_model_dir(key, path)
        return
    local = _local(key, path)
    if kind == "dir" and local is not None and not local.is_dir():
        raise ConfigError(f"{key}: {path!r} is not a directory")
    if kind == "rows":
        for _ in read_rows(path):  # UTF-8 and JSON of every row; columns checked by the reader
            pass


def check_inputs(cfg: BaseModel, prefix: str = "") -> None:
    """Check every input path of `cfg` (see the module docstring); raises `ConfigError` naming
    the key, or `rayalign.data.DataError` naming file, row and field."""
    for name, field in type(cfg).model_fields.items():
        value, key = getattr(cfg, name), prefix + name
        if isinstance(value, ModelConfig):
            check_model_dir(f"{key}.path", value.path)
        elif isinstance(value, DataConfig):
            check_data(key, value)
        elif isinstance(value, BaseModel):
            check_inputs(value, key + ".")
        elif isinstance(value, str) and isinstance(field.json_schema_extra, dict):
            kind = field.json_schema_extra.get("input")
            if kind is not None:
                _check_marked(key, kind, value)
