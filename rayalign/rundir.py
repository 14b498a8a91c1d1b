"""A resumable run directory (DESIGN.md, "A run directory").

`manifest.json` records, for each finished stage, its outputs and metrics, plus a hash of the
configuration that produced the run. A stage's outputs are written under temporary names and
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


@dataclass(frozen=True)
class StageRecord:
    outputs: dict[str, str]
    metrics: dict[str, Any]
    seconds: float


class RunDir:
    """The manifest of one run; stage names are paths like ``"iter_001/train"``."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifest_path = self.root / "manifest.json"
        if self._manifest_path.exists():
            self._manifest = read_json(self._manifest_path)
            if self._manifest["config_hash"] != fingerprint:
                raise ResumeMismatchError(
                    f"{self.root} was created by a different configuration (hash "
                    f"{self._manifest['config_hash']}, now {fingerprint}); use a new run_dir, "
                    f"or restore the original settings to resume it"
                )
        else:
            self._manifest = {"config_hash": fingerprint, "stages": {}}
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
