"""Bad input gets a typed, clear error and changes nothing in the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_set

import mmcore
from mmcore.errors import (
    FormatVersionError,
    InvalidArgumentError,
    InvalidModelSetError,
    ModelNotFoundError,
    NotAStoreError,
    ReadOnlyStoreError,
    RefNotFoundError,
    StoreError,
    VersionNotFoundError,
)


def _snapshot(store: mmcore.ModelStore) -> tuple[list[str], list[str], dict[str, str]]:
    return [v.id for v in store.versions()], store.tier.list(), store.refs()


BAD_SETS = [
    ({}, InvalidModelSetError, "empty"),
    ([], InvalidModelSetError, "empty"),
    ({"a": 3}, InvalidModelSetError, "model 'a': expected a torch.nn.Module or a state dict"),
    (
        {"a": {"w": [1.0, 2.0]}},
        InvalidModelSetError,
        "model 'a', entry 'w': expected a torch.Tensor, got list",
    ),
    ({"": {"w": torch.ones(1)}}, InvalidModelSetError, "non-empty"),
    ({7: {"w": torch.ones(1)}}, InvalidModelSetError, "model names must be strings, got int"),
    (
        [("a", {"w": torch.ones(1)}), ("a", {"w": torch.ones(1)})],
        InvalidModelSetError,
        "duplicate model name 'a'",
    ),
    ([("a", {"w": torch.ones(1)}), "b"], InvalidModelSetError, "pairs"),
    (
        {"a": {"w": torch.ones(2).to_sparse()}},
        InvalidModelSetError,
        "layout torch.sparse_coo is not supported",
    ),
    ({"a": {"w": torch.empty(2, device="meta")}}, InvalidModelSetError, "meta device"),
    ({"\ud800": {"w": torch.ones(1)}}, InvalidModelSetError, "not valid unicode"),
    ({"a": {3: torch.ones(1)}}, InvalidModelSetError, "tensor names must be strings"),
    ("not models", InvalidModelSetError, "mapping of model name"),
    (42, InvalidModelSetError, "mapping of model name"),
]


@pytest.mark.parametrize(("models", "error", "message"), BAD_SETS)
def test_bad_model_sets(
    store: mmcore.ModelStore, models: object, error: type, message: str
) -> None:
    store.save(small_set(2), ref="keep")
    before = _snapshot(store)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.save(models)
    assert _snapshot(store) == before


def test_bad_model_late_in_set_changes_nothing(store: mmcore.ModelStore) -> None:
    store.save(small_set(2))
    before = _snapshot(store)
    models = dict(small_set(500))
    models["cell_499"] = {"w": "oops"}  # type: ignore[dict-item]
    with pytest.raises(InvalidModelSetError, match="cell_499"):
        store.save(models)
    assert _snapshot(store) == before


def test_unknown_approach(store: mmcore.ModelStore) -> None:
    with pytest.raises(
        InvalidArgumentError,
        match="approach must be one of 'baseline', 'update', 'provenance', got 'delta'",
    ):
        store.save(small_set(1), approach="delta")
    assert _snapshot(store) == ([], [], {})


def test_parent_given_to_baseline(store: mmcore.ModelStore) -> None:
    v = store.save(small_set(1))
    with pytest.raises(InvalidArgumentError, match=r"baseline version .* has no parent"):
        store.save(small_set(1), parent=v)


@pytest.mark.parametrize("ref", ["", 5, "x" * 201])
def test_bad_ref_name(store: mmcore.ModelStore, ref: object) -> None:
    with pytest.raises(InvalidArgumentError, match="ref must be a non-empty string"):
        store.save(small_set(1), ref=ref)  # type: ignore[arg-type]
    assert _snapshot(store) == ([], [], {})


def test_unknown_version_ref_and_model(store: mmcore.ModelStore) -> None:
    v = store.save(small_set(2), ref="fleet")
    with pytest.raises(VersionNotFoundError, match="no version or ref 'deadbeef'"):
        store.load("deadbeef")
    with pytest.raises(VersionNotFoundError, match="no version or ref 'nope'"):
        store.info("nope")
    with pytest.raises(RefNotFoundError, match=r"no ref 'nope'.*refs: fleet"):
        store.log("nope")
    with pytest.raises(ModelNotFoundError, match="has no model 'cell_999'"):
        store.load_model(v, "cell_999")
    with pytest.raises(InvalidArgumentError, match="device must be like"):
        store.load(v, device="warp-drive")


def test_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.mm"
    f.write_text("hello")
    with pytest.raises(NotAStoreError, match="is a file"):
        mmcore.open(f)
    assert f.read_text() == "hello"


def test_foreign_directory_is_not_taken_over(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(NotAStoreError, match="non-empty directory"):
        mmcore.open(d)
    assert sorted(p.name for p in d.iterdir()) == ["cat.jpg"]


def test_missing_store_without_create(tmp_path: Path) -> None:
    with pytest.raises(NotAStoreError, match="not an mmcore store"):
        mmcore.open(tmp_path / "nothing.mm", create=False)
    assert not (tmp_path / "nothing.mm").exists()


def test_newer_store_format_is_refused(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        s.save(small_set(1))
    (store_path / "MMCORE").write_text(json.dumps({"format": 99, "kind": "mmcore-store"}))
    with pytest.raises(FormatVersionError, match=r"newer mmcore .*format 99"):
        mmcore.open(store_path)


def test_newer_manifest_format_is_refused(store: mmcore.ModelStore) -> None:
    import msgpack

    v = store.save(small_set(1))
    raw = msgpack.unpackb(store.catalog.get("manifests", v.encode()))
    raw["format"] = 7
    store.catalog.commit([("manifests", v.encode(), msgpack.packb(raw))])
    store.storage.forget()
    with pytest.raises(FormatVersionError, match="manifest record has format 7"):
        store.load(v)


def test_readonly_store_refuses_writes(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        v = s.save(small_set(1), ref="r")
    with mmcore.open(store_path, readonly=True) as s:
        with pytest.raises(ReadOnlyStoreError, match="read-only"):
            s.save(small_set(1))
        with pytest.raises(ReadOnlyStoreError):
            s.delete(v)
        with pytest.raises(ReadOnlyStoreError):
            s.gc()


def test_closed_store(store_path: Path) -> None:
    s = mmcore.open(store_path)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.save(small_set(1))
