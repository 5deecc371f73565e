"""Corrupted, truncated or missing stored bytes are detected and named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import small_set

import mmcore
from mmcore.errors import IntegrityError


def _pack_path(store: mmcore.ModelStore) -> Path:
    (pack,) = store.tier.list()
    return store.tier.path_of(pack)


def _flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
        f.flush()
        os.fsync(f.fileno())


def _tensor_offset(store: mmcore.ModelStore, version: str, model: str, tensor: str) -> int:
    m = store.manifest(version)
    gi, pos = m.locate(model)  # type: ignore[misc]
    group = m.groups[gi]
    spec = next(s for s in group.schema.tensors if s.name == tensor)
    extent, index = store.storage.content(group.blob).locate(pos)
    return extent + index * group.schema.stride + spec.offset


@pytest.mark.parametrize(("model", "tensor", "byte"), [("cell_000", "l0.weight", 0), ("cell_005", "l1.bias", 3),
                                                       ("cell_007", "l0.bias", 17)])  # fmt: skip
def test_flipped_payload_bit_is_named_by_verify_load_and_load_model(store_path: Path, model: str, tensor: str,
                                                                    byte: int) -> None:  # fmt: skip
    with mmcore.open(store_path) as s:
        v = s.save(small_set(8))
        offset = _tensor_offset(s, v, model, tensor) + byte
        path = _pack_path(s)
    _flip_bit(path, offset)
    with mmcore.open(store_path) as s:
        for call in (lambda: s.verify(v), lambda: s.load(v), lambda: s.load_model(v, model)):
            with pytest.raises(IntegrityError, match=f"model '{model}', tensor '{tensor}'") as info:
                call()
            assert (info.value.model, info.value.tensor) == (model, tensor)
        other = "cell_001" if model != "cell_001" else "cell_002"
        assert torch.equal(s.load_model(v, other)["l0.weight"], small_set(8)[other]["l0.weight"])
        s.load(v, verify=False)  # the caller may skip the check explicitly


def test_flipped_hash_table_bit_is_detected(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        v = s.save(small_set(8))
        rec = s.storage.content(s.manifest(v).groups[0].blob)
        path = _pack_path(s)
    _flip_bit(path, rec.hashes_offset + rec.hashes_length - 1)
    with mmcore.open(store_path) as s, pytest.raises(IntegrityError, match="cell_007"):
        s.verify(v)


def test_truncated_pack(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        v = s.save(small_set(8))
        path = _pack_path(s)
    os.truncate(path, 4096 + 100)
    with mmcore.open(store_path) as s:
        with pytest.raises(IntegrityError, match="truncated"):
            s.load(v)
        with pytest.raises(IntegrityError, match="truncated"):
            s.load_model(v, "cell_007")
        with pytest.raises(IntegrityError, match="truncated"):
            s.verify(v)


def test_missing_pack(store_path: Path) -> None:
    with mmcore.open(store_path) as s:
        v = s.save(small_set(8))
        path = _pack_path(s)
    path.unlink()
    with mmcore.open(store_path) as s, pytest.raises(IntegrityError, match="missing"):
        s.load(v)
