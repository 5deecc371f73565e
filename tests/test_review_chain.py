"""Issue 19's defects in the update, lifecycle and reading paths, each provoked as the
review found it: versions that could not be loaded again, a stale cache returning
wrong tensors, stale chain depths, tensors matched by position instead of name, a
check() that raised, and a read-only store that called a collected pack damage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_bit_equal, assert_sets_equal

import mmcore
from mmcore import provenance
from mmcore.errors import CorruptRecordError, IntegrityError, VersionNotFoundError
from mmcore.manifest import Manifest
from mmcore.paths import chain
from mmcore.paths.delta_blob import MODEL

Set = dict[str, dict[str, torch.Tensor]]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _every_read(store: mmcore.ModelStore, vid: str, want: Set) -> None:
    """The version comes back exactly through load, load_model, load(models=) and
    load_stacked, and check() finds nothing."""
    assert_sets_equal(store.load(vid), want)
    for name in want:
        one = store.load_model(vid, name)
        assert list(one) == list(want[name])
        for key, t in want[name].items():
            assert_bit_equal(one[key], t)
    some = list(want)[-1:]
    assert_sets_equal(store.load(vid, models=some), {n: want[n] for n in some})
    stacks = store.load_stacked(vid)
    for g in stacks.groups:
        for i, name in enumerate(g.names):
            for key, column in g.params.items():
                assert_bit_equal(column[i], want[name][key])
    assert store.check().problems == []


# -- 1. models whose tensors have no elements ----------------------------------------


def test_models_of_empty_tensors_load_and_so_do_the_updates_built_on_them(
    store: mmcore.ModelStore, tmp_path: Path
) -> None:
    g = _gen()
    models: Set = {
        "mask": {"mask": torch.empty(0)},
        "mixed": {"b": torch.arange(3, dtype=torch.uint8), "e": torch.empty(0, 4)},
        "halves": {"h": torch.empty(2, 0, dtype=torch.float16), "l": torch.zeros(0, dtype=torch.int64)},
        "dense": {"w": torch.randn(16, generator=g)},
    }  # fmt: skip
    v1 = store.save(models)
    _every_read(store, v1, models)
    assert {p.name for p in store.export(v1, tmp_path / "out")} == {
        f"{n}.safetensors" for n in models
    }
    changed = {**models, "dense": {"w": models["dense"]["w"] + 1}}
    v2 = store.save(changed, approach="update", parent=v1)
    _every_read(store, v2, changed)
    fewer = {n: sd for n, sd in changed.items() if n != "mask"}  # removes the empty model
    v3 = store.save(fewer, approach="update", parent=v2, tolerance=1e-3)
    assert list(store.load(v3)) == list(fewer)
    assert_sets_equal({n: store.load(v3)[n] for n in ("mixed", "halves")},
                      {n: fewer[n] for n in ("mixed", "halves")})  # fmt: skip


# -- 2. a raw blob on top of a model the lossy update assembled tensor by tensor ------


def _odd_then_wide(c: torch.Tensor, g: torch.Generator) -> Set:
    """Three float16 values, then float32s: back to back, the float32s start at byte 6."""
    return {
        "x": {"a": torch.randn(3, generator=g).half(), "b": torch.randn(4, generator=g), "c": c}
    }


def test_a_raw_update_after_a_lossy_one_loads_whatever_its_tensors_alignment(
    store: mmcore.ModelStore,
) -> None:
    g = _gen(1)
    c = torch.randn(4096, generator=g)
    v1 = store.save(_odd_then_wide(c, g))
    v2 = store.save(_odd_then_wide(c + 0.01, g), approach="update", parent=v1, tolerance=1e-3)
    kinds = [e[0] for e in chain.delta_table(store.storage, store.manifest(v2)).entries]
    assert 3 in kinds  # codec.QUANT: recovery assembles x tensor by tensor
    lossy_c = store.load(v2)["x"]["c"].clone()
    want = _odd_then_wide(lossy_c, g)  # a and b change at random: zstd does not pay
    v3 = store.save(want, approach="update", parent=v2)
    table = chain.delta_table(store.storage, store.manifest(v3))
    assert table.rows[0][6] == 0 and [e[:2] for e in table.entries[:2]] == [(1, 0), (1, 6)]
    _every_read(store, v3, want)
    later = {"x": {**want["x"], "a": want["x"]["a"] + 1}}
    v4 = store.save(later, approach="update", parent=v3)
    _every_read(store, v4, later)


# -- 3. the delta-table cache --------------------------------------------------------


def test_a_delta_blob_stored_again_elsewhere_is_not_read_through_a_stale_cache(
    store: mmcore.ModelStore,
) -> None:
    g = _gen(2)
    m1 = {f"c{i}": {"w": torch.randn(64, generator=g)} for i in range(4)}
    x = {"w": torch.randn(3000, generator=g)}
    m2 = {**{n: {"w": sd["w"] + 0.5} for n, sd in m1.items()}, "x": x}
    v1 = store.save(m1, ref="main")
    store.save({"x": x}, ref="x")  # x's blob exists: the update's copy of it is dead bytes
    v2 = store.save(m2, approach="update", parent=v1)
    key = store.manifest(v2).update.delta_blob  # type: ignore[union-attr]
    assert key is not None
    store.gc(compact_below=2)  # moves v2's delta blob down: its tables are read shifted
    assert store.storage.content(key).shift != 0
    assert_sets_equal(store.load(v2), m2)
    store.delete(v2)
    store.gc()
    v3 = store.save(m2, approach="update", parent=v1)  # the same blob key, unshifted
    assert store.manifest(v3).update.delta_blob == key  # type: ignore[union-attr]
    assert store.storage.content(key).shift == 0
    assert_sets_equal(store.load(v3, verify=False), m2)
    assert_sets_equal(store.load(v3), m2)


# -- 10. the delta tables are covered by verify and check -----------------------------


def test_a_flipped_bit_in_a_delta_table_is_found_by_verify_and_refused_by_saves(
    store_path: Path,
) -> None:
    g = _gen(3)
    m1 = {f"c{i}": {"w": torch.randn(64, generator=g)} for i in range(3)}
    m2 = {n: {"w": sd["w"] * 2} for n, sd in m1.items()}
    with mmcore.open(store_path) as store:
        v1 = store.save(m1)
        v2 = store.save(m2, approach="update", parent=v1)
        rec = store.storage.content(store.manifest(v2).update.delta_blob)  # type: ignore[union-attr]
        assert rec.table is not None
        pack = store.tier.path_of(rec.pack)  # type: ignore[attr-defined]
    depth_at = rec.table[0] + 32  # the first row's depth field (uint16)
    assert MODEL.size == 40
    data = bytearray(pack.read_bytes())
    data[depth_at + 1] ^= 0x80
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    with mmcore.open(store_path) as store:
        report = store.check()
        assert len(report.problems) == 1 and report.problems[0].startswith(f"version {v2}")
        assert "delta tables or their hashes do not match" in report.problems[0]
        with pytest.raises(IntegrityError, match="delta tables or their hashes do not match"):
            store.verify(v2)
        with pytest.raises(IntegrityError, match="delta tables or their hashes do not match"):
            store.save(m1, approach="update", parent=v2)
        assert_sets_equal(store.load(v1), m1)


# -- 11. check() reports damaged records and goes on ----------------------------------


def test_check_reports_every_damaged_record_and_checks_the_rest(store: mmcore.ModelStore) -> None:
    g = _gen(4)
    good = store.save({"a": {"w": torch.randn(8, generator=g)}})
    bad = store.save({"b": {"w": torch.randn(8, generator=g)}})
    blob = store.manifest(bad).groups[0].blob
    other = store.save({"c": {"w": torch.randn(8, generator=g)}})
    other_blob = store.manifest(other).groups[0].blob
    store.catalog.commit([("manifests", bad.encode(), b"\xc1 not msgpack"),
                          ("content", other_blob, b"\x93\x01\x02")])  # fmt: skip
    store.storage.forget()
    report = store.check()
    text = " | ".join(report.problems)
    assert f"version {bad}: manifest record is not valid msgpack" in text
    assert f"version {other}: content record is not valid msgpack" in text
    assert f"content {other_blob.hex()[:16]}: content record is not valid msgpack" in text
    assert "reference counts not compared: 1 manifest" in text
    assert report.versions == 1  # `good` was checked in full
    assert blob  # the damaged manifest's blob is not counted against it
    with pytest.raises(IntegrityError, match="problems: "):
        store.verify()
    with pytest.raises(CorruptRecordError, match="not valid msgpack"):
        store.load(bad)
    assert store.check(good).problems == []


def test_undecodable_records_raise_typed_errors_from_every_read(store: mmcore.ModelStore) -> None:
    """A record that passes the decoders but breaks a reader is a CorruptRecordError
    naming the version, never torch's RuntimeError."""
    v = store.save({"a": {"w": torch.randn(8, generator=_gen(5))}})
    m = store.manifest(v)
    rec = store.storage.content(m.groups[0].blob)
    rec.hashes_length = 0  # a hash table with no rows for the group's tensors
    store.catalog.commit([("content", m.groups[0].blob, rec.encode())])
    for read in (lambda: store.load(v), lambda: store.load_model(v, "a"),
                 lambda: store.load_stacked(v)):  # fmt: skip
        with pytest.raises((CorruptRecordError, IntegrityError), match=f"version {v}"):
            read()
    assert store.check(v).problems


