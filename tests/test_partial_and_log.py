"""One model reads only its bytes; info, log, delete and gc."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_sets_equal, small_set

import mmcore
from mmcore.errors import InvalidArgumentError


def test_load_model_reads_only_that_models_bytes(store: mmcore.ModelStore) -> None:
    big = {
        f"m{i}": {"w": small_set(1, seed=i)["cell_000"]["l0.weight"].repeat(100, 1)}
        for i in range(500)
    }
    v = store.save(big)
    stride = store.manifest(v).groups[0].schema.stride
    # its hash (32 B); on object storage the page of the hash table around it, which the
    # store keeps for the next model of that page (here the table is one page: 500 x 32 B)
    hashes = 500 * 32 if store.remote else 32
    for verify, expected in ((False, stride), (True, stride + hashes)):
        before = store.tier.bytes_read
        got = store.load_model(v, "m321", verify=verify)
        assert store.tier.bytes_read - before == expected
        assert_sets_equal({"m321": got}, {"m321": big["m321"]})
    if store.remote:  # the page kept: the next model reads its own bytes only
        before = store.tier.bytes_read
        assert_sets_equal({"m7": store.load_model(v, "m7")}, {"m7": big["m7"]})
        assert store.tier.bytes_read - before == stride
    before = store.tier.bytes_read
    store.load(v, verify=False)
    assert store.tier.bytes_read - before == 500 * stride


def test_info_counts_bytes(store: mmcore.ModelStore) -> None:
    models = small_set(100)
    v = store.save(models, ref="fleet", message="hello")
    info = store.info(v)
    logical = sum(t.numel() * t.element_size() for sd in models.values() for t in sd.values())
    assert info.logical_bytes == logical
    assert info.num_models == 100 and info.num_tensors == 400
    assert logical < info.stored_bytes < logical + 4096 * 3 + 100 * 200
    assert info.refs == ("fleet",) and info.message == "hello" and info.parent is None
    assert info.as_dict()["refs"] == ["fleet"]


def test_log_follows_the_ref_newest_first(store: mmcore.ModelStore) -> None:
    v1 = store.save(small_set(2, seed=1), ref="fleet")
    other = store.save(small_set(2, seed=9), ref="other")
    v2 = store.save(small_set(2, seed=2), ref="fleet")
    v3 = store.save(small_set(2, seed=3), ref="fleet")
    assert [i.id for i in store.log("fleet")] == [v3, v2, v1]
    assert [i.id for i in store.log("other")] == [other]
    assert [i.id for i in store.log()] == [v3, v2, other, v1]


def test_delete_and_gc_reclaim_bytes(store: mmcore.ModelStore) -> None:
    v1 = store.save(small_set(50, seed=1), ref="fleet")
    v2 = store.save(small_set(50, seed=2), ref="fleet")
    with pytest.raises(InvalidArgumentError, match="head of ref"):
        store.delete(v2)
    assert len(store.tier.list()) == 2
    store.delete(v1)
    assert [i.id for i in store.versions()] == [v2]
    assert store.gc() > 50 * 100
    assert len(store.tier.list()) == 1
    assert_sets_equal(store.load(v2), small_set(50, seed=2))
    store.delete_ref("fleet")
    store.delete(v2)
    store.gc()
    assert store.tier.list() == [] and store.versions() == []


def test_shared_blob_survives_deleting_one_of_its_versions(store: mmcore.ModelStore) -> None:
    models = small_set(10)
    v1 = store.save(models)
    v2 = store.save(models)
    store.delete(v1)
    store.gc()
    assert_sets_equal(store.load(v2), models)
    assert store.verify() == 40


def test_gc_reclaims_orphan_packs(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        s.save(small_set(3))
        orphan = s.tier.create()  # an interrupted save: written, never committed
        orphan.write_ptr(0, 0, 4096)
        orphan.finish()
        assert len(s.tier.list()) == 2
        assert s.gc() >= 64
        assert len(s.tier.list()) == 1
        assert s.verify() == 12


def test_loaded_tensors_outlive_store_close_delete_and_gc(store_path: Path) -> None:
    models = small_set(30)
    with mmcore.open(store_path) as s:
        v = s.save(models)
        loaded = s.load(v)
    with mmcore.open(store_path) as s:
        s.delete(v)
        assert s.gc() > 0
        assert s.tier.list() == []
    assert_sets_equal(loaded, models)  # the mapping stays valid after the pack is unlinked
