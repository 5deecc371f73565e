"""Dependencies point down: the format layer (how records are encoded and decoded)
imports nothing above it, and the library imports nothing of the benchmarks. Read
from the source (every import statement, in functions too), not from what an import
happened to load."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmcore"
FORMAT_LAYER = {"mmcore.errors", "mmcore.record", "mmcore.recipe", "mmcore.dtypes",
                "mmcore.modelset", "mmcore.manifest"}  # fmt: skip


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The modules a file imports (relative imports resolved)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (
                (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            )
            assert target is not None
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_the_format_layer_imports_only_itself() -> None:
    graph = _graph()
    seen, todo = set(), list(FORMAT_LAYER)
    while todo:
        name = todo.pop()
        if name == "mmcore":  # `from . import x` names the package; x is what is imported
            continue
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    assert seen == FORMAT_LAYER, sorted(seen - FORMAT_LAYER)


def test_the_library_does_not_import_the_benchmarks() -> None:
    for path in PACKAGE.rglob("*.py"):
        imported = _imports(path)
        assert not any(m == "benchmarks" or m.startswith("benchmarks.") for m in imported), path