# -- 12. rebase and chain depths -------------------------------------------------------


def test_depths_follow_the_chain_as_it_is_after_a_rebase(store: mmcore.ModelStore) -> None:
    base = torch.randn(256, generator=_gen(6))

    def step(k: int) -> Set:
        return {"c": {"w": base + 0.25 * k}}

    b = [store.save(step(0))]
    for k in range(1, 6):
        b.append(store.save(step(k), approach="update", parent=b[-1], max_recovery=None))
    a = [store.save(step(6))]
    for k in range(7, 9):
        a.append(store.save(step(k), approach="update", parent=a[-1], max_chain=3,
                            max_recovery=None))  # fmt: skip
    store.rebase(a[0], parent=b[-1], max_recovery=None)  # now 6 deltas deep, its children 7, 8
    for vid, deltas in zip(a, (6, 7, 8)):
        assert chain.model_index(store.storage, vid)["c"].depth == deltas
        assert store.info(vid).depth == deltas  # versions back to the baseline, as it is now
    assert {i.id: i.depth for i in store.versions()}[a[2]] == 8
    a.append(store.save(step(9), approach="update", parent=a[-1], max_chain=3, max_recovery=None))
    info = store.info(a[-1])
    assert info.changes["whole"] == 1 and info.changes["max_delta_chain"] == 0  # a keyframe
    assert info.depth == len(chain.chain_of(store.storage, a[-1])) - 1 == 9
    assert chain.model_index(store.storage, a[-1])["c"].depth == 0
    assert_sets_equal(store.load(a[-1]), step(9))


