"""Every public method and CLI verb: wrong types, unknown names, read-only stores
and damaged catalog records give a typed error that says what to do, and the
store is unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import small_set

import mmcore
from mmcore.cli import main
from mmcore.errors import (
    CorruptRecordError,
    InvalidArgumentError,
    ModelNotFoundError,
    ReadOnlyStoreError,
    RefNotFoundError,
    VersionNotFoundError,
)

Call = Callable[[mmcore.ModelStore, str], Any]

BAD_CALLS: list[tuple[str, Call, type[Exception], str]] = [
    ("load(5)", lambda s, v: s.load(5), InvalidArgumentError, "version id or ref name must be"),
    ("load(None)", lambda s, v: s.load(None), InvalidArgumentError, "version id or ref name"),
    ("load(unknown)", lambda s, v: s.load("cafe0000"), VersionNotFoundError, "no version or ref"),
    ("load(verify=1)", lambda s, v: s.load(v, verify=1), InvalidArgumentError, "verify must be True or False"),
    ("load(models=str)", lambda s, v: s.load(v, models="cell_000"), InvalidArgumentError, "list of model names"),
    ("load(models=[3])", lambda s, v: s.load(v, models=[3]), InvalidArgumentError, "each of models"),
    ("load(models=unknown)", lambda s, v: s.load(v, models=["cell_000", "nope"]), ModelNotFoundError,
     "no model.*'nope'"),
    ("load(device=3.5)", lambda s, v: s.load(v, device=3.5), InvalidArgumentError, "device must be like"),
    ("load_model(name=5)", lambda s, v: s.load_model(v, 5), InvalidArgumentError, "model name must be"),
    ("load_model(unknown)", lambda s, v: s.load_model(v, "nope"), ModelNotFoundError, "has no model 'nope'"),
    ("load_model(bad version)", lambda s, v: s.load_model(b"x", "cell_000"), InvalidArgumentError, "version id"),
    ("info(5)", lambda s, v: s.info(5), InvalidArgumentError, "version id or ref name"),
    ("info(unknown)", lambda s, v: s.info("nope"), VersionNotFoundError, "mmcore log"),
    ("verify(5)", lambda s, v: s.verify(5), InvalidArgumentError, "version id or ref name"),
    ("verify(unknown)", lambda s, v: s.verify("nope"), VersionNotFoundError, "no version or ref"),
    ("resolve('')", lambda s, v: s.resolve(""), InvalidArgumentError, "non-empty string"),
    ("log(unknown)", lambda s, v: s.log("nope"), RefNotFoundError, "refs: fleet"),
    ("delete(unknown)", lambda s, v: s.delete("nope"), VersionNotFoundError, "no version or ref"),
    ("delete(head)", lambda s, v: s.delete(v), InvalidArgumentError, "head of ref"),
    ("delete(5)", lambda s, v: s.delete(5), InvalidArgumentError, "version id or ref name"),
    ("delete_ref(unknown)", lambda s, v: s.delete_ref("nope"), RefNotFoundError, "no ref 'nope'"),
    ("save(message=5)", lambda s, v: s.save(small_set(1), message=5), InvalidArgumentError, "message must be"),
    ("save(progress='yes')", lambda s, v: s.save(small_set(1), progress="yes"), InvalidArgumentError,
     "progress must be True or False"),
    ("save(approach=None)", lambda s, v: s.save(small_set(1), approach=None), InvalidArgumentError,
     "approach must be one of"),
]  # fmt: skip


def _state(store: mmcore.ModelStore) -> tuple[Any, ...]:
    return (
        sorted(v.id for v in store.versions()),
        store.tier.list(),
        store.refs(),
        sorted(store.catalog.scan("content")),
    )


@pytest.mark.parametrize(
    ("what", "call", "error", "message"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS]
)
def test_bad_calls(store: mmcore.ModelStore, what: str, call: Call, error: type[Exception],
                   message: str) -> None:  # fmt: skip
    v = store.save(small_set(2), ref="fleet")
    before = _state(store)
    with pytest.raises(error, match=message):
        call(store, v)
    assert _state(store) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"readonly": "no"}, "readonly must be True or False"), ({"create": 1}, "create must be"),
     ({"path": 42}, "a store path is a non-empty str or os.PathLike"),
     ({"path": ""}, "a store path is a non-empty str")],
)  # fmt: skip
def test_open_refuses_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    args = {"path": tmp_path / "s.mm", **kwargs}
    with pytest.raises(InvalidArgumentError, match=message):
        mmcore.open(**args)
    assert not (tmp_path / "s.mm").exists()


def test_readonly_store_refuses_every_write(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        v = s.save(small_set(1), ref="r")
    with mmcore.open(store_path, readonly=True) as s:
        before = _state(s)
        for write in (lambda: s.save(small_set(1)), lambda: s.delete(v),
                      lambda: s.delete_ref("r"), s.gc):  # fmt: skip
            with pytest.raises(ReadOnlyStoreError, match="reopen it with readonly=False"):
                write()
        assert _state(s) == before


# -- damaged catalog records ----------------------------------------------------------


def _damage(path: Path, cf: str, key: bytes, value: bytes) -> None:
    with mmcore.open(path) as s:
        s.catalog.commit([(cf, key, value)])


@pytest.fixture
def saved(store_path: Path) -> tuple[Path, str]:
    with mmcore.open(store_path) as s:
        v = s.save(small_set(3), ref="fleet")
    return store_path, v


def _manifest_raw(path: Path, v: str) -> dict[str, Any]:
    with mmcore.open(path, readonly=True) as s:
        raw = s.catalog.get("manifests", v.encode())
    assert raw is not None
    return dict(msgpack.unpackb(raw))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("models"), "field 'models' is missing"),
        (lambda m: m.update(models="cell"), "field 'models' should be a list"),
        (lambda m: m.update(created=True), "field 'created' should be a finite number"),
        (lambda m: m.update(logical_bytes=-1), "out of range"),
        (lambda m: m["groups"][0].update(count=99), "one group of 99 models for 3 names"),
        (lambda m: m["groups"][0].update(blob=b"short"), "blob key of 5 bytes"),
        (lambda m: m["groups"][0]["schema"].update(stride=4), "ends past the model stride"),
        (lambda m: m["groups"][0]["schema"]["tensors"][0].__setitem__(4, 7), "7 bytes for shape"),
        (lambda m: m.update(models=["a", "a", "b"]), "a model name appears twice"),
    ],
)
def test_damaged_manifest_is_a_typed_error(saved: tuple[Path, str], change: Callable[[dict[str, Any]], Any],
                                           message: str) -> None:  # fmt: skip
    path, v = saved
    raw = _manifest_raw(path, v)
    change(raw)
    _damage(path, "manifests", v.encode(), msgpack.packb(raw))
    with mmcore.open(path) as s:
        for call in (lambda: s.load(v), lambda: s.info(v), lambda: s.verify(v), lambda: s.log("fleet"),
                     lambda: s.load_model(v, "cell_000"), lambda: s.delete(v)):  # fmt: skip
            with pytest.raises(CorruptRecordError, match=message):
                call()


def test_damaged_content_record_and_ref(saved: tuple[Path, str]) -> None:
    path, v = saved
    raw = _manifest_raw(path, v)
    blob = raw["groups"][0]["blob"]
    content = dict(msgpack.unpackb(_content_raw(path, blob)))
    content["pack"] = "../../../etc/passwd"
    _damage(path, "content", blob, msgpack.packb(content))
    with mmcore.open(path) as s:
        with pytest.raises(CorruptRecordError, match="not a pack id"):
            s.load(v)
        with pytest.raises(CorruptRecordError, match="not a pack id"):
            s.gc()
    _damage(path, "content", blob, b"\xc1garbage")
    with mmcore.open(path) as s, pytest.raises(CorruptRecordError, match="not valid msgpack"):
        s.load_model(v, "cell_001")
    _damage(path, "refs", b"fleet", b"\xff\xfe")
    with mmcore.open(path) as s:
        with pytest.raises(CorruptRecordError, match="ref 'fleet' holds"):
            s.refs()
        with pytest.raises(CorruptRecordError, match="ref 'fleet' holds"):
            s.log("fleet")
    _damage(path, "refs", b"fleet", b"0123456789abcdef")
    with mmcore.open(path) as s, pytest.raises(CorruptRecordError, match="not in the store"):
        s.load("fleet")


def _content_raw(path: Path, key: bytes) -> bytes:
    with mmcore.open(path, readonly=True) as s:
        raw = s.catalog.get("content", key)
    assert raw is not None
    return raw


# -- the command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "{path}", "nope"], "no version or ref 'nope'"),
        (["log", "{path}", "nope"], "no ref 'nope'"),
        (["verify", "{path}", "nope"], "no version or ref 'nope'"),
        (["info", "{path}/missing.mm"], "not an mmcore store"),
        (["verify", "{path}/packs"], "non-empty directory|not an mmcore store"),
    ],
)
def test_cli_errors_are_one_line(saved: tuple[Path, str], argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path, _ = saved
    assert main([a.format(path=path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmcore: error:") and err.count("\n") == 1
    assert any(m in err for m in message.split("|")), err


def test_cli_reports_a_damaged_catalog(
    saved: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, v = saved
    _damage(path, "manifests", v.encode(), b"\x92\x01\x02")
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "manifest record is not a map" in err and "restore the store from a copy" in err
