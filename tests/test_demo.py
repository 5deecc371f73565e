"""``mmcore demo`` as a pip-installed user runs it: the core dependencies only (no
safetensors, ZipNN, PyBaMM, scikit-learn, matplotlib or numpy; never the repository's
``benchmarks``), medians that the headline and the table share, a note (not an error)
for a missed target; and ``mmcore du`` on versions whose bytes were stored before."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mmcore
from mmcore import demo
from mmcore.cli import main

# What a fresh `pip install mmcore` lacks: a finder that refuses them, first on the path.
BLOCKED = ("safetensors", "zipnn", "pybamm", "sklearn", "matplotlib", "numpy", "benchmarks")
CORE_ONLY = textwrap.dedent(
    """
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    from mmcore.cli import main
    sys.exit(main(sys.argv[1:]))
    """
).format(blocked=set(BLOCKED))


def _core_only(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    package_root = Path(mmcore.__file__).resolve().parent.parent  # the mmcore under test
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", CORE_ONLY, *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(package_root)},
    )  # fmt: skip


def test_the_finder_blocks_what_the_bench_extras_bring(tmp_path: Path) -> None:
    script = CORE_ONLY.replace("from mmcore.cli import main\nsys.exit(main(sys.argv[1:]))",
                               "import safetensors")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "No module named 'safetensors' (blocked)" in proc.stderr


def _median_ms(out: str, step: str) -> float:
    match = re.search(rf"{step}.*?\s([\d.]+) ms$", out, re.MULTILINE)
    assert match, (step, out)
    return float(match.group(1))


@pytest.mark.slow
def test_demo_with_its_comparison_needs_only_the_core_dependencies(tmp_path: Path) -> None:
    store = tmp_path / "demo.mm"
    proc = _core_only(["demo", "--cells", "200", "--repeat", "2", "--store", str(store)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "bit-exact round trip: yes" in out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()
            if line.startswith(("mmcore baseline ", "raw bytes", "torch.save"))}  # fmt: skip
    assert set(rows) == {demo.MMCORE_ROW, demo.Raw.name, demo.TorchSavePerModel.name}
    # the headline is the table's median, not a run of its own
    save_s = float(rows[demo.MMCORE_ROW][2])
    assert abs(_median_ms(out, "saved baseline") / 1e3 - save_s) < 1.5e-3
    load_s = float(rows[demo.MMCORE_ROW][3])
    assert abs(_median_ms(out, "hash checked") / 1e3 - load_s) < 1.5e-3
    for column in ("save s", "load s", "one model ms", "stored", "save/mm", "load/mm"):
        assert re.search(rf"^  {re.escape(column)}\s+\S", out, re.MULTILINE), column
    inspect = out.split("inspect it:\n", 1)[1].splitlines()[:4]
    assert [line.split()[1] for line in inspect] == ["info", "log", "du", "verify"]
    assert not any("|" in line for line in inspect)
    assert "python -m benchmarks.demo" in out  # where the full comparison is
    with mmcore.open(store, readonly=True) as s:
        assert [v.id for v in s.versions()] == [s.refs()["battery"]]  # the last run's only
    assert [p.name for p in tmp_path.iterdir()] == ["demo.mm"]  # the comparison's files gone


def test_demo_without_comparison_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--cells", "30", "--repeat", "2", "--no-compare",
                 "--store", str(tmp_path / "d.mm")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "median of 2 run(s)" in out and "bit-exact round trip: yes" in out
    assert "compared in this process" not in out


def _measured(save: dict[str, float], load: dict[str, float]) -> demo._Measured:
    clock = demo._Clock()
    for name, s in save.items():
        clock.times[(name, "save")] = [s]
        clock.times[(name, "load")] = [load[name]]
        clock.times[(name, "one")] = [1e-4]
    clock.times[(demo.MMCORE_ROW, "load, no hash")] = [load[demo.MMCORE_ROW] / 2]
    stored = dict.fromkeys(save, 1000)
    return demo._Measured(clock, stored, "v", True, 8, 0.0)


def test_a_missed_target_is_a_note_not_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    mm, raw, ts = demo.MMCORE_ROW, demo.Raw.name, demo.TorchSavePerModel.name
    got = _measured({mm: 0.3, raw: 0.1, ts: 9.0}, {mm: 0.2, raw: 0.1, ts: 9.0})
    demo._compare(got, [mm, raw, ts], nbytes=1000, cells=10_000, slow={ts})
    out = capsys.readouterr().out
    assert "[missed here] save <= 1.5x raw write+fsync: 3.00x" in out
    assert "[ok] load, hashes checked, <= 3x raw read: 2.00x" in out
    assert "not an error (exit status 0)" in out
    assert "MISSED" not in out


def test_du_counts_bytes_stored_before_where_they_were_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sds = {f"m{i}": {"w": torch.randn(64, 64), "b": torch.randn(64)} for i in range(20)}
    changed = {**sds, "m3": {"w": sds["m3"]["w"] + 1, "b": sds["m3"]["b"]}}
    with mmcore.open(tmp_path / "s.mm") as s:
        first = s.save(sds)
        again = s.save(sds)  # the same bytes: referenced, not stored again
        upd = s.save(changed, approach="update", parent=first)
        upd_again = s.save(changed, approach="update", parent=first)
        stored = {v: s.info(v).stored_bytes for v in (first, again, upd, upd_again)}
    assert stored[again] < 4096 and stored[upd_again] < 4096
    assert main(["du", str(tmp_path / "s.mm")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:16] in stored}
    for v in (again, upd_again):
        assert rows[v][-3:-1] == ["shared", "shared"], out
    for v in (first, upd):
        assert "shared" not in rows[v], out
    assert "this version stores only its manifest" in out
