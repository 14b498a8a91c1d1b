"""The folders' one direction (README "Layout", DESIGN.md "Layers"), read from the source.

jobs -> orchestration -> pipelines | services -> actors -> rayalign: a module may import its
own folder and the folders below it, never one above it or beside it (pipelines and services
do not import each other). Every import counts, also one inside a function (ast, not a
run: a lazy import is still an arrow). Heavy libraries load only where they are used: Ray
Serve at module level only in services/, DeepSpeed and vLLM never at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"rayalign": 0, "actors": 1, "pipelines": 2, "services": 2, "orchestration": 3,
        "jobs": 4}
HEAVY = {"ray.serve": {"services"}, "deepspeed": set(), "vllm": set()}


def _modules() -> list[Path]:
    return sorted(p for folder in RANK for p in (ROOT / folder).rglob("*.py"))


def _imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every absolute import in `tree`."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, node.lineno, id(node) in top) for name in names]
    return found


def _arrows(path: Path) -> list[str]:
    """The imports of `path` that break the direction, as 'file:line folder -> module'."""
    folder, where = path.relative_to(ROOT).parts[0], path.relative_to(ROOT)
    bad, seen = [], set()
    for name, line, top in _imports(ast.parse(path.read_text(), str(path))):
        target = name.split(".")[0]
        if (target in RANK and target != folder and RANK[target] >= RANK[folder]
                and line not in seen):
            seen.add(line)  # `from a.b import c`: one arrow, a.b
            bad.append(f"{where}:{line} {folder} -> {name}")
        for heavy, allowed in HEAVY.items():
            if top and (name == heavy or name.startswith(heavy + ".")) and folder not in allowed:
                bad.append(f"{where}:{line} {heavy} at module level")
    return sorted(set(bad))


def test_no_folder_imports_one_above_or_beside_it():
    assert len(_modules()) > 30  # the folders were found
    bad = [arrow for path in _modules() for arrow in _arrows(path)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, folder, expected", [
    ("from pipelines.pairs import pairs_stage\n", "actors", "actors -> pipelines.pairs"),
    ("def f():\n    import services.http\n", "actors", "actors -> services.http"),
    ("from services import http\n", "pipelines", "pipelines -> services"),
    ("import orchestration.controller\n", "orchestration", None),
    ("from ray import serve\n", "actors", "ray.serve at module level"),
    ("def f():\n    from ray import serve\n", "actors", None),
    ("import deepspeed\n", "rayalign", "deepspeed at module level"),
    ("from actors.runtime import init_ray\n", "jobs", None),
])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, folder, expected):
    """The check itself can fail: a planted module in each situation."""
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "planted.py").write_text(source)
    arrows = _arrows(tmp_path / folder / "planted.py")
    assert (arrows == []) if expected is None else (expected in arrows[0])
