"""Loads the native module lazily and explains why when it cannot.

``import mmcore`` never fails and never touches CUDA: the extension is imported
on the first call that needs it, and a failure becomes a
:class:`~mmcore.errors.NativeModuleError` that says what to do.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from .errors import NativeModuleError


@functools.lru_cache(maxsize=1)
def _load() -> ModuleType | BaseException:
    try:
        return importlib.import_module("mmcore._core")
    except ImportError as exc:  # kept, raised at call time with a diagnosis
        return exc


def core() -> ModuleType:
    """The native module ``mmcore._core``; raises NativeModuleError if unusable."""
    loaded = _load()
    if isinstance(loaded, BaseException):
        raise NativeModuleError(
            f"mmcore's native module could not be imported ({loaded}). "
            "Reinstall with `pip install --force-reinstall --no-deps mmcore` "
            "(building from source needs a C++17 compiler and CMake >= 3.25)."
        ) from loaded
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
