"""How mmcore is installed: the distribution's name, the copy that runs, and what
a source tree without its native module says (never that a store is damaged)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import small_set

import mmcore

HERE = Path(mmcore.__file__).resolve().parent


def test_the_distribution_is_mmcore_models() -> None:
    # "mmcore" on PyPI is an unrelated package: the distribution is mmcore-models
    dist = importlib.metadata.distribution("mmcore-models")
    assert dist.version == mmcore.__version__
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"mmcore": "mmcore.cli:main"}
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("mmcore")  # an old install under the old name shadows


@pytest.mark.skipif(os.environ.get("MMCORE_TEST_INSTALLED") != "1",
                    reason="set by scripts/test.sh when it tests the installed wheel")  # fmt: skip
def test_the_installed_wheel_is_what_runs() -> None:
    from mmcore._native import core

    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    for path in (Path(mmcore.__file__), Path(str(core().__file__))):
        assert any(path.resolve().is_relative_to(s) for s in site), (
            f"{path} is not in this venv's site-packages {site}: the source tree shadows the wheel"
        )


# An editable install's import hook would find mmcore._core in the checkout it was
# made from; a user's source tree has no such rescue: drop the hook.
NO_EDITABLE_HOOK = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('_editable')]\n"
)


def _source_tree(tmp_path: Path) -> Path:
    """A checkout's layout, never built in place: mmcore/ without _core*.so."""
    root = tmp_path / "checkout"
    shutil.copytree(HERE, root / "mmcore", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (root / "CMakeLists.txt").write_text("# stands for the checkout's\n")
    (root / "pyproject.toml").write_text("# stands for the checkout's\n")
    return root


def test_verify_in_a_source_tree_without_the_native_module(tmp_path: Path) -> None:
    root = _source_tree(tmp_path)
    with mmcore.open(root / "mmcore-demo.mm") as s:
        v = s.save(small_set(4), ref="fleet")
    # PYTHONPATH stays (the dependencies may be installed through it, as on the GPU
    # machine): the checkout, the working directory, comes before it on sys.path
    env = dict(os.environ)
    python_m = NO_EDITABLE_HOOK + (  # python -m mmcore verify mmcore-demo.mm
        "import runpy; sys.argv = ['mmcore', 'verify', 'mmcore-demo.mm']\n"
        "runpy.run_module('mmcore', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", python_m], capture_output=True, text=True,
                          timeout=120, cwd=root, env=env)  # fmt: skip
    assert "CORRUPT" not in proc.stdout + proc.stderr
    assert "damaged" not in proc.stdout + proc.stderr
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("mmcore: error: the native module is missing: ")
    assert f"source tree at {root}" in proc.stderr and "bash scripts/setup.sh" in proc.stderr
    assert "nothing was verified" in proc.stderr
    # User code run there gets the same advice, not "reinstall"
    code = (
        NO_EDITABLE_HOOK
        + f"import mmcore\nwith mmcore.open('mmcore-demo.mm', readonly=True) as s: s.load({v!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=root, env=env)  # fmt: skip
    assert proc.returncode == 1
    assert "NativeModuleError" in proc.stderr and "bash scripts/setup.sh" in proc.stderr
    assert "--force-reinstall" not in proc.stderr
    # The store is whole: the real mmcore verifies it
    with mmcore.open(root / "mmcore-demo.mm", readonly=True) as s:
        assert s.check().ok
