"""gc with compaction: partly dead packs rewritten with their live bytes, delta
blobs moved whole (their table's offsets fixed by the content record's shift),
every version still loading exactly; and SIGKILL at random points of gc and
compaction never losing a referenced byte."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_sets_equal, save_retrained, small_set

import mmcore
from mmcore.examples import battery


def _two_architectures(n: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    models = {}
    for i in range(n):
        models[f"a{i:03d}"] = {"w": torch.randn(64, 64, generator=g)}
        models[f"b{i:03d}"] = {
            "w": torch.randn(32, 32, generator=g),
            "b": torch.randn(32, generator=g),
        }
    return models


def test_a_mostly_dead_pack_is_rewritten_with_its_live_bytes(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        both = _two_architectures(40, seed=1)
        only_b = {n: sd for n, sd in both.items() if n.startswith("b")}
        v1 = s.save(both)  # one pack: group a (640 KB) and group b
        v2 = s.save(only_b)  # the same bytes of group b: deduplicated, references v1's pack
        assert len(s.tier.list()) == 1
        s.delete(v1)
        before = s.stored_bytes()
        freed = s.gc()
        assert freed > 600_000 and s.stored_bytes() < before - 600_000
        assert_sets_equal(s.load(v2), only_b)
        assert s.check().ok


def _everything(s: mmcore.ModelStore) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """A store holding every kind of blob; returns each version's expected models."""
    expect = {}
    models = small_set(20, seed=2)
    v1 = s.save(models)
    expect[v1] = models
    changed = {n: {k: (t + 0.25 if t.is_floating_point() else t) for k, t in sd.items()} if i % 3 == 0 else sd
               for i, (n, sd) in enumerate(models.items())}  # fmt: skip
    v2 = s.save(changed, approach="update", parent=v1)
    expect[v2] = changed
    lossy = {
        n: {k: (t + 1e-3 if t.is_floating_point() else t) for k, t in sd.items()}
        for n, sd in changed.items()
    }
    v3 = s.save(lossy, approach="update", parent=v2, tolerance=1e-3)
    expect[v3] = s.load(v3)
    cells = battery.make_cells(6, seed=0)
    data = battery.make_data(list(cells), rows=16, seed=1)
    b = s.save(cells)
    expect[b] = cells
    p, expect[p] = save_retrained(s, b, data, s.put_dataset(data))
    return expect


def test_compacting_every_pack_moves_every_kind_of_blob(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmcore.store import compact

    # a rewritten pack starts its blobs 4 KiB further on: every blob moves, delta blobs too
    monkeypatch.setattr(compact, "_FIRST", compact.HEADER_SIZE + 4096)
    with mmcore.open(store_path) as s:
        expect = _everything(s)
        packs = set(s.tier.list())
        for _ in range(2):  # twice: a moved delta blob's shift adds up
            s.gc(compact_below=2)
            assert not packs & set(s.tier.list())  # every pack rewritten
            packs = set(s.tier.list())
        shifted = [k for k, raw in s.catalog.scan("content") if b"shift" in raw]
        assert shifted  # the delta blobs moved
    with mmcore.open(store_path) as s:  # nothing cached
        for vid, models in expect.items():
            assert_sets_equal(s.load(vid), models)
            name = next(iter(models))
            assert_sets_equal({name: s.load_model(vid, name)}, {name: models[name]})
        report = s.check()
        assert report.ok, report.problems


def test_rewriting_a_pack_whose_bytes_are_all_live_never_grows_it(store: mmcore.ModelStore) -> None:
    """Small groups of several architectures (one of empty tensors) in one pack, all
    live: compacting it anyway lays it out as the writer did (extents on their pages,
    then the hashes), so gc reports no negative bytes and the pack does not grow (found
    by the API fuzzer: -3584 bytes, the hashes interleaved with the extents)."""
    g = torch.Generator().manual_seed(0)
    models = {  # "page" fills its page but 16 bytes: its hashes would push "small" a page on
        "page": {"w": torch.randn(1020, generator=g)},
        "small": {"w": torch.randn(3, generator=g), "b": torch.randn((), generator=g)},
        "empty": {".w": torch.empty(4, 0)},
        "tiny": {"x": torch.randn(2, generator=g)},
    }
    v = store.save(models)
    before = sum(store.tier.size(p) for p in store.tier.list())
    for _ in range(2):
        assert store.gc(compact_below=2) >= 0
        after = sum(store.tier.size(p) for p in store.tier.list())
        assert after <= before
        before = after
    assert_sets_equal(store.load(v), models)
    assert store.check().ok


def test_gc_argument_is_checked(store: mmcore.ModelStore) -> None:
    with pytest.raises(mmcore.errors.InvalidArgumentError, match="compact_below must be a number"):
        store.gc(compact_below=-1)
    with pytest.raises(mmcore.errors.InvalidArgumentError, match="compact_below must be a number"):
        store.gc(compact_below=True)  # type: ignore[arg-type]


_CHILD = r"""
import sys, mmcore
with mmcore.open(sys.argv[1]) as s:
    print("READY", flush=True)
    while True:
        s.gc(compact_below=2)
"""


def test_sigkill_during_gc_and_compaction_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.mm"
    with mmcore.open(path) as s:
        expect = _everything(s)
        big = _two_architectures(60, seed=5)
        v = s.save(big)
        expect[v] = big
        s.save({n: sd for n, sd in big.items() if n.startswith("a")})  # dedups group a
        s.delete(v)  # group b of that pack is dead: a pack to compact
        del expect[v]
    rng = random.Random(7)
    kills = 0
    for trial in range(20):
        with subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(__file__)) as child:  # fmt: skip
            assert child.stdout is not None and child.stdout.readline().strip() == "READY"
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait()
        kills += child.returncode == -signal.SIGKILL
        with mmcore.open(path) as s:
            report = s.check()
            assert report.ok, (trial, report.problems)
            for vid, models in expect.items():
                assert_sets_equal(s.load(vid), models)
    assert kills >= 15  # the child was killed in its gc loop, not finished
    with mmcore.open(path) as s:  # what the kills left is garbage the next gc takes
        s.gc(compact_below=0)
        live = {
            mmcore.manifest.ContentRecord.decode(raw).pack for _, raw in s.catalog.scan("content")
        }
        assert set(s.tier.list()) == live
