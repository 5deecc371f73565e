"""Power cuts: a store on a file system that drops every write not yet fsynced.

``tests/powerloss/faultfs.py`` is a FUSE file system that keeps, beside what
programs see, what a disk would still hold after a power cut: file contents as
of their last fsync, directory entries as of their directory's last fsync (in
the manner of RocksDB's FaultInjectionTestFS and LazyFS). It records that
durable state after every sync, and numbers every operation.

``tests/powerloss/workload.py`` creates a store on it and runs saves, deletes,
gc and reopenings, marking the start and end of each call. Afterwards each cut
point k (power lost just before operation k) is checked on a real directory
holding the durable state at k: the store opens, every version whose save had
returned (and was not deleted by a delete that had returned) is there, verifies
and loads bit for bit, no version a returned delete removed is back, nothing
that was never saved is visible, the ref points at a visible version, and the
recovered store takes gc and a new save.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_sets_equal, small_set

import mmcore

HERE = Path(__file__).parent / "powerloss"
sys.path.insert(0, str(HERE))
from workload import models_for  # noqa: E402

ROUNDS = 150
CUTS_PER_PHASE = {"save": 110, "delete": 45, "gc": 45, "open": 20, "idle": 10}

pytestmark = pytest.mark.slow


def _fuse_missing() -> str | None:
    if shutil.which("fusermount3") is None:
        return "fusermount3 not found (Debian package fuse3; scripts/test.sh installs it as root)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist on this machine"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy cannot load libfuse3: {exc}"
    return None


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    missing = _fuse_missing()
    if missing:
        pytest.skip(missing)
    mnt, out = tmp_path / "mnt", tmp_path / "fs-out"
    mnt.mkdir()
    out.mkdir()
    log = tmp_path / "faultfs.log"
    with open(log, "wb") as sink:
        fs = subprocess.Popen([sys.executable, str(HERE / "faultfs.py"), str(mnt), str(out)],
                              stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        if fs.poll() is not None or time.monotonic() > deadline:
            fs.kill()
            fs.wait()
            pytest.skip(f"FUSE cannot mount here: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)
    try:
        yield mnt, out
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            fs.wait(timeout=120)
        except subprocess.TimeoutExpired:
            fs.kill()


@dataclass
class Run:
    states: list[tuple[int, dict[str, int], list[str]]]  # (op index, files -> blob, dirs)
    marks: list[tuple[int, str]]
    blobs: Path

    def __post_init__(self) -> None:  # the op indices, searched once per cut
        self._state_ops = [st[0] for st in self.states]
        self._mark_ops = [m[0] for m in self.marks]

    def state_before(self, op: int) -> tuple[dict[str, int], list[str]]:
        """The durable state if power is lost just before operation ``op``."""
        i = bisect.bisect_left(self._state_ops, op) - 1
        return self.states[i][1], self.states[i][2]

    def phase_of(self, op: int) -> str:
        i = bisect.bisect_left(self._mark_ops, op) - 1
        if i < 0:
            return "idle"
        step, kind = self.marks[i][1].split("-")[1:3]
        return kind if step == "begin" else "idle"


def _load(out: Path) -> Run:
    assert (out / "DONE").exists(), "the file system did not write its record"
    states = [
        (op, s["files"], s["dirs"]) for op, s in json.loads((out / "states.json").read_text())
    ]
    marks = [(op, name) for op, name in json.loads((out / "marks.json").read_text())]
    return Run(states, sorted(marks), out / "blobs")


def _materialize(run: Run, op: int, root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    files, dirs = run.state_before(op)
    for d in sorted(dirs, key=len):
        (root / d).mkdir(parents=True, exist_ok=True)
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.blobs / str(blob), root / rel)


def _expectations(run: Run, op: int) -> tuple[dict[str, int], set[str], dict[str, int], bool]:
    """Versions that must be there (with their content seeds), must be gone, may be
    there; and whether open() had returned (so the store must exist)."""
    returned, deleting, deleted, ever = {}, set(), set(), {}
    opened = False
    for at, name in run.marks:
        words = name.split("-")
        if words[1:3] == ["end", "save"]:
            ever[words[3]] = int(words[4])
            if at < op:
                returned[words[3]] = int(words[4])
        elif words[1:3] == ["begin", "delete"] and at < op:
            deleting.add(words[3])  # a delete under way may or may not have committed
        elif words[1:3] == ["end", "delete"] and at < op:
            deleted.add(words[3])
        elif words[1:3] == ["end", "open"] and at < op:
            opened = True
    return {v: s for v, s in returned.items() if v not in deleting}, deleted, ever, opened


def _check_cut(run: Run, op: int, root: Path) -> int:
    must, gone, ever, opened = _expectations(run, op)
    _materialize(run, op, root)
    path = root / "fleet.mm"
    if not (path / "MMCORE").exists():
        assert not opened and not must, f"cut at op {op}: the store vanished after open returned"
        return 0
    with mmcore.open(path) as store:
        visible = {v.id for v in store.versions()}
        assert set(must) <= visible, (
            f"cut at op {op}: returned versions lost: {set(must) - visible}"
        )
        assert not visible & gone, f"cut at op {op}: deleted versions are back: {visible & gone}"
        assert visible <= set(ever), f"cut at op {op}: versions never saved: {visible - set(ever)}"
        for vid in visible:
            assert store.verify(vid) > 0
            assert_sets_equal(store.load(vid), models_for(ever[vid]))
        head = store.refs().get("fleet")
        assert head is None or head in visible, f"cut at op {op}: ref points at {head}"
        store.gc()
        fresh = store.save(small_set(3), ref="after-cut")
        assert_sets_equal(store.load(fresh), small_set(3))
    return len(visible)


def _pick_cuts(run: Run, last_op: int, rng: random.Random) -> dict[str, list[int]]:
    by_phase: dict[str, list[int]] = {p: [] for p in CUTS_PER_PHASE}
    for op in range(1, last_op + 2):
        by_phase[run.phase_of(op)].append(op)
    picked = {}
    for phase, want in CUTS_PER_PHASE.items():
        ops = by_phase[phase]
        picked[phase] = sorted(rng.sample(ops, min(want, len(ops))))
    # right after every call returned: the states most likely to expose a missing sync
    picked["returned"] = [at + 1 for at, name in run.marks if "-end-" in name]
    return picked


def test_power_cuts_lose_nothing_that_was_returned(
    mounted: tuple[Path, Path], tmp_path: Path
) -> None:
    mnt, out = mounted
    proc = subprocess.run([sys.executable, str(HERE / "workload.py"), str(mnt), str(ROUNDS), "7"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    deadline = time.monotonic() + 120
    while not (out / "DONE").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run = _load(out)
    last_op = max(len((out / "ops.txt").read_text().splitlines()), run.marks[-1][0])
    cuts = _pick_cuts(run, last_op, random.Random(11))
    counts: Counter[str] = Counter()
    seen_versions = 0
    for phase, ops in cuts.items():
        for op in ops:
            seen_versions += _check_cut(run, op, tmp_path / "cut")
            counts[phase] += 1
    total = sum(counts.values())
    print(f"\npower cuts: {total} ({dict(counts)}), {len(run.states)} durable states, "
          f"{last_op} ops, {seen_versions} versions checked")  # fmt: skip
    assert total >= 200
    assert min(counts["save"], counts["delete"], counts["gc"]) >= 40
