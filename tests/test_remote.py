"""A store on S3-compatible object storage (a real SeaweedFS on 127.0.0.1): several
writers and readers at once, typed conflicts, commits whose response was lost, the
gc grace period, and credentials kept out of every message. The behaviour every
store shares runs on this backend too (conftest.CONFORMANCE)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import assert_sets_equal, s3_url, small_set

import mmcore
from mmcore.errors import (
    ConflictError,
    InvalidArgumentError,
    NotAStoreError,
    RefConflictError,
    RemoteStoreError,
    VersionNotFoundError,
)
from mmcore.paths import commit
from mmcore.store import remote


@pytest.fixture
def url(seaweed: Any) -> str:
    return s3_url(seaweed)


def _open(seaweed: Any, url: str, **kw: Any) -> mmcore.ModelStore:
    store = mmcore.open(url, storage_options=seaweed.options(), **kw)
    store.gc_grace_s = 0.0
    return store


@pytest.fixture
def two(seaweed: Any, url: str) -> Iterator[tuple[mmcore.ModelStore, mmcore.ModelStore]]:
    a, b = _open(seaweed, url), _open(seaweed, url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _during_commit(store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch, act: Any) -> None:
    """Runs ``act`` once, while ``store`` builds its next version's commit: after its
    transaction began, before its commit (the race two writers run)."""
    real = commit.version_records
    done: list[bool] = []

    def racing(catalog: Any, *args: Any, **kwargs: Any) -> Any:
        if catalog is store.catalog and not done:
            done.append(True)
            act()
        return real(catalog, *args, **kwargs)

    monkeypatch.setattr(commit, "version_records", racing)


def test_two_writers_to_different_refs_both_succeed(two: Any) -> None:
    a, b = two
    va = a.save(small_set(6, seed=1), ref="a")
    vb = b.save(small_set(6, seed=2), ref="b")  # b had not seen a's commit: caught up
    a.catalog.refresh_s = 0.0
    assert a.refs() == b.refs() == {"a": va, "b": vb}
    assert_sets_equal(a.load("b"), small_set(6, seed=2))
    assert_sets_equal(b.load("a"), small_set(6, seed=1))


def test_a_racing_writer_on_another_ref_commits_after_the_winner(
    two: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two
    won: list[str] = []
    _during_commit(b, monkeypatch, lambda: won.append(a.save(small_set(4, seed=1), ref="a")))
    vb = b.save(small_set(4, seed=2), ref="b")
    assert b.refs() == {"a": won[0], "b": vb}
    assert_sets_equal(b.load(won[0]), small_set(4, seed=1))
    assert_sets_equal(b.load(vb), small_set(4, seed=2))
    assert b.check().problems == []


def test_two_writers_moving_one_ref_one_wins_the_other_gets_a_typed_conflict(
    two: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two
    v1 = a.save(small_set(4, seed=1), ref="main")
    won: list[str] = []
    _during_commit(b, monkeypatch, lambda: won.append(a.save(small_set(4, seed=2), ref="main")))
    with pytest.raises(RefConflictError, match="moved by another writer") as exc:
        b.save(small_set(4, seed=3), ref="main")
    assert exc.value.ref == "main" and exc.value.head == won[0]
    assert f"(to {won[0]})" in str(exc.value)
    assert b.refs() == {"main": won[0]}
    assert sorted(i.id for i in b.versions()) == sorted([v1, won[0]])
    live = {b.storage.content(g.blob).pack for v in (v1, won[0]) for g in b.manifest(v).groups}
    assert set(b.tier.list()) == live  # the loser's pack is gone again
    retried = b.save(small_set(4, seed=3), ref="main")  # retrying is one call
    assert b.manifest(retried).prev == won[0]
    assert_sets_equal(a.load("main"), small_set(4, seed=3))


def test_a_raced_shared_blob_reference_is_counted_again(
    two: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both writers store the same bytes: the second's commit, built while the first
    referenced them, is built again (one more reference, not a lost one)."""
    a, b = two
    same = small_set(5, seed=7)
    won: list[str] = []
    _during_commit(b, monkeypatch, lambda: won.append(a.save(same)))
    vb = b.save(same)
    blob = b.manifest(vb).groups[0].blob
    assert b.storage.content(blob).refs == 2
    b.delete(won[0])
    b.gc()
    assert_sets_equal(a.load(vb), same)  # a still reads it: one reference left
    b.delete(vb)
    b.gc()
    assert b.tier.list() == []
    assert b.check().problems == []