# -- 15. a read-only store and a writer's gc ------------------------------------------


def test_a_reader_opened_before_a_writers_gc_keeps_serving_what_is_live(store_path: Path) -> None:
    g = _gen(7)
    m = {f"c{i}": {"w": torch.randn(3000, generator=g)} for i in range(3)}
    writer = mmcore.open(store_path)
    try:
        v1 = writer.save(m, ref="main")
        pad = writer.save({"p": {"w": torch.randn(3000, generator=g)}})
        v2 = writer.save({**m, "x": {"w": torch.randn(10, generator=g)}}, approach="update",
                         parent=v1)  # fmt: skip
        with mmcore.open(store_path, readonly=True) as reader:
            writer.delete(pad)
            writer.delete(v2)
            writer.gc(compact_below=2)  # every pack rewritten: the reader's offsets are old
            assert reader.check().problems == []
            with mmcore.open(store_path, readonly=True) as again:
                assert_sets_equal(again.load(v1), m)
            with mmcore.open(store_path, readonly=True) as reader2:
                writer.save(m, approach="update", parent=v1)
                writer.gc(compact_below=2)
                assert_bit_equal(reader2.load_model(v1, "c1")["w"], m["c1"]["w"])
                assert_sets_equal(reader2.load(v1), m)
            with pytest.raises(VersionNotFoundError, match=v2):
                reader.load(v2)
    finally:
        writer.close()


# -- 16. tensors are matched by name, and each version keeps the order it was saved in --


