"""One writer per store; readers alongside."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import assert_sets_equal, small_set

import mmcore
from mmcore.errors import StoreLockedError


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd outside the checkout, so the installed package is imported, not the source tree
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_second_writer_in_another_process_gets_lock_error(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        v = s.save(small_set(3), ref="fleet")
        proc = _run(
            f"""
            import mmcore
            from mmcore.errors import StoreLockedError
            try:
                mmcore.open({str(store_path)!r})
            except StoreLockedError as e:
                print("LOCKED", e)
            with mmcore.open({str(store_path)!r}, readonly=True) as r:
                print("READ", len(r.load({v!r})))
        """,
            cwd=store_path.parent,
        )
        assert proc.returncode == 0, proc.stderr
        assert "LOCKED" in proc.stdout and "open for writing in another process" in proc.stdout
        assert "READ 3" in proc.stdout


def test_second_writer_in_same_process_gets_lock_error(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        s.save(small_set(1))
        with pytest.raises(StoreLockedError, match="readonly=True"):
            mmcore.open(store_path)
    with mmcore.open(store_path) as s:  # released on close
        assert len(s.versions()) == 1


def test_reader_sees_versions_committed_before_it_opened(store_path: Path) -> None:
    with mmcore.open(store_path) as w:
        v1 = w.save(small_set(2, seed=1))
        with mmcore.open(store_path, readonly=True) as r:
            assert_sets_equal(r.load(v1), small_set(2, seed=1))
