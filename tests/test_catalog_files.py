"""The catalog's own files (RocksDB's info LOG, MANIFEST, OPTIONS) stay bounded.

RocksDB starts a new info log on every write-open and, by default, keeps the old
ones (``LOG.old.*``, about 90 KB each, up to 1000 of them): a store grew by that
much per open, and fifteen ``mmcore gc`` runs on 188 KB of packs left 3.3 MB.
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import small_set

import mmcore
from mmcore.cli import main


def _files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_write_opens_do_not_grow_the_catalog(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        s.save(small_set(4), ref="fleet")
    catalog = store_path / "catalog"
    with mmcore.open(store_path):
        pass
    after_two = sum(_files(catalog).values())
    for _ in range(20):
        with mmcore.open(store_path):
            pass
    files = _files(catalog)
    total = sum(files.values())
    old_logs = [f for f in files if f.startswith("LOG.old")]
    assert not old_logs, f"old info logs kept: {old_logs}"
    # Twenty more opens add nothing but a few small SST/MANIFEST records.
    assert total < after_two + 64 * 1024, files
    assert total < 512 * 1024, files


def test_gc_runs_do_not_grow_the_store(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        s.save(small_set(4), ref="fleet")
    sizes = []
    for _ in range(15):
        assert main(["gc", str(store_path)]) == 0
        with mmcore.open(store_path, readonly=True) as s:
            sizes.append(s.stored_bytes())
    assert max(sizes) - min(sizes) < 64 * 1024, sizes


def test_stored_bytes_counts_every_catalog_and_pack_file(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        s.save(small_set(4), ref="fleet")
    for _ in range(3):
        with mmcore.open(store_path):
            pass
    with mmcore.open(store_path, readonly=True) as s:
        counted = s.stored_bytes()
    on_disk = sum(_files(store_path / "catalog").values()) + sum(
        os.path.getsize(p) for p in (store_path / "packs").glob("*.pack")
    )
    assert counted == on_disk


def test_old_info_logs_of_an_existing_store_go_at_its_next_write_open(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        s.save(small_set(2))
    catalog = store_path / "catalog"
    for i in range(5):  # as an mmcore before the bound left them, one per write-open
        (catalog / f"LOG.old.{1796290318887707 + i}").write_bytes(b"x" * 100_000)
    with mmcore.open(store_path, readonly=True):
        pass
    assert len(list(catalog.glob("LOG.old.*"))) == 5  # a reader changes nothing
    with mmcore.open(store_path):
        pass
    assert not list(catalog.glob("LOG.old.*"))
