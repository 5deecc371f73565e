"""Whole-model compression (``compress=True``): a group's records coded as byte planes,
chunk by chunk, in every save path; every read decodes them bit for bit, and damage is
found, not returned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
from conftest import assert_sets_equal

import mmcore
from mmcore.codec import records
from mmcore.errors import FormatVersionError, IntegrityError, InvalidArgumentError
from mmcore.manifest import ContentRecord

Models = dict[str, dict[str, torch.Tensor]]


def _mixed(count: int, seed: int = 0) -> Models:
    """Models of every stream width, padding between tensors, and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in range(count):
        out[f"m{k:03d}"] = {
            "w": torch.randn(40, 30, generator=g) * 0.05,
            "flag": torch.rand(3, generator=g) > 0.5,  # 1 byte, then padding before "n"
            "n": torch.tensor(k, dtype=torch.int64),
            "h": torch.randn(77, generator=g).to(torch.bfloat16),
            "z": torch.randn(5, generator=g, dtype=torch.complex64),
            "f16": torch.randn(9, generator=g).to(torch.float16),
            "q": torch.randint(0, 255, (11,), generator=g, dtype=torch.uint8),
            "empty": torch.empty(0, 4),
            "d": torch.randn(3, generator=g, dtype=torch.float64),
        }
    return out


def _floats(count: int, seed: int = 0, width: int = 2000) -> Models:
    g = torch.Generator().manual_seed(seed)
    return {f"c{k:04d}": {"w": torch.randn(width, generator=g) * 0.02,
                          "b": torch.randn(7, generator=g) * 0.02} for k in range(count)}  # fmt: skip


