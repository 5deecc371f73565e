"""The command line, and import-time behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_set

import mmcore
from mmcore.cli import main


def test_import_neither_loads_native_module_nor_initialises_cuda(tmp_path: Path) -> None:
    code = (
        "import sys, torch, mmcore; "
        "assert 'mmcore._core' not in sys.modules, 'native module imported eagerly'; "
        "assert not torch.cuda.is_initialized(); "
        "print(mmcore.cuda_available()); "
        "assert not torch.cuda.is_initialized(); print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    # True on a GPU machine with the kernels built, False elsewhere: asking must not init CUDA
    assert proc.stdout.split() == [str(mmcore.cuda_available()), "ok"]


def test_missing_native_module_fails_at_call_time_with_diagnosis(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['mmcore._core'] = None; import mmcore; "
        "from mmcore.errors import NativeModuleError; from mmcore._native import core\n"
        "try:\n    core()\nexcept NativeModuleError as e:\n    print('diagnosed:', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "diagnosed: mmcore's native module could not be imported" in proc.stdout
    assert "Reinstall" in proc.stdout


@pytest.fixture
def filled(store_path: Path) -> tuple[Path, str]:
    with mmcore.open(store_path) as s:
        v = s.save(small_set(20), ref="fleet", message="first")
    return store_path, v


def test_info_log_verify(filled: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    path, v = filled
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "versions   1" in out and f"fleet -> {v}" in out and "baseline" in out
    assert main(["info", str(path), "fleet"]) == 0
    out = capsys.readouterr().out
    assert f"version    {v}" in out and "models     20" in out and "message    first" in out
    assert main(["log", str(path), "fleet"]) == 0
    assert v in capsys.readouterr().out
    assert main(["verify", str(path)]) == 0
    assert "verified 80 tensors" in capsys.readouterr().out


def test_verify_reports_corruption(
    filled: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, v = filled
    (pack,) = (path / "packs").glob("*.pack")
    data = bytearray(pack.read_bytes())
    data[4096 + 5] ^= 0x10
    pack.write_bytes(bytes(data))
    assert main(["verify", str(path), v]) == 1
    assert "CORRUPT" in capsys.readouterr().err


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "none.mm")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmcore: error:") and "not an mmcore store" in err
    assert not (tmp_path / "none.mm").exists()


def test_demo_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["demo", "--cells", "50", "--store", str(tmp_path / "demo.mm"), "--no-compare"]) == 0
    )
    out = capsys.readouterr().out
    assert "bit-exact round trip: yes" in out and "saved baseline" in out
    assert "ran all 50 on 64 rows each" in out and "ensemble output (50, 64, 1)" in out


def test_console_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mmcore.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"mmcore {mmcore.__version__}"
