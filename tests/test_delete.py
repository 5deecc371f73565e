"""Deleting versions that others depend on: DependentsError naming them, cascade
deleting the whole subtree in one commit, refs guarding their heads, and gc then
reclaiming the bytes while every remaining version loads exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_sets_equal, save_retrained, small_set

import mmcore
from mmcore.errors import DependentsError, InvalidArgumentError
from mmcore.examples import battery


def _nudged(models: dict, seed: int) -> dict:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(seed)
    return {n: {k: (t + torch.randn(t.shape, generator=g).to(t.dtype) * 0.01 if t.is_floating_point() else t.clone())
                for k, t in sd.items()} for n, sd in models.items()}  # fmt: skip


def test_dependents_are_named_and_cascade_takes_them_all(store: mmcore.ModelStore) -> None:
    cells = battery.make_cells(8, seed=0)
    data = battery.make_data(list(cells), rows=16, seed=1)
    v1 = store.save(cells)
    v2 = store.save(_nudged(cells, 1), approach="update", parent=v1)
    v3 = store.save(_nudged(cells, 2), approach="update", parent=v2)
    p, _ = save_retrained(store, v2, data, store.put_dataset(data))
    before = {v.id for v in store.versions()}
    with pytest.raises(DependentsError, match=f"version {v2} is the parent of") as err:
        store.delete(v2)
    assert sorted(err.value.dependents) == sorted([v3, p])
    assert {v.id for v in store.versions()} == before
    store.save(_nudged(cells, 3), approach="update", parent=v3, ref="tip")
    with pytest.raises(InvalidArgumentError, match="head of ref"):
        store.delete(v2, cascade=True)  # the ref's head would go: nothing changes
    assert {v.id for v in store.versions()} == before | {store.refs()["tip"]}
    store.delete_ref("tip")
    gone = store.delete(v2, cascade=True)
    assert gone[0] == v2 and len(gone) == 4 and set(gone) >= {v3, p}
    assert [v.id for v in store.versions()] == [v1]
    assert_sets_equal(store.load(v1), cells)
    assert store.verify() > 0


def test_deleting_a_leaf_and_gc_shrinks_the_store(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        models = small_set(40, seed=3)
        v1 = s.save(models)
        v2 = s.save(_nudged(models, 4), approach="update", parent=v1)
        leaf_models = {
            n: {k: t + 1 if t.is_floating_point() else t for k, t in sd.items()}
            for n, sd in models.items()
        }
        v3 = s.save(leaf_models, approach="update", parent=v2)
        leaf = s.info(v3).stored_bytes
        before = s.stored_bytes()
        assert s.delete(v3) == [v3]
        s.gc()
        assert before - s.stored_bytes() >= leaf // 2
        assert_sets_equal(s.load(v1), models)
        assert_sets_equal(s.load(v2), _nudged(models, 4))
        assert s.verify() > 0


def test_cli_delete_and_gc(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmcore.cli import main

    with mmcore.open(store_path) as s:
        models = small_set(5)
        v1 = s.save(models)
        v2 = s.save(_nudged(models, 1), approach="update", parent=v1)
    assert main(["delete", str(store_path), v1]) == 1
    assert "is the parent of" in capsys.readouterr().err
    assert main(["delete", str(store_path), v1, "--cascade"]) == 0
    assert f"deleted 2 version(s): {v1}, {v2}" in capsys.readouterr().out
    assert main(["gc", str(store_path)]) == 0
    assert "reclaimed" in capsys.readouterr().out
    with mmcore.open(store_path) as s:
        a = s.save(small_set(3), ref="main")
        b = s.save(_nudged(small_set(3), 2), approach="update", parent=a)
    assert main(["refs", str(store_path)]) == 0
    assert f"main  {a}" in capsys.readouterr().out
    assert main(["rebase", str(store_path), b]) == 0
    assert f"rebased {b}: now a baseline" in capsys.readouterr().out


def test_rebase_lets_the_base_of_a_chain_go(store: mmcore.ModelStore) -> None:
    models = small_set(30, seed=5)
    v1 = store.save(models)
    m2, m3 = _nudged(models, 1), _nudged(_nudged(models, 1), 2)
    v2 = store.save(m2, approach="update", parent=v1, ref="main")
    v3 = store.save(m3, approach="update", parent=v2)
    store.rebase(v2)
    info = store.info(v2)
    assert info.approach == "baseline" and info.parent is None and info.refs == ("main",)
    assert store.delete(v1) == [v1]  # nothing depends on it any more
    store.gc()
    assert_sets_equal(store.load(v2), m2)
    assert_sets_equal(store.load(v3), m3)  # its deltas still decode against v2
    assert store.verify() > 0
    # onto another parent: a lossless update of it, v3 still exact
    v4 = store.save(_nudged(m2, 7))
    store.rebase(v2, parent=v4)
    assert store.info(v2).approach == "update" and store.info(v2).parent == v4
    assert_sets_equal(store.load(v2), m2)
    assert_sets_equal(store.load(v3), m3)
    with pytest.raises(InvalidArgumentError, match="would make a cycle"):
        store.rebase(v4, parent=v3)
    assert store.info(v4).approach == "baseline"


def test_rebase_of_a_provenance_version_stores_its_models(store: mmcore.ModelStore) -> None:
    cells = battery.make_cells(6, seed=0)
    data = battery.make_data(list(cells), rows=16, seed=1)
    v1 = store.save(cells)
    ds = store.put_dataset(data)
    p, trained = save_retrained(store, v1, data, ds)
    store.rebase(p)
    assert store.info(p).approach == "baseline"
    store.delete(v1)
    store.delete_dataset(ds)  # no version needs the data now
    assert_sets_equal(store.load(p), trained)


def test_check_collects_every_problem_and_recounts_references(store_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from mmcore.cli import main
    from mmcore.manifest import ContentRecord

    with mmcore.open(store_path) as s:
        a = s.save(small_set(4, seed=1))
        b = s.save(small_set(4, seed=2))
        c = s.save(small_set(4, seed=3))
        assert s.check().ok and s.check().versions == 3
        packs = {}
        for vid in (a, b):
            rec = s.storage.content(s.manifest(vid).groups[0].blob)
            packs[vid] = (s.tier.path_of(rec.pack), rec.extents[0][0])
        key = s.manifest(c).groups[0].blob
        rec = s.storage.content(key)
        rec.refs += 2  # a reference count the versions do not account for
        s.catalog.commit([("content", key, rec.encode())])
    for path, at in packs.values():  # damage two versions
        raw = bytearray(path.read_bytes())
        raw[at + 5] ^= 0x10
        path.write_bytes(bytes(raw))
    with mmcore.open(store_path) as s:
        report = s.check()
        assert not report.ok and report.versions == 1
        assert sum(p.startswith(f"version {a}") for p in report.problems) == 1
        assert sum(p.startswith(f"version {b}") for p in report.problems) == 1
        assert any("3 reference(s) recorded, 1 in use" in p for p in report.problems)
        assert ContentRecord.decode(s.catalog.get("content", key) or b"").refs == 3  # unchanged
        with pytest.raises(mmcore.errors.IntegrityError, match=r"^3 problems: version ") as err:
            s.verify()  # collects them all too, then raises once
        assert err.value.problems == report.problems and err.value.model is not None
        assert s.verify(c) == report.tensors  # the one whole version: the report, an int of tensors
    assert main(["verify", str(store_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("CORRUPT") == 3 and a in err and b in err


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s, v: s.delete(v, cascade="yes"), InvalidArgumentError, "cascade"),
        (lambda s, v: s.rebase("nope"), mmcore.errors.VersionNotFoundError, "no version or ref"),
        (
            lambda s, v: s.rebase(v, parent="nope"),
            mmcore.errors.VersionNotFoundError,
            "no version or ref",
        ),
        (lambda s, v: s.rebase(v, parent=v), InvalidArgumentError, "would make a cycle"),
        (lambda s, v: s.export(v, 5), InvalidArgumentError, "path"),
        (
            lambda s, v: s.export(v, "/tmp/x", models=["nope"]),
            mmcore.errors.ModelNotFoundError,
            "nope",
        ),
        (lambda s, v: s.import_(5), InvalidArgumentError, "path"),
        (lambda s, v: s.gc(compact_below="x"), InvalidArgumentError, "compact_below"),
        (lambda s, v: s.put_dataset(5), mmcore.errors.InvalidModelSetError, "mapping"),
        (lambda s, v: s.put_dataset({}), mmcore.errors.InvalidModelSetError, "empty"),
        (lambda s, v: s.load_dataset("nope"), mmcore.errors.DatasetNotFoundError, "no dataset"),
        (lambda s, v: s.delete_dataset("nope"), mmcore.errors.DatasetNotFoundError, "no dataset"),
        (lambda s, v: s.check("nope"), mmcore.errors.VersionNotFoundError, "no version or ref"),
    ],
)
def test_bad_input_to_the_new_verbs_changes_nothing(
    store: mmcore.ModelStore, call, error, message
) -> None:  # type: ignore[no-untyped-def]
    v = store.save(small_set(2))
    before = (
        {i.id for i in store.versions()},
        sorted(store.tier.list()),
        store.refs(),
        store.datasets(),
    )
    with pytest.raises(error, match=message):
        call(store, v)
    after = (
        {i.id for i in store.versions()},
        sorted(store.tier.list()),
        store.refs(),
        store.datasets(),
    )
    assert before == after
    assert store.check().ok


def test_log_ends_where_a_deleted_older_head_was(store: mmcore.ModelStore) -> None:
    v1 = store.save(small_set(2, seed=1), ref="fleet")
    v2 = store.save(small_set(2, seed=2), ref="fleet")
    v3 = store.save(small_set(2, seed=3), ref="fleet")
    assert store.delete(v2) == [v2]  # only v3's prev: no version is stored against it
    assert [i.id for i in store.log("fleet")] == [v3]
    assert {i.id for i in store.versions()} == {v1, v3}


def test_export_of_chain_and_provenance_versions(store: mmcore.ModelStore, tmp_path: Path) -> None:
    from conftest import assert_bit_equal

    cells = battery.make_cells(5, seed=0)
    data = battery.make_data(list(cells), rows=16, seed=1)
    v1 = store.save(cells)
    v2 = store.save(_nudged(cells, 2), approach="update", parent=v1)
    p, trained = save_retrained(store, v2, data, store.put_dataset(data))
    for vid, want in ((v2, _nudged(cells, 2)), (p, trained)):
        out = tmp_path / vid
        store.export(vid, out)
        back = store.load(store.import_(out))
        for name, sd in want.items():
            for key, t in sd.items():
                assert_bit_equal(back[name][key], t)
