"""`mmcore doctor`: run as a user would, and its device verdicts on made-up devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mmcore import doctor
from mmcore._native import core
from mmcore.cli import main
from mmcore.codec.frames import nvcomp_available
from mmcore.manifest import CONTENT_FORMAT, DATASET_FORMAT, MANIFEST_FORMAT
from mmcore.store.layout import FORMAT_VERSION
from mmcore.store.packs import PACK_VERSION

KEYS = ["mmcore", "python", "torch", "native module", "CUDA kernels", "CUDA device", "nvCOMP",
        "formats"]  # fmt: skip
WHEEL_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "compute_120")


def _lines(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        key = next(k for k in KEYS if line.startswith(k + " "))
        found.setdefault(key, line[len(key) :].strip())
    return found


def test_doctor_command_reports_this_install(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mmcore", "doctor"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = _lines(proc.stdout)
    assert list(got) == KEYS, proc.stdout
    import mmcore

    assert got["mmcore"].startswith(mmcore.__version__)
    assert str(Path(mmcore.__file__).parent) in got["mmcore"]
    assert got["torch"].startswith(torch.__version__ + ", CUDA ")
    assert (torch.version.cuda or "none") in got["torch"]
    mod = core()
    assert got["native module"].startswith(str(mod.__file__))
    if mod.built_with_cuda:
        assert got["CUDA kernels"].startswith(f"built with CUDA {mod.cuda_version} ")
        assert got["CUDA kernels"].endswith(" ".join(mod.cuda_architectures))
    else:
        assert got["CUDA kernels"].startswith("not built")
        assert got["CUDA device"].startswith("not used: the CUDA kernels were not built")
    assert got["nvCOMP"].startswith("installed" if nvcomp_available() else "not installed")
    assert "mmcore-models[gpu]" in got["nvCOMP"] or nvcomp_available()
    assert got["formats"].startswith(
        f"store {FORMAT_VERSION}, packs {PACK_VERSION}, manifests up to {MANIFEST_FORMAT}, "
        f"content records up to {CONTENT_FORMAT}, datasets up to {DATASET_FORMAT} "
    )


def test_doctor_verb_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    assert list(_lines(capsys.readouterr().out)) == KEYS


def test_doctor_without_the_native_module(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['mmcore._core'] = None\n"
        "from mmcore.cli import main; sys.exit(main(['doctor']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    got = _lines(proc.stdout)
    assert got["native module"].startswith("NOT LOADED: mmcore's native module could not be imp")
    import mmcore

    checkout = (Path(mmcore.__file__).parent.parent / "CMakeLists.txt").is_file()
    advice = (
        "bash scripts/setup.sh"
        if checkout
        else "pip install --force-reinstall --no-deps mmcore-models"
    )
    assert advice in got["native module"]
    assert got["CUDA device"].startswith("not usable: the native module did not load")
    assert got["formats"].startswith(f"store {FORMAT_VERSION},")


def test_the_native_module_says_how_it_was_built() -> None:
    mod = core()
    archs = getattr(mod, "cuda_architectures", None)
    assert archs is not None, (
        "a native module from before cuda_architectures: bash scripts/setup.sh"
    )
    assert isinstance(archs, tuple)
    if mod.built_with_cuda:
        assert mod.cuda_version and mod.cuda_version[0].isdigit()
        assert archs and all(a.startswith(("sm_", "compute_")) for a in archs)
        assert any(a.startswith("compute_") for a in archs), "PTX of the newest, for newer GPUs"
    else:
        assert archs == () and mod.cuda_version is None


@pytest.mark.parametrize(
    ("cap", "want"),
    [((8, 0), "sm_80"), ((8, 6), "sm_86"), ((8, 7), "sm_86"), ((8, 9), "sm_89"),
     ((9, 0), "sm_90"), ((10, 0), "sm_100"), ((10, 3), "sm_100"), ((12, 0), "sm_120"),
     ((12, 1), "sm_120"), ((13, 0), "compute_120 (PTX, compiled by the driver)"),
     ((11, 0), None)],
)  # fmt: skip
def test_which_code_a_device_runs(cap: tuple[int, int], want: str | None) -> None:
    assert doctor.runs_on(WHEEL_ARCHS, cap) == want


def test_which_code_a_device_runs_in_a_dev_build() -> None:
    dev = ("sm_80", "sm_90", "compute_90")
    assert doctor.runs_on(dev, (8, 6)) == "sm_80"
    assert doctor.runs_on(dev, (10, 0)) == "compute_90 (PTX, compiled by the driver)"


def _fake(monkeypatch: pytest.MonkeyPatch, *, torch_cuda: str | None = "13.0", devices: int = 1,
          cap: tuple[int, int] = (9, 0), ours: int | None = None, built: bool = True,
          archs: tuple[str, ...] = WHEEL_ARCHS) -> Any:  # fmt: skip
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Made-up GPU")
    count = devices if ours is None else ours
    return SimpleNamespace(built_with_cuda=built, cuda_version="13.0.88", cuda_architectures=archs,
                           cuda_device_count=lambda: count)  # fmt: skip


def _verdict(fake: Any) -> str:
    lines = doctor._device_lines(fake)
    assert lines[0][0] == "CUDA device"
    return lines[0][1]


def test_device_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        assert "usable: runs sm_90" in _verdict(_fake(m, cap=(9, 0)))
    with monkeypatch.context() as m:
        got = _verdict(_fake(m, cap=(7, 5)))
        assert "compute capability 7.5: not usable: compute capability too old" in got
        assert "8.0 or newer" in got
    with monkeypatch.context() as m:
        got = _verdict(_fake(m, cap=(11, 0)))
        assert "not usable: this build has no code for it" in got and "MMCORE_CUDA_ARCHS=110" in got
    with monkeypatch.context() as m:
        assert _verdict(_fake(m, built=False)).startswith(
            "not used: the CUDA kernels were not built"
        )
    with monkeypatch.context() as m:
        assert "is a build without CUDA" in _verdict(_fake(m, torch_cuda=None))
    with monkeypatch.context() as m:
        got = _verdict(_fake(m, devices=0, ours=-1))
        assert got.startswith("not usable: no CUDA driver answers")
    with monkeypatch.context() as m:
        assert _verdict(_fake(m, devices=0, ours=0)) == "not usable: the driver reports no device"
    with monkeypatch.context() as m:
        got = _verdict(_fake(m, devices=1, ours=-1))
        assert "the driver is likely older than that CUDA release needs" in got
