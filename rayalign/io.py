"""Atomic file and directory writes: a reader never sees a half-written output.

Everything is first written under a temporary sibling name (``.<name>.tmp-<8 hex>``) and
then renamed into place; `os.replace` / `os.rename` are atomic on POSIX filesystems (local disk
and NFS), so a job killed mid-write leaves at most a stray temporary entry, which no reader
ever opens and `remove_stray_temps` deletes when the job next opens its run directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


_TMP = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def remove_stray_temps(root: str | os.PathLike) -> list[Path]:
    """Delete the temporary files / directories a killed writer left anywhere under `root`
    (call it only where nothing is writing under `root`: a job's driver at start)."""
    stray = [p for p in Path(root).rglob(".*.tmp-*") if _TMP.match(p.name)]
    for path in stray:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stray


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that replaces `path` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
