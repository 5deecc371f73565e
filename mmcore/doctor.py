"""``mmcore doctor``: what this installation of mmcore can do, and why not.

Versions (mmcore, Python, torch and its CUDA, the CUDA toolkit the native module
was built with), where mmcore was imported from, whether the CUDA kernels were
built and for which architectures, whether a CUDA device can run them (and if not,
why: not built, torch without CUDA, no driver or device, a compute capability too
old or not in the build), whether nvCOMP is installed, and the store formats this
build reads and writes. Asking for a diagnosis is asking for the device: this is
the one command that initialises CUDA on purpose (and only where the kernels are
built and torch has CUDA).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from . import __version__
from ._native import DISTRIBUTION, _load, diagnosis

MIN_CAPABILITY = (8, 0)  # the kernels' oldest device code (kernels.cuda.MIN_CAPABILITY)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _capability(arch: str) -> tuple[int, int]:
    """(major, minor) of "sm_86" / "compute_120" / "sm_90a"."""
    digits = "".join(c for c in arch.partition("_")[2] if c.isdigit())
    return int(digits[:-1] or 0), int(digits[-1:] or 0)


def runs_on(archs: Sequence[str], cap: tuple[int, int]) -> str | None:
    """The architecture of ``archs`` a device of compute capability ``cap`` runs
    (device code of the same major version and no newer minor one, else PTX of no
    newer capability, which the driver compiles), or None."""
    sass = [a for a in archs if a.startswith("sm_")]
    ptx = [a for a in archs if a.startswith("compute_")]
    same = [a for a in sass if _capability(a)[0] == cap[0] and _capability(a) <= cap]
    if same:
        return max(same, key=_capability)
    older = [a for a in ptx if _capability(a) <= cap]
    if older:
        return max(older, key=_capability) + " (PTX, compiled by the driver)"
    return None


def _device_lines(core: ModuleType | None) -> list[tuple[str, str]]:
    """Whether a CUDA device can run the kernels, and if not why."""
    import torch

    if core is None:
        return [("CUDA device", "not usable: the native module did not load (above)")]
    if not getattr(core, "built_with_cuda", False):
        return [("CUDA device", "not used: the CUDA kernels were not built (nvcc was not found "
                 "when this mmcore was built); tensors on a GPU take the host path")]  # fmt: skip
    if torch.version.cuda is None:
        return [("CUDA device", f"not usable: torch {torch.__version__} is a build without CUDA "
                 "(the kernels work on torch's CUDA tensors)")]  # fmt: skip
    ours = int(core.cuda_device_count())  # initialises mmcore's own (static) CUDA runtime
    if not torch.cuda.is_available():
        why = (
            "no CUDA driver answers (is the NVIDIA driver installed and loaded?)"
            if ours < 0
            else "the driver reports no device"
        )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            why += f"; CUDA_VISIBLE_DEVICES={visible!r}"
        return [("CUDA device", f"not usable: {why}")]
    if ours <= 0:
        return [("CUDA device", f"not usable: torch sees {torch.cuda.device_count()} device(s) "
                 f"but mmcore's CUDA {getattr(core, 'cuda_version', '?')} runtime gets "
                 f"{'no answer' if ours < 0 else 'none'}: the driver is likely older than "
                 "that CUDA release needs; update the NVIDIA driver")]  # fmt: skip
    archs = tuple(getattr(core, "cuda_architectures", ()))
    lines = []
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        name = torch.cuda.get_device_name(i)
        what = f"cuda:{i} {name}, compute capability {cap[0]}.{cap[1]}"
        if cap < MIN_CAPABILITY:
            verdict = (f"not usable: compute capability too old (the kernels need "
                       f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer); its tensors take "
                       "the host path")  # fmt: skip
        elif not archs:  # a module too old to say: it has sm_80 and sm_90 at least
            verdict = "usable (the module does not list its architectures)"
        else:
            arch = runs_on(archs, cap)
            verdict = (f"usable: runs {arch}" if arch else
                       f"not usable: this build has no code for it (built for {' '.join(archs)}); "
                       f"rebuild with MMCORE_CUDA_ARCHS={cap[0]}{cap[1]}")  # fmt: skip
        lines.append(("CUDA device", f"{what}: {verdict}"))
    return lines


def _nvcomp_line() -> str:
    from .codec.frames import nvcomp_available

    installed = [
        f"{name} {version}"
        for name in ("nvidia-nvcomp-cu13", "nvidia-nvcomp-cu12")
        if (version := _dist_version(name))
    ]
    if os.environ.get("MMCORE_NVCOMP", "1") == "0":
        return f"turned off (MMCORE_NVCOMP=0){'; installed: ' + ', '.join(installed) if installed else ''}"
    if nvcomp_available():
        return (f"installed ({', '.join(installed) or 'nvidia.nvcomp'}): update blobs of sets on "
                "a GPU are compressed there")  # fmt: skip
    if installed:
        return f"{', '.join(installed)} installed but nvidia.nvcomp does not import"
    return (f"not installed (pip install '{DISTRIBUTION}[gpu]'); update blobs are compressed on "
            "the CPU")  # fmt: skip


def _format_line() -> str:
    from .manifest import CONTENT_FORMAT, DATASET_FORMAT, MANIFEST_FORMAT
    from .store.layout import FORMAT_VERSION
    from .store.packs import PACK_VERSION

    return (f"store {FORMAT_VERSION}, packs {PACK_VERSION}, manifests up to {MANIFEST_FORMAT}, "
            f"content records up to {CONTENT_FORMAT}, datasets up to {DATASET_FORMAT} "
            "(reads these and older, writes none newer; a newer store is refused)")  # fmt: skip


def report() -> tuple[list[tuple[str, str]], bool]:
    """The doctor's lines, and whether the native module loaded."""
    import torch

    package = Path(__file__).resolve().parent
    dist = _dist_version(DISTRIBUTION)
    where = f"{DISTRIBUTION} {dist}" if dist else f"no {DISTRIBUTION} distribution installed"
    lines = [
        ("mmcore", f"{__version__} ({where}) from {package}"),
        ("python", f"{platform.python_version()} ({sys.executable}), {platform.machine()}"),
        ("torch", f"{torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}"),
    ]
    loaded = _load()
    core = None if isinstance(loaded, BaseException) else loaded
    if core is None:
        assert isinstance(loaded, BaseException)
        lines.append(("native module", f"NOT LOADED: {diagnosis(loaded)}"))
    else:
        lines.append(("native module", f"{core.__file__} (CPU BLAKE3: {core.blake3_isa()})"))
        if getattr(core, "built_with_cuda", False):
            archs = " ".join(getattr(core, "cuda_architectures", ()))
            version = getattr(core, "cuda_version", None)
            built = (f"built with CUDA {version} (runtime linked statically) for {archs}"
                     if version and archs else
                     "built (this older build does not list its CUDA version and architectures)")  # fmt: skip
            lines.append(("CUDA kernels", built))
        else:
            lines.append(("CUDA kernels", "not built (nvcc was not found when this mmcore was "
                          "built, or MMCORE_CUDA=OFF): CPU kernels only"))  # fmt: skip
    lines += _device_lines(core)
    lines.append(("nvCOMP", _nvcomp_line()))
    lines.append(("formats", _format_line()))
    return lines, core is not None


def main(args: argparse.Namespace | None = None) -> int:
    """Prints the report; exit 1 when the native module does not load (nothing works
    then), else 0 (a machine without a usable GPU works on the CPU)."""
    lines, ok = report()
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return 0 if ok else 1
