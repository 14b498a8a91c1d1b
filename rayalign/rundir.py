"""A resumable run directory (DESIGN.md, "A run directory").

`manifest.json` records, for each finished stage, its outputs and metrics, plus the
configuration that produced the run and its hash; a run resumes only under the same
configuration, and a changed one is refused naming the keys that changed. A stage's outputs are written under temporary names and
renamed into place (rayalign.io) *before* the stage is recorded, and the manifest itself is
replaced atomically, so after a kill at any instant the manifest only names complete files,
and restarting resumes at the first stage it does not list.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import read_json, write_json


class ResumeMismatchError(RuntimeError):
    """The run directory was made by a different configuration."""


def config_hash(config: dict) -> str:
    """A stable short hash of a JSON-able configuration."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """``"key.path: old -> new"`` for every leaf that differs (values as JSON, cut at 60)."""
    def show(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    a, b = (_flat(json.loads(json.dumps(c, default=str))) for c in (old, new))  # tuples -> lists
    return [f"{key}: {show(a[key]) if key in a else '(unset)'} -> "
            f"{show(b[key]) if key in b else '(unset)'}"
            for key in sorted(a.keys() | b.keys()) if key not in a or key not in b or a[key] != b[key]]


def check_resumable(root: str | Path, config: dict) -> None:
    """Raise `ResumeMismatchError` naming the changed keys if `root` holds a run of another
    configuration (nothing to do for a new or matching run directory)."""
    manifest = Path(root) / "manifest.json"
    if not manifest.exists():
        return
    recorded = read_json(manifest)
    if recorded["config_hash"] == config_hash(config):
        return
    changes = (config_changes(recorded["config"], config) if "config" in recorded
               else [f"(hash {recorded['config_hash']}, now {config_hash(config)})"])
    raise ResumeMismatchError(
        f"run_dir {Path(root).absolute()} was created by a different configuration; changed:\n  "
        + "\n  ".join(changes)
        + "\nuse a new run_dir, or restore these settings to resume it")


@dataclass(frozen=True)
class StageRecord:
    outputs: dict[str, str]
    metrics: dict[str, Any]
    seconds: float


class RunDir:
    """The manifest of one run; stage names are paths like ``"iter_001/train"``."""

    def __init__(self, root: str | Path, config: dict):
        """Open (resume) or create the run of `config` (a JSON-able dict) at `root`."""
        self.root = Path(root).absolute()
        check_resumable(self.root, config)
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifest_path = self.root / "manifest.json"
        if self._manifest_path.exists():
            self._manifest = read_json(self._manifest_path)
        else:
            self._manifest = {"config_hash": config_hash(config), "config": config, "stages": {}}
            write_json(self._manifest_path, self._manifest)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def start(self, stage: str) -> None:
        """Note `stage` as running (for progress and for tests that interrupt a run)."""
        self._manifest["running"] = stage
        write_json(self._manifest_path, self._manifest)

    def done(self, stage: str) -> bool:
        return stage in self._manifest["stages"]

    def record(self, stage: str, outputs: dict[str, str | Path], metrics: dict[str, Any],
               seconds: float) -> StageRecord:
        """Mark `stage` finished. Call only after its outputs are complete on disk."""
        rel = {k: str(Path(v).absolute().relative_to(self.root)) for k, v in outputs.items()}
        entry = {"outputs": rel, "metrics": metrics, "seconds": round(seconds, 3),
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._manifest["stages"][stage] = entry
        self._manifest.pop("running", None)
        write_json(self._manifest_path, self._manifest)
        return self.get(stage)

    def get(self, stage: str) -> StageRecord:
        entry = self._manifest["stages"][stage]
        return StageRecord({k: str(self.root / v) for k, v in entry["outputs"].items()},
                           entry["metrics"], entry["seconds"])

    @property
    def stages(self) -> list[str]:
        return list(self._manifest["stages"])