def _reordered(sd: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    return {k: sd[k] for k in keys}


def test_an_update_matches_tensors_by_name_and_keeps_each_versions_order(
    store: mmcore.ModelStore,
) -> None:
    g = _gen(8)
    m1 = {f"c{i:02d}": {"w": torch.randn(256, generator=g), "b": torch.randn(8, generator=g).half(),
                        "n": torch.arange(5)} for i in range(40)}  # fmt: skip
    v1 = store.save(m1)
    baseline_bytes = store.info(v1).stored_bytes
    m2 = {n: dict(sorted(sd.items())) for n, sd in m1.items()}  # rebuilt in sorted order
    m2["c03"] = {**m2["c03"], "w": m2["c03"]["w"] + 1}
    v2 = store.save(m2, approach="update", parent=v1)
    changes = store.info(v2).changes
    assert changes["unchanged"] == 39 and changes["delta"] == 1 and changes["whole"] == 0
    assert store.info(v2).stored_bytes < baseline_bytes / 10
    _every_read(store, v2, m2)
    m3 = {n: _reordered(sd, ["n", "w", "b"]) if n < "c20" else m1[n] for n, sd in m2.items()}
    v3 = store.save(m3, approach="update", parent=v2)  # some in a third order, some back
    assert store.info(v3).changes["delta"] == 0
    _every_read(store, v3, m3)
    assert_sets_equal(store.load(v1), m1)
    m4 = {**m3, "c03": {**m3["c03"], "w": m3["c03"]["w"] + 1}}
    v4 = store.save(m4, approach="update", parent=v3, max_chain=1)  # c03 stored whole again
    assert store.info(v4).changes["whole"] == 1
    _every_read(store, v4, m4)
    # deltas against a parent whose recovery gives another order than its schema's
    m5 = {
        n: {k: t + 1 if t.is_floating_point() else t for k, t in sd.items()} for n, sd in m4.items()
    }
    v5 = store.save(m5, approach="update", parent=v4)
    assert store.info(v5).changes["delta"] == 40
    _every_read(store, v5, m5)
    v6 = store.save(m5, approach="update", parent=v4, tolerance=1e-3)
    got = store.load(v6)
    for name, sd in m5.items():
        assert list(got[name]) == list(sd)
        assert_bit_equal(got[name]["n"], sd["n"])
        assert (got[name]["w"] - sd["w"]).abs().max() <= 1e-3


def test_a_manifest_with_tensor_orders_is_refused_by_a_reader_of_the_old_format(
    store: mmcore.ModelStore,
) -> None:
    m1 = {"a": {"x": torch.zeros(2), "y": torch.ones(2)}}
    v1 = store.save(m1)
    v2 = store.save({"a": _reordered(m1["a"], ["y", "x"])}, approach="update", parent=v1)
    raw = store.catalog.get("manifests", v2.encode())
    assert raw is not None and Manifest.decode(raw).update.orders == {"a": ["y", "x"]}  # type: ignore[union-attr]
    import msgpack

    assert msgpack.unpackb(raw)["format"] == 4  # a reader of format 2 would misread it
    damaged = msgpack.unpackb(raw)
    damaged["update"]["orders"] = [[["y", "z"], ["a"]]]
    store.catalog.commit([("manifests", v2.encode(), msgpack.packb(damaged))])
    store.storage.forget()
    with pytest.raises(CorruptRecordError, match="tensor order recorded for model 'a'"):
        store.load(v2)
    assert any("tensor order recorded" in p for p in store.check().problems)


def test_provenance_matches_tensors_by_name(store: mmcore.ModelStore) -> None:
    parent = {
        "a": {"w": torch.zeros(3), "b": torch.ones(2)},
        "b": {"w": torch.ones(3), "b": torch.zeros(2)},
    }
    data = {n: {"x": torch.zeros(1)} for n in parent}  # fmt: skip

    @mmcore.trainer("tests.review.reversed")
    def reversed_add(models, data, *, seed):  # type: ignore[no-untyped-def]
        return {n: {k: sd[k] + 1 for k in reversed(list(sd))} for n, sd in models.items()}

    v1 = store.save(parent)
    ds = store.put_dataset(data)
    trained = {n: {k: t + 1 for k, t in sd.items()} for n, sd in parent.items()}
    given = {n: {k: sd[k] for k in reversed(list(sd))} for n, sd in trained.items()}
    recipe = mmcore.Recipe("tests.review.reversed", data=ds)
    v2 = store.save(given, approach="provenance", parent=v1, recipe=recipe)
    got = store.load(v2)
    assert_sets_equal(got, trained)  # in the parent's order, matched by name
    assert provenance.registered("tests.review.reversed").fn is reversed_add


def test_provenance_keeps_the_tensor_order_its_parent_was_saved_in(
    store: mmcore.ModelStore,
) -> None:
    """Found by the fuzzer: retraining came back in the stacks' (schema) order, not in
    the order an update of the parent had recorded."""
    first = {n: {"w": torch.full((3,), float(i)), "b": torch.zeros(2), "c": torch.ones(1)}
             for i, n in enumerate(["a", "b"])}  # fmt: skip
    moved = {**first, "a": {k: first["a"][k] for k in ["c", "w", "b"]}}
    v1 = store.save(first)
    v2 = store.save(moved, approach="update", parent=v1)
    ds = store.put_dataset({n: {"x": torch.zeros(1)} for n in first})

    @mmcore.trainer("tests.review.plus_one")
    def plus_one(models, data, *, seed):  # type: ignore[no-untyped-def]
        return {n: {k: t + 1 for k, t in sd.items()} for n, sd in models.items()}

    recipe = mmcore.Recipe("tests.review.plus_one", data=ds, models=["a"])
    trained = {**moved, "a": {k: t + 1 for k, t in moved["a"].items()}}
    v3 = store.save(trained, approach="provenance", parent=v2, recipe=recipe)
    again = {**trained, "a": {k: t + 1 for k, t in trained["a"].items()}}
    v4 = store.save(again, approach="provenance", parent=v3, recipe=recipe)
    for vid, want in ((v3, trained), (v4, again)):
        got = store.load(vid)
        assert_sets_equal(got, want)
        assert list(got["a"]) == ["c", "w", "b"]
        assert list(store.load_model(vid, "a")) == ["c", "w", "b"]
        assert list(store.load(vid, models=["a"])["a"]) == ["c", "w", "b"]


def test_an_update_and_a_rebase_keep_the_model_order_saved(store: mmcore.ModelStore) -> None:
    g = _gen(9)
    m1 = {f"m{i}": {"w": torch.randn(4, generator=g)} for i in range(5)}
    v1 = store.save(m1)
    m2 = {n: m1[n] for n in ["m3", "m0", "m4", "m1", "m2"]}
    m2["new"] = {"w": torch.zeros(2)}
    m2 = {"new": m2.pop("new"), **m2}  # an added model first
    v2 = store.save(m2, approach="update", parent=v1)
    assert list(store.load(v2)) == list(m2) and list(store.load_stacked(v2).order) == list(m2)
    _every_read(store, v2, m2)
    m3 = {n: m2[n] for n in ["m0", "new", "m1"]}  # some removed, the rest moved
    v3 = store.save(m3, approach="update", parent=v2)
    _every_read(store, v3, m3)
    other = store.save({n: m1[n] for n in sorted(m1)})
    store.rebase(v2, parent=other)  # stored against a parent in another order: same order
    _every_read(store, v2, m2)
    _every_read(store, v3, m3)


def test_a_rebase_whose_commit_raised_after_landing_is_served_as_it_landed(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = store.save({"x": {"w": torch.ones(2)}})
    v = store.save({"x": {"w": torch.ones(2) * 2}}, approach="update", parent=p)
    real = store.catalog.commit

    def lands_then_raises(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)  # type: ignore[arg-type]
        raise OSError(5, "the sync reported an error after the batch was durable")

    monkeypatch.setattr(store.catalog, "commit", lands_then_raises)
    with pytest.raises(OSError, match="after the batch was durable"):
        store.rebase(v)
    monkeypatch.undo()
    assert store.info(v).approach == "baseline"  # the record as it landed, not a cached one
    store.delete(p)
    store.gc()
    assert_bit_equal(store.load(v)["x"]["w"], torch.ones(2) * 2)


# -- found by the fuzzer's long run: delta blobs with equal tables over other bytes --


def _parents_alike() -> tuple[Set, Set, Set]:
    """Two parents whose deltas to the same child differ in their bytes but not in
    their lengths: the delta tables (pack offsets, lengths, recovered hashes) agree."""
    child = torch.zeros(1024)
    a, b = child.clone(), child.clone()
    a[0], b[700] = 1.0, 1.0
    return {"m": {"w": a}}, {"m": {"w": b}}, {"m": {"w": child}}


def test_an_update_with_the_tables_of_another_parents_delta_is_stored_apart(
    store: mmcore.ModelStore,
) -> None:
    pa, pb, child = _parents_alike()
    va, vb = store.save(pa), store.save(pb)
    ua = store.save(child, approach="update", parent=va)
    ub = store.save(child, approach="update", parent=vb)
    ka = store.manifest(ua).update.delta_blob  # type: ignore[union-attr]
    kb = store.manifest(ub).update.delta_blob  # type: ignore[union-attr]
    assert ka != kb  # before the fix: one key, and ub decoded a's deltas against b
    _every_read(store, ub, child)
    _every_read(store, ua, child)
    again = store.save(child, approach="update", parent=vb)  # the same bytes: shared
    assert store.manifest(again).update.delta_blob == kb  # type: ignore[union-attr]
    assert store.storage.content(kb).refs == 2
    store.delete(ua)
    store.gc()
    _every_read(store, ub, child)
    _every_read(store, again, child)


def test_a_rebase_onto_a_parent_with_alike_deltas_keeps_the_version(
    store: mmcore.ModelStore,
) -> None:
    pa, pb, child = _parents_alike()
    va, vb = store.save(pa), store.save(pb)
    store.save(child, approach="update", parent=va)
    v = store.save(child)
    store.rebase(v, parent=vb)
    _every_read(store, v, child)
    store.gc(compact_below=2)  # the first delta blob moves: compared where it lies now
    v2 = store.save(child, approach="update", parent=vb)
    _every_read(store, v2, child)


# -- found by the fuzzer's long run: a rebase must keep each model's schema -----------


def _reordered_chain(store: mmcore.ModelStore) -> tuple[list[str], list[Set]]:
    """v1 stores c as (a: 3 floats, b: 5 floats); v2 saves it as (b, a) with new values
    (its schema stays (a, b): deltas are taken in the parent's schema order, and the
    order saved is recorded); v3 is stored against v2."""
    g = _gen(9)
    a, b = torch.randn(3, generator=g), torch.randn(5, generator=g)
    m1: Set = {"c": {"a": a, "b": b}, "d": {"w": torch.randn(4, generator=g)}}
    m2: Set = {"c": {"b": b + 1, "a": a + 1}, "d": m1["d"]}
    m3: Set = {"c": {"b": b + 2, "a": a + 2}, "d": {"w": m1["d"]["w"] + 1}}
    v1 = store.save(m1)
    v2 = store.save(m2, approach="update", parent=v1, max_recovery=None)
    v3 = store.save(m3, approach="update", parent=v2, max_recovery=None)
    return [v1, v2, v3], [m1, m2, m3]


def test_a_rebase_onto_a_parent_with_another_tensor_order_keeps_its_children(
    store: mmcore.ModelStore,
) -> None:
    vids, sets = _reordered_chain(store)
    other = store.save({"c": dict(sets[1]["c"]), "d": sets[0]["d"]})  # schema (b, a)
    store.rebase(vids[1], parent=other)  # before: c became a delta in (b, a), v3 read wrong
    for vid, want in zip(vids[1:], sets[1:]):
        _every_read(store, vid, want)
    store.delete(vids[0])
    store.gc(compact_below=2)
    for vid, want in zip(vids[1:], sets[1:]):
        _every_read(store, vid, want)


def test_a_rebase_to_a_baseline_keeps_the_schema_and_the_order_saved(
    store: mmcore.ModelStore, store_path: Path
) -> None:
    vids, sets = _reordered_chain(store)
    store.rebase(vids[1])
    m = store.manifest(vids[1])
    assert m.approach == "baseline" and m.orders == {"c": ["b", "a"]}
    assert [t.name for t in m.groups[m.locate("c")[0]].schema.tensors] == ["a", "b"]  # type: ignore[index]
    store.delete(vids[0])
    store.gc()
    for vid, want in zip(vids[1:], sets[1:]):
        _every_read(store, vid, want)
    assert store.export(vids[1], store_path.parent / "out")  # through load: the saved order
    store.close()
    with mmcore.open(store_path, readonly=True) as again:
        for vid, want in zip(vids[1:], sets[1:]):
            _every_read(again, vid, want)
