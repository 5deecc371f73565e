"""Loads the native module lazily and explains why when it cannot.

``import mmcore`` never fails and never touches CUDA: the extension is imported
on the first call that needs it, and a failure becomes a
:class:`~mmcore.errors.NativeModuleError` that says what to do.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from types import ModuleType

from .errors import NativeModuleError

DISTRIBUTION = "mmcore-models"  # the name on PyPI; the import name is mmcore


@functools.lru_cache(maxsize=1)
def _load() -> ModuleType | BaseException:
    try:
        return importlib.import_module("mmcore._core")
    except ImportError as exc:  # kept, raised at call time with a diagnosis
        return exc


def _built_copies(package: Path) -> list[Path]:
    """Other folders on sys.path holding an ``mmcore`` package with a built ``_core``."""
    found = []
    for entry in sys.path:
        other = Path(entry or ".").resolve() / "mmcore"
        if other != package and any(other.glob("_core*.so")):
            found.append(other)
    return found


def diagnosis(error: BaseException) -> str:
    """Why ``mmcore._core`` did not import, and what to do about it."""
    package = Path(__file__).resolve().parent
    text = f"mmcore's native module could not be imported from {package} ({error}). "
    source_tree = (package.parent / "CMakeLists.txt").is_file() and (
        package.parent / "pyproject.toml"
    ).is_file()
    if source_tree:
        # Python looks in the current directory first: a checkout's mmcore/ folder,
        # never built in place (or built for another Python), shadows the installed one.
        if any(package.glob("_core*.so")):
            text += (
                f"This mmcore is the source tree at {package.parent}, and its mmcore/_core*.so "
                "does not load: Reinstall it in place with `bash scripts/setup.sh` there (it "
                "rebuilds mmcore/_core*.so in the tree)"
            )
        else:
            text += (
                f"This mmcore is the source tree at {package.parent}, not built in place: run "
                "`bash scripts/setup.sh` there (it builds mmcore/_core*.so in the tree)"
            )
        others = _built_copies(package)
        if others:
            text += f", or run from another directory to use the installed one at {others[0]}"
        return text + "."
    return (
        text + f"Reinstall with `pip install --force-reinstall --no-deps {DISTRIBUTION}` "
        "(the wheel has it built; building from source needs a C++17 compiler and CMake >= 3.25)."
    )


def core() -> ModuleType:
    """The native module ``mmcore._core``; raises NativeModuleError if unusable."""
    loaded = _load()
    if isinstance(loaded, BaseException):
        raise NativeModuleError(diagnosis(loaded)) from loaded
    return loaded


def available() -> bool:
    return not isinstance(_load(), BaseException)


def cuda_available() -> bool:
    """True when the CUDA kernels were built and a CUDA device is usable.

    Asks the CUDA runtime only when called, never at import. The kernels run on
    compute capability 8.0 and newer; tensors on an older GPU take the host path
    (``mmcore.kernels.cuda.available``).
    """
    if not available():
        return False
    mod = core()
    if not getattr(mod, "built_with_cuda", False):
        return False
    return bool(mod.cuda_device_count() > 0)
