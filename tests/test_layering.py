"""The layering: the save paths, readers, compaction and push/pull take a ``Storage``
(mmcore/storage.py) and never the ``ModelStore`` facade."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from conftest import assert_sets_equal, small_set

import mmcore
from mmcore.paths import load
from mmcore.storage import LocalStorage, open_storage

PACKAGE = Path(mmcore.__file__).parent
FACADE = {"api.py", "cli.py", "__init__.py", "demo.py", "doctor.py"}


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, relative ones resolved within mmcore."""
    tree = ast.parse(path.read_text())
    package = ["mmcore", *path.parent.relative_to(PACKAGE).parts]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_no_module_below_the_facade_imports_it() -> None:
    checked = 0
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE and path.name in FACADE:
            continue
        imported = _imports(path)
        assert "mmcore.api" not in imported, f"{path.relative_to(PACKAGE)} imports mmcore.api"
        assert "mmcore.api.ModelStore" not in imported
        assert "ModelStore" not in {n.split(".")[-1] for n in imported}, path
        checked += 1
    assert checked > 30
    # and the check can fail: api.py itself imports what it is made of
    assert "mmcore.storage" in _imports(PACKAGE / "api.py")


def test_a_storage_opened_alone_loads_what_the_store_saved(tmp_path: Path) -> None:
    models = small_set(5)
    with mmcore.open(tmp_path / "s") as store:
        v = store.save(models)
        changed = {n: {k: t + 1 for k, t in sd.items()} for n, sd in models.items()}
        v2 = store.save(changed, approach="update", parent=v)
    storage = open_storage(tmp_path / "s", readonly=True, create=False, storage_options=None,
                           cache=None)  # fmt: skip
    try:
        assert isinstance(storage, LocalStorage) and not storage.remote
        cpu = torch.device("cpu")
        assert_sets_equal(load.load(storage, storage.manifest(v), None, cpu, True, False), models)
        got = load.load(storage, storage.manifest(v2), None, cpu, True, False)
        assert_sets_equal(got, changed)
        one = load.load_model(storage, storage.manifest(v2), "cell_003", cpu, True, False)
        assert_sets_equal({"cell_003": one}, {"cell_003": changed["cell_003"]})
    finally:
        storage.close()
    assert storage.closed