def test_an_update_whose_parent_another_writer_deleted_is_refused(
    two: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two
    v1 = a.save(small_set(4, seed=1))
    b.manifest(v1)  # cached by b
    _during_commit(b, monkeypatch, lambda: (a.delete(v1), a.gc()))
    with pytest.raises(VersionNotFoundError, match="deleted by another writer"):
        b.save(small_set(4, seed=2), approach="update", parent=v1)
    assert b.versions() == [] and b.tier.list() == []


def test_a_delete_racing_a_child_save_is_refused(two: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete that read the versions (no children) before a child of its version was
    committed must not go in: it would orphan the child."""
    a, b = two
    v1 = a.save(small_set(4, seed=1))
    real = b._delete

    def racing(version: str, cascade: bool) -> list[str]:
        a.save(small_set(4, seed=2), approach="update", parent=v1)
        return real(version, cascade)

    monkeypatch.setattr(b, "_delete", racing)
    with pytest.raises(ConflictError, match="run it again"):
        b.delete(v1)
    assert v1 in [i.id for i in b.versions()]


def test_a_reader_sees_new_versions_without_reopening(seaweed: Any, url: str) -> None:
    with _open(seaweed, url) as w, _open(seaweed, url, readonly=True) as r:
        assert r.versions() == []
        v = w.save(small_set(3), ref="main")
        assert_sets_equal(r.load(v), small_set(3))  # a miss catches up
        r.catalog.refresh_s = 0.0
        assert r.refs() == {"main": v}


def test_a_reader_holding_a_deleted_version_gets_a_typed_error(seaweed: Any, url: str) -> None:
    with _open(seaweed, url) as w, _open(seaweed, url) as r:
        v = w.save(small_set(3))
        assert_sets_equal(r.load(v), small_set(3))
        w.delete(v)
        w.gc()
        with pytest.raises(VersionNotFoundError):
            r.load(v)


def test_a_commit_whose_response_was_lost_is_found_in_the_log(
    seaweed: Any, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _open(seaweed, url) as s:
        client = s.catalog._client
        real = client.put

        def lost(key: str, data: Any, *, create: bool = False) -> bool:
            real(key, data, create=create)
            if key.startswith("catalog/log/"):
                raise RemoteStoreError("PUT ...: connection reset (simulated)")
            return True

        monkeypatch.setattr(client, "put", lost)
        v = s.save(small_set(3), ref="main")
        monkeypatch.undo()
        with _open(seaweed, url) as other:
            assert other.refs() == {"main": v}
            assert_sets_equal(other.load(v), small_set(3))


def test_gc_keeps_a_young_uncommitted_pack_for_its_grace_period(seaweed: Any, url: str) -> None:
    with _open(seaweed, url) as s:
        v = s.save(small_set(3))
        writer = s.tier.create()  # a save in flight: uploaded, not committed yet
        data = torch.arange(100, dtype=torch.uint8)
        writer.write_ptr(data.data_ptr(), 100, 4096)
        writer.finish()
        assert s.gc(grace_s=3600) == 0
        assert writer.pack_id in s.tier.list()
        assert s.gc(grace_s=0) == 4196
        assert writer.pack_id not in s.tier.list()
        assert_sets_equal(s.load(v), small_set(3))
        with pytest.raises(InvalidArgumentError, match="grace_s"):
            s.gc(grace_s=-1)


def test_an_open_reads_the_last_snapshot_and_the_commits_after_it(
    seaweed: Any, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "SNAPSHOT_EVERY", 4)
    with _open(seaweed, url) as s:
        vids = [s.save(small_set(2, seed=i), ref=f"r{i}") for i in range(10)]
    with _open(seaweed, url) as again:
        client = again.catalog._client
        assert again.catalog.seq >= 10
        # the marker, the snapshot list and snapshot, and the commits after it (+ one 404)
        assert client.requests <= 3 + 1 + 4 + 1, client.requests
        assert again.refs() == {f"r{i}": v for i, v in enumerate(vids)}


def test_load_model_reads_only_its_bytes(seaweed: Any, url: str) -> None:
    with _open(seaweed, url) as s:
        v = s.save(small_set(200))
    with _open(seaweed, url) as r:
        client = r.tier.client
        before = client.requests
        got = r.load_model(v, "cell_007")
        assert client.requests - before == 2  # the model's bytes and its hashes' page, at once
        want = small_set(200)["cell_007"]
        assert list(got) == list(want) and all(torch.equal(got[k], t) for k, t in want.items())
        stride = r.manifest(v).groups[0].schema.stride
        assert r.tier.bytes_read <= stride + 200 * 4 * 32  # (the hash table: one page here)
        before = client.requests
        got = r.load_model(v, "cell_150")  # its hashes' page kept: its bytes only
        assert client.requests - before == 1
        want = small_set(200)["cell_150"]
        assert all(torch.equal(got[k], t) for k, t in want.items())


def test_credentials_never_appear_in_messages(seaweed: Any) -> None:
    secret = "wJalrXUtnFEMI-not-a-real-secret-K7MDENG"
    key = "AKIAEXAMPLENOTREAL00"
    options = {"endpoint": "http://127.0.0.1:9", "allow_http": True, "region": "us-east-1",
               "access_key_id": key, "secret_access_key": secret, "max_retries": 0,
               "retry_timeout_s": 1}  # fmt: skip
    with pytest.raises(RemoteStoreError) as exc:
        mmcore.open(s3_url(seaweed), storage_options=options)
    assert secret not in str(exc.value) and key not in str(exc.value)
    assert "127.0.0.1:9" in str(exc.value)
    ok = {**seaweed.options(), "access_key_id": key, "secret_access_key": secret}
    ok.pop("skip_signature")
    with mmcore.open(s3_url(seaweed), storage_options=ok) as s:
        v = s.save(small_set(2))
        text = repr(s) + str(s.info(v)) + repr(s.tier.client.__dict__.get("url"))
        assert secret not in text and key not in text


def test_bad_locations_and_options_are_refused(seaweed: Any, tmp_path: Any) -> None:
    for bad in ("s3://", "s3:///prefix", "s3://bucket//x"):
        with pytest.raises(InvalidArgumentError, match="s3://BUCKET"):
            mmcore.open(bad, storage_options=seaweed.options())
    with pytest.raises(InvalidArgumentError, match="unknown storage_options \\['colour'\\]"):
        mmcore.open(s3_url(seaweed), storage_options={**seaweed.options(), "colour": 1})
    with pytest.raises(InvalidArgumentError, match="are for s3:// stores only"):
        mmcore.open(tmp_path / "x.mm", storage_options={})
    with pytest.raises(NotAStoreError, match="no mmcore store"):
        mmcore.open(s3_url(seaweed), storage_options=seaweed.options(), create=False)
    url = s3_url(seaweed)
    remote.ObjectClient(url, seaweed.options()).put("something/else", b"x")
    with pytest.raises(NotAStoreError, match="holds other objects"):
        mmcore.open(url, storage_options=seaweed.options())


def test_a_cache_serves_what_was_read_and_refetches_a_damaged_range(
    seaweed: Any, url: str, tmp_path: Any
) -> None:
    with _open(seaweed, url) as s:
        v = s.save(small_set(50))
    with mmcore.open(url, storage_options=seaweed.options(), cache=tmp_path / "c") as r:
        client, cache = r.tier.client, r.tier.cache
        assert cache is not None
        assert_sets_equal(r.load(v), small_set(50))
        first = client.requests
        assert_sets_equal(r.load(v), small_set(50))  # every range from the cache
        assert client.requests == first and cache.hits > 0
        files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
        assert files
        for f in files:  # one bit flipped in each: found, dropped, fetched again
            data = bytearray(f.read_bytes())
            data[len(data) // 3] ^= 1
            f.write_bytes(bytes(data))
        assert_sets_equal(r.load(v), small_set(50))
        assert client.requests > first
        one = r.load_model(v, "cell_003")
        assert all(torch.equal(one[k], t) for k, t in small_set(50)["cell_003"].items())


def test_a_server_that_ignores_conditional_writes_is_refused_for_writing(
    seaweed: Any, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _open(seaweed, url).close()
    real = remote.ObjectClient.put

    def unconditional(self: Any, key: str, data: Any, *, create: bool = False) -> bool:
        return bool(real(self, key, data, create=False))  # as a server that ignores the header

    monkeypatch.setattr(remote.ObjectClient, "put", unconditional)
    with pytest.raises(mmcore.errors.StoreError, match="ignores If-None-Match"):
        mmcore.open(url, storage_options=seaweed.options())
    with mmcore.open(url, storage_options=seaweed.options(), readonly=True) as r:
        assert r.versions() == []


def test_damaged_bytes_in_the_bucket_are_found(seaweed: Any, url: str) -> None:
    with _open(seaweed, url) as s:
        v = s.save(small_set(50))
        s.load_model(v, "cell_001")  # (its hashes' page kept)
        rec = s.storage.content(s.manifest(v).groups[0].blob)
        stride = s.manifest(v).groups[0].schema.stride
        key = s.tier.key(rec.pack)
        data = bytearray(s.tier.client.get(key) or b"")
        data[rec.extents[0][0] + 7 * stride + 5] ^= 0x10  # in cell_007
        s.tier.client.put(key, bytes(data))  # (overwritten behind the store's back)
        with pytest.raises(mmcore.errors.IntegrityError, match="cell_007"):
            s.load_model(v, "cell_007")
        with pytest.raises(mmcore.errors.IntegrityError, match="cell_007"):
            s.load(v)
        s.tier.client.put(key, bytes(data[: rec.hashes_offset]))  # truncated
        s.tier.sizes.clear()
        with pytest.raises(mmcore.errors.IntegrityError):
            s.load(v)


def test_models_of_empty_tensors_load_one_by_one(seaweed: Any, url: str) -> None:
    """(Found by the API state machine on this backend: an empty record's range.)"""
    with _open(seaweed, url) as s:
        models = {"a": {"w": torch.randn(0)}, "b": {"w": torch.randn(0), "n": torch.arange(3)}}
        v = s.save(models)
    with _open(seaweed, url) as r:
        for name, sd in models.items():
            got = r.load_model(v, name)
            assert list(got) == list(sd) and all(torch.equal(got[k], t) for k, t in sd.items())


def test_a_large_pack_streams_while_written_and_a_writer_that_goes_back_uploads_it_whole(
    seaweed: Any, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "MULTIPART_CHUNK", 5 << 20)  # (S3's smallest part)
    streamed: list[bool] = []
    real = remote._ObjectPackWriter._upload

    def spy(self: Any) -> None:
        real(self)
        streamed.append(self._streamed is True and not self._stale)

    monkeypatch.setattr(remote._ObjectPackWriter, "_upload", spy)
    with _open(seaweed, url) as s:
        big = small_set(70_000, seed=5)  # about 20 MB of records and hashes
        v = s.save(big)
        assert streamed == [True]
        assert_sets_equal(s.load(v), big)
        # a writer that writes front to back, then goes back into bytes already sent
        writer = s.tier.create()
        data = torch.randint(0, 256, (24 << 20,), dtype=torch.uint8)
        for at in range(0, data.numel(), 1 << 20):
            writer.write_ptr(data.data_ptr() + at, 1 << 20, 4096 + at)
        patch = torch.full((100,), 7, dtype=torch.uint8)
        writer.write_ptr(patch.data_ptr(), 100, 4096 + 1000)  # behind the stream
        data[1000:1100] = 7
        size = writer.finish()
        assert streamed[-1] is False and size == 4096 + data.numel()
        back = torch.empty(data.numel(), dtype=torch.uint8)
        s.tier.read_into(writer.pack_id, 4096, data.numel(), back.data_ptr())
        assert torch.equal(back, data)