def _every_way(store: mmcore.ModelStore, vid: str, want: Models) -> None:
    assert_sets_equal(store.load(vid), want)
    assert_sets_equal(store.load(vid, verify=False), want)
    for name in list(want)[:: max(1, len(want) // 5)]:
        assert_sets_equal({name: store.load_model(vid, name)}, {name: want[name]})
    assert_sets_equal(store.load_stacked(vid).state_dicts(), want)
    store.verify(vid)  # (raises on a problem)


def _coded(store: mmcore.ModelStore, vid: str) -> list[ContentRecord]:
    m = store.manifest(vid)
    recs = [store.storage.content(g.blob) for g in m.groups]
    return [r for r in recs if r.chunks is not None]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few records: a group is many chunks, its last one shorter."""
    monkeypatch.setattr(records, "CHUNK_BYTES", 20000)


def test_every_dtype_round_trips(store: mmcore.ModelStore, small_chunks: None) -> None:
    models = _mixed(23)
    vid = store.save(models, compress=True)
    (rec,) = _coded(store, vid)
    assert rec.extents == [] and rec.held == 23
    assert len(rec.chunks or ()) > 3  # several chunks, the last one shorter
    assert len({c for *_, c in rec.chunks or ()}) == 2
    _every_way(store, vid, models)


def test_interleaved_groups_and_the_whole_set(store: mmcore.ModelStore, small_chunks: None) -> None:
    a, b = _floats(30), _mixed(9, seed=1)
    models: Models = {}
    for i in range(30):  # two architectures, alternating: their chunks interleave
        models[f"a{i}"] = a[f"c{i:04d}"]
        if i < 9:
            models[f"b{i}"] = b[f"m{i:03d}"]
    vid = store.save(models, compress=True)
    assert len(_coded(store, vid)) == 2
    _every_way(store, vid, models)
    subset = [f"a{i}" for i in (0, 7, 29)] + ["b3"]
    assert_sets_equal(store.load(vid, models=subset), {n: models[n] for n in subset})


def test_trained_like_weights_shrink_and_info_says_by_how_much(store_path: Path) -> None:
    models = _floats(200)
    with mmcore.open(store_path) as store:
        plain = store.save(models)
        # (the same bytes again would reference the plain blob: a store of its own)
    with mmcore.open(store_path.with_name("coded.mm")) as store:
        vid = store.save(models, compress=True)
        (rec,) = _coded(store, vid)
        stride = store.manifest(vid).groups[0].schema.stride
        ratio = rec.coded_length() / rec.payload_length(stride)
        assert 0.7 < ratio < 0.9, ratio  # randn * 0.02: exponents of about 3 bits
        info = store.info(vid)
        assert info.stored_bytes < 0.9 * 200 * stride
    del plain
    run = [sys.executable, "-m", "mmcore"]
    path = str(store_path.with_name("coded.mm"))
    out = subprocess.run([*run, "info", path, vid], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert "compressed 1.6 MB of records stored in " in out and "saved)" in out
    du = subprocess.run([*run, "du", path], capture_output=True, text=True, check=True).stdout
    assert "saved      by compression: 1.6 MB of records stored in" in du
    assert "shared" not in du.split("version ")[-1]  # its payload is its coded bytes


def test_coded_and_plain_blobs_of_equal_bytes_are_one_blob(store: mmcore.ModelStore) -> None:
    models = _floats(20)
    first = store.save(models, compress=True)
    again = store.save(models)  # equal content: the coded blob is referenced
    assert store.manifest(again).groups[0].blob == store.manifest(first).groups[0].blob
    assert store.storage.content(store.manifest(first).groups[0].blob).refs == 2
    _every_way(store, again, models)
    store.delete(first)
    store.gc()
    _every_way(store, again, models)


def test_updates_store_new_models_and_keyframes_coded(store: mmcore.ModelStore) -> None:
    base = _floats(6)
    v0 = store.save(base, compress=True)
    changed = {
        n: {k: t + 1 if n == "c0000" else t for k, t in sd.items()} for n, sd in base.items()
    }
    added = {**changed, "new": _floats(1, seed=9)["c0000"]}
    v1 = store.save(added, approach="update", parent=v0, compress=True, max_chain=1)
    _every_way(store, v1, added)
    m = store.manifest(v1)
    assert m.groups and all(r.chunks is not None for r in _coded(store, v1))
    assert store.info(v1).changes["whole"] >= 1
    v2 = store.save(added, approach="update", parent=v1, compress=False)
    _every_way(store, v2, added)


def test_shared_rows_stacks_and_datasets_are_coded(store: mmcore.ModelStore) -> None:
    g = torch.Generator().manual_seed(3)
    body = {f"body.{i}": torch.randn(128, 128, generator=g) for i in range(2)}
    models = {f"ft{k}": {**body, "head": torch.randn(10, 128, generator=g)} for k in range(5)}
    vid = store.save(models, compress=True)
    group = store.manifest(vid).groups[0]
    assert group.shared is not None
    assert store.storage.content(group.shared.blob).chunks is not None
    _every_way(store, vid, models)
    again = store.save_stacked(store.load_stacked(vid), compress=True)
    _every_way(store, again, models)
    data = {f"cell{k}": {"x": torch.randn(64, 5, generator=g)} for k in range(4)}
    did = store.put_dataset(data, compress=True)
    assert_sets_equal(store.load_dataset(did), data)


@pytest.mark.parametrize("direct", [False, True])  # scattered streams, or one stream a chunk
def test_damaged_chunks_are_found(store_path: Path, small_chunks: None, direct: bool) -> None:
    models = _floats(30, width=700) if direct else _mixed(12)
    with mmcore.open(store_path) as store:
        vid = store.save(models, compress=True)
        (rec,) = _coded(store, vid)
    assert rec.chunks is not None
    pack = store_path / "packs" / f"{rec.pack}.pack"
    pristine = pack.read_bytes()
    last_name = list(models)[-1]
    off, length, _ = rec.chunks[-1]
    for at in (off, off + 3, off + length // 2, off + length - 1):  # lengths, tables, bytes
        data = bytearray(pristine)
        data[at] ^= 0x5A
        pack.write_bytes(bytes(data))
        with mmcore.open(store_path) as store:
            for call in (lambda: store.load(vid), lambda: store.load_model(vid, last_name),
                         lambda: store.load_stacked(vid), lambda: store.verify(vid)):  # fmt: skip
                with pytest.raises(IntegrityError, match="corrupt"):
                    call()
            first = next(iter(models))  # another chunk's model still loads
            assert_sets_equal({first: store.load_model(vid, first)}, {first: models[first]})
    pack.write_bytes(pristine)
    with mmcore.open(store_path) as store:
        _every_way(store, vid, models)


def _decode_jobs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The chunk count of each native decode job started from now on."""
    from mmcore._native import core

    mod, calls = core(), []
    start = mod.planes_decode_chunks_start

    def spy(*args: object) -> object:
        calls.append(args[1])
        return start(*args)

    monkeypatch.setattr(mod, "planes_decode_chunks_start", spy)
    return calls


def test_direct_chunks_decode_and_hash_in_one_native_call(
    store: mmcore.ModelStore, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group whose chunks are one stream of whole records (a float32 schema) is decoded
    and hashed by one native call over every chunk (no Python step per chunk, the GIL
    released): the same bytes and hashes as chunk by chunk, one call a load."""

    models = _floats(30, width=700)
    vid = store.save(models, compress=True)
    (rec,) = _coded(store, vid)
    assert rec.chunks is not None and len(rec.chunks) > 3
    calls = _decode_jobs(monkeypatch)
    assert_sets_equal(store.load(vid), models)
    assert calls == [len(rec.chunks)]
    assert_sets_equal(store.load(vid, verify=False), models)  # decoded by the job, unhashed
    assert calls == [len(rec.chunks)] * 2
    # against the chunk-by-chunk decoder and the hashes of what it decodes
    (group,) = store.manifest(vid).groups
    schema = group.schema
    reader = store.storage.reader
    coded, placed = reader._coded_chunks(rec, rec.chunks)
    items = [(coded[at : at + n], first, count) for at, n, first, count in placed]
    one = records.buffer(group.count * schema.stride)
    hashes = torch.empty((group.count * len(schema.tensors), 32), dtype=torch.uint8)
    records.ChunkDecode(schema, items, one, "x", hashes)()
    other = records.buffer(group.count * schema.stride)
    records.decode_chunks(schema, items, other, "x")
    assert torch.equal(one, other)
    assert torch.equal(hashes, mmcore.kernels.blake3_segments(*records.segment_table(
        other.data_ptr(), schema, group.count)))  # fmt: skip
    assert torch.equal(hashes, reader.stored_hashes(rec))
    # started and dropped without waiting: dropping the job waits for its thread
    again = records.buffer(group.count * schema.stride)
    rehash = torch.zeros_like(hashes)
    wait = records.ChunkDecode(schema, items, again, "x", rehash).start()
    del wait
    assert torch.equal(again, other) and torch.equal(rehash, hashes)
    with pytest.raises(ValueError, match="hashes must be a contiguous"):
        records.ChunkDecode(schema, items, one, "x", hashes[1:])
    with pytest.raises(ValueError, match="not the records of out"):
        records.ChunkDecode(schema, items, one[: -schema.stride], "x", hashes)


@pytest.mark.parametrize("big", [0, 70000])  # runs inside a block; blocks inside a run too
def test_mixed_width_chunks_decode_into_their_runs_in_one_native_call(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch, big: int
) -> None:
    """A group of several streams (every width, padding between tensors) is decoded by
    the same native job: each stream into its runs in the records, the gaps zeroed
    (into a buffer holding other bytes), the tensors hashed; the bytes are those the
    chunk-by-chunk decoder gives."""

    monkeypatch.setattr(records, "CHUNK_BYTES", 1)  # a record a chunk
    g = torch.Generator().manual_seed(3)
    models = {name: {**sd, "big": torch.randn(big, generator=g) * 0.02}
              for name, sd in _mixed(5).items()}  # fmt: skip
    vid = store.save(models, compress=True)
    (rec,) = _coded(store, vid)
    assert rec.chunks is not None and len(rec.chunks) == 5
    (group,) = store.manifest(vid).groups
    schema = group.schema
    layout = records.layout_of(schema)
    assert not layout.direct and layout.gaps and len(layout.streams) > 3
    calls = _decode_jobs(monkeypatch)
    assert_sets_equal(store.load(vid), models)
    assert calls == [5]
    reader = store.storage.reader
    coded, placed = reader._coded_chunks(rec, rec.chunks)
    items = [(coded[at : at + n], first, count) for at, n, first, count in placed]
    one = torch.full((group.count * schema.stride,), 0xAB, dtype=torch.uint8)
    hashes = torch.empty((group.count * len(schema.tensors), 32), dtype=torch.uint8)
    records.ChunkDecode(schema, items, one, "x", hashes)()
    assert calls == [5, 5]
    other = torch.full_like(one, 0xCD)
    records.decode_chunks(schema, items, other, "x")
    assert torch.equal(one, other)
    assert torch.equal(hashes, reader.stored_hashes(rec))


def test_damaged_chunk_records_are_refused(store: mmcore.ModelStore) -> None:
    models = _floats(10)
    vid = store.save(models, compress=True)
    key = store.manifest(vid).groups[0].blob
    raw = msgpack.unpackb(store.storage.catalog.get("content", key))
    for chunks, error in (([[raw["chunks"][0][0], raw["chunks"][0][1] - 1, 10]], IntegrityError),
                          ([[raw["chunks"][0][0], 1 << 40, 10]], IntegrityError),
                          ([[raw["chunks"][0][0], raw["chunks"][0][1], 9]], mmcore.errors.CorruptRecordError),
                          ([[0, 1, True]], mmcore.errors.CorruptRecordError)):  # fmt: skip
        bad = dict(raw, chunks=chunks)
        store.storage.catalog.commit([("content", key, msgpack.packb(bad))])
        store.storage.forget()
        with pytest.raises(error):
            store.load(vid)
    store.storage.catalog.commit([("content", key, msgpack.packb(dict(raw, extents=[[64, 10]])))])
    store.storage.forget()
    with pytest.raises(mmcore.errors.CorruptRecordError, match="coded blob"):
        store.load(vid)


def test_a_reader_of_content_format_2_refuses_coded_blobs(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    vid = store.save(_floats(3), compress=True)
    raw = store.storage.catalog.get("content", store.manifest(vid).groups[0].blob)
    assert raw is not None and msgpack.unpackb(raw)["format"] == 3
    monkeypatch.setattr("mmcore.manifest.CONTENT_FORMAT", 2)
    with pytest.raises(FormatVersionError, match="format 3"):
        ContentRecord.decode(raw)


def test_compaction_transfer_and_export_keep_coded_blobs(store: mmcore.ModelStore,
                                                          tmp_path: Path) -> None:  # fmt: skip
    models = _mixed(8)
    filler = _floats(5, seed=4)
    doomed = store.save(filler, compress=True)
    vid = store.save({**models, **_floats(5, seed=5)}, compress=True)
    want = store.load(vid)
    store.delete(doomed)
    store.gc(compact_below=2.0)  # every pack rewritten: chunks move
    _every_way(store, vid, want)
    assert store.check().problems == []
    with mmcore.open(tmp_path / "other.mm") as other:
        store.push(other)
        _every_way(other, vid, want)
        assert other.check().problems == []
    store.export(vid, tmp_path / "out")
    with mmcore.open(tmp_path / "imported.mm") as fresh:
        back = fresh.import_(tmp_path / "out")
        for name, sd in want.items():
            assert_sets_equal({name: fresh.load_model(back, name)}, {name: sd})


def test_compress_must_be_a_bool(store: mmcore.ModelStore) -> None:
    with pytest.raises(InvalidArgumentError, match="compress"):
        store.save(_floats(2), compress="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="compress"):
        store.put_dataset({"a": {"x": torch.zeros(2)}}, compress=1)  # type: ignore[arg-type]
    assert store.versions() == []


def test_the_layout_of_a_schema() -> None:
    models = _mixed(1)
    from mmcore.modelset import Grouper, iter_models

    grouper = Grouper()
    entry = next(iter(iter_models(models)))
    schema = grouper.schemas[grouper.group_of(entry)]
    layout = records.Layout(schema)
    assert [s.width for s in layout.streams] == [8, 4, 2, 1]
    assert not layout.direct and layout.gaps
    floats = grouper.schemas[grouper.group_of(next(iter(iter_models(_floats(1)))))]
    assert records.Layout(floats).direct


def test_rebase_and_import_compress_too(store_path: Path, tmp_path: Path) -> None:
    """``rebase(compress=True)`` codes the records a rebase writes (an update made a
    baseline: new blobs); bytes the store holds already keep the form they were stored
    in (a blob's address is its content). ``import_`` and the command line pass it on."""
    from mmcore.cli import main

    models = _floats(12)
    changed = {n: {k: t + 1 for k, t in sd.items()} for n, sd in models.items()}
    with mmcore.open(store_path) as store:
        v0 = store.save(models)
        v1 = store.save(changed, approach="update", parent=v0)
        v2 = store.save(models, approach="update", parent=v0)  # (unchanged: v0's blob)
        store.rebase(v1, compress=True)
        assert store.manifest(v1).approach == "baseline" and len(_coded(store, v1)) == 1
        _every_way(store, v1, changed)
        with pytest.raises(InvalidArgumentError, match="compress"):
            store.rebase(v1, compress=None)  # type: ignore[arg-type]
        store.export(v1, tmp_path / "out")
    assert main(["rebase", str(store_path), v2, "--compress"]) == 0
    with mmcore.open(store_path) as store:  # v0's plain blob, referenced again
        assert store.manifest(v2).approach == "baseline" and _coded(store, v2) == []
        _every_way(store, v2, models)
    fresh = tmp_path / "fresh.mm"
    with mmcore.open(fresh):
        pass
    assert main(["import", str(fresh), str(tmp_path / "out"), "--compress"]) == 0
    with mmcore.open(fresh) as store:
        (info,) = store.versions()
        assert len(_coded(store, info.id)) == 1
        assert_sets_equal(store.load(info.id), {n: changed[n] for n in sorted(changed)})


def test_large_coded_rows_are_private_to_each_model(store: mmcore.ModelStore) -> None:
    """Rows of 1 MiB or more, decoded: each model maps its own copy-on-write view, so a
    change to one model's shared tensor is its own."""
    g = torch.Generator().manual_seed(4)
    body = {"body": torch.randn(300_000, generator=g) * 0.02}  # 1.2 MB: shared, coded
    models = {f"ft{k}": {**body, "head": torch.randn(20_000, generator=g)} for k in range(3)}
    vid = store.save(models, compress=True)
    group = store.manifest(vid).groups[0]
    assert group.shared is not None and group.row_schema.stride >= (1 << 20)
    assert store.storage.content(group.shared.blob).chunks is not None
    got = store.load(vid)
    assert_sets_equal(got, models)
    got["ft0"]["body"].add_(1.0)
    assert torch.equal(got["ft1"]["body"], body["body"]) and torch.equal(
        got["ft2"]["body"], body["body"]
    )
    assert not torch.equal(got["ft0"]["body"], body["body"])
    _every_way(store, vid, models)


def test_gc_compresses_a_store_saved_plain(store: mmcore.ModelStore, small_chunks: None) -> None:
    """gc(compress=True) codes every group blob stored plain (records, shared rows,
    datasets), in place of copying it; delta blobs, provenance and coded blobs move as
    they are; every version reads as before, and a second run has nothing to do."""
    g = torch.Generator().manual_seed(7)
    body = {f"body.{i}": torch.randn(64, 64, generator=g) * 0.05 for i in range(2)}
    frozen = {f"ft{k}": {**body, "head": torch.randn(10, 64, generator=g) * 0.05}
              for k in range(4)}  # fmt: skip
    mixed, floats = _mixed(9), _floats(40, seed=8)
    v1 = store.save({**mixed, **floats})
    v2 = store.save(frozen)
    changed = {n: {k: t + 0.001 for k, t in sd.items()} for n, sd in floats.items()}
    v3 = store.save(changed, approach="update", parent=v1)
    data = {f"cell{k}": {"x": torch.randn(64, 5, generator=g)} for k in range(4)}
    did = store.put_dataset(data)
    coded_before = store.save(_floats(6, seed=9), compress=True)
    wants = {v: store.load(v) for v in (v1, v2, v3, coded_before)}
    blobs = {v: [gr.blob for gr in store.manifest(v).groups] for v in wants}
    before = store.stored_bytes()
    assert store.storage.compression(store.manifest(v1).groups) == (0, 0)  # none coded

    assert store.gc(compress=True) > 0
    assert store.stored_bytes() < before
    for v, want in wants.items():
        _every_way(store, v, want)
        assert [gr.blob for gr in store.manifest(v).groups] == blobs[v]  # the same blobs
    assert_sets_equal(store.load_dataset(did), data)
    plain, coded = store.storage.compression(store.manifest(v1).groups)
    assert 0 < coded < plain
    for v in (v1, v2):
        assert all(r.chunks is not None for r in _coded(store, v))
        assert len(_coded(store, v)) == len(store.manifest(v).groups)
    shared = store.manifest(v2).groups[0].shared
    assert shared is not None and store.storage.content(shared.blob).chunks is not None
    assert store.check().problems == []
    packs = sorted(store.tier.list())
    assert store.gc(compress=True) == 0  # nothing left to code, nothing dead
    assert sorted(store.tier.list()) == packs


def test_gc_compress_refuses_records_that_would_not_come_back(store_path: Path) -> None:
    """A plain blob whose bytes between tensors are not zero (as a damaged pack's
    may be) would not decode to the same bytes: gc refuses it and rewrites nothing."""
    models = _mixed(4)
    with mmcore.open(store_path) as store:
        vid = store.save(models)
        group = store.manifest(vid).groups[0]
        rec = store.storage.content(group.blob)
        schema = group.record_schema
    spans = sorted((s.offset, s.offset + s.nbytes) for s in schema.tensors)
    gap = next(end for (_, end), (start, _) in zip(spans, spans[1:]) if end < start)
    pack = store_path / "packs" / f"{rec.pack}.pack"
    data = bytearray(pack.read_bytes())
    data[rec.extents[0][0] + gap] = 1
    pack.write_bytes(bytes(data))
    with mmcore.open(store_path) as store:
        packs = sorted(store.tier.list())
        with pytest.raises(IntegrityError, match="do not decode back"):
            store.gc(compress=True)
        assert sorted(store.tier.list()) == packs
        assert store.storage.content(group.blob).chunks is None
        assert_sets_equal(store.load(vid), models)  # (the hashes cover tensors, not gaps)


def test_gc_compress_from_the_command_line(store_path: Path) -> None:
    with mmcore.open(store_path) as store:
        vid = store.save(_floats(30))
    run = [sys.executable, "-m", "mmcore"]
    out = subprocess.run([*run, "gc", str(store_path), "--compress"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.startswith("reclaimed ")
    with mmcore.open(store_path) as store:
        assert len(_coded(store, vid)) == 1
        assert_sets_equal(store.load(vid), _floats(30))
    with mmcore.open(store_path) as store, pytest.raises(InvalidArgumentError, match="compress"):
        store.gc(compress="yes")  # type: ignore[arg-type]


def test_gc_compress_leaves_packs_that_coding_would_not_shrink(store: mmcore.ModelStore,
                                                               small_chunks: None) -> None:  # fmt: skip
    """Random bytes do not code smaller (each of many chunks a few bytes larger):
    gc(compress=True) keeps their pack as it is (never returns a negative count), and
    still compacts a pack that is due."""
    g = torch.Generator().manual_seed(11)
    noise = {f"n{k}": {"q": torch.randint(0, 256, (3000,), generator=g, dtype=torch.uint8)}
             for k in range(1000)}  # fmt: skip
    vid = store.save(noise)
    packs = sorted(store.tier.list())
    assert store.gc(compress=True) == 0
    assert sorted(store.tier.list()) == packs
    assert _coded(store, vid) == []
    assert store.gc(compress=True, compact_below=2.0) >= 0  # due: rewritten plain
    assert_sets_equal(store.load(vid), noise)
    assert _coded(store, vid) == []
