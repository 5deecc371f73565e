"""Fuzzing the catalog record decoders: random, truncated and mutated bytes give a
typed error (or, for a mutation that still makes sense, a valid record), never
another exception, a crash or a hang: 4 x 2,500 generated inputs plus every
truncation of every valid record."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import torch
from conftest import small_set
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmcore
from mmcore.errors import CorruptRecordError, FormatVersionError
from mmcore.examples import battery
from mmcore.manifest import ContentRecord, DatasetRecord, Manifest, decode_pack_record, pack_record

TYPED = (CorruptRecordError, FormatVersionError)
FUZZ = settings(max_examples=2500, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def _valid_records() -> list[tuple[Callable[[bytes], Any], bytes]]:
    """A real two-group manifest, its content records and a pack record."""
    models: dict[str, Any] = dict(small_set(3))
    models["odd"] = {"w": torch.arange(6, dtype=torch.int16), "flag": torch.tensor(True)}
    with tempfile.TemporaryDirectory() as d, mmcore.open(Path(d) / "s.mm") as store:
        v = store.save(models, ref="fleet", message="fuzz")
        manifest = store.catalog.get("manifests", v.encode())
        changed = dict(models)
        changed["cell_001"] = {k: t + 1 for k, t in models["cell_001"].items()}
        del changed["cell_002"]
        changed["new"] = {"w": torch.ones(3)}
        u = store.save(changed, approach="update", parent=v, tolerance=1e-3)
        update = store.catalog.get("manifests", u.encode())
        cells = battery.make_cells(3, seed=0)
        data = battery.make_data(list(cells), rows=8, seed=0)
        b = store.save(cells)
        ds = store.put_dataset(data)
        recipe = mmcore.Recipe(battery.TRAINER, data=ds, params={"lr": 0.1, "epochs": 1}, seed=2,
                               models=["cell_000001"])  # fmt: skip
        trained = dict(cells)
        trained.update(battery.train({"cell_000001": cells["cell_000001"]},
                                     {"cell_000001": data["cell_000001"]}, lr=0.1, epochs=1, seed=2))  # fmt: skip
        p = store.save(trained, approach="provenance", parent=b, recipe=recipe)
        prov = store.catalog.get("manifests", p.encode())
        dataset = store.catalog.get("datasets", ds.encode())
        contents = [raw for _, raw in store.catalog.scan("content")]
    assert manifest is not None and update is not None and len(contents) == 7
    assert prov is not None and dataset is not None
    return [
        (Manifest.decode, manifest),
        (Manifest.decode, update),
        (Manifest.decode, prov),
        (DatasetRecord.decode, dataset),
        *[(ContentRecord.decode, raw) for raw in contents],
        (decode_pack_record, pack_record(4096, 1.5)),
    ]


VALID = _valid_records()
DECODERS = [Manifest.decode, ContentRecord.decode, DatasetRecord.decode, decode_pack_record]
record = st.sampled_from(VALID)


def _typed_or_valid(decode: Callable[[bytes], Any], data: bytes) -> None:
    with contextlib.suppress(TYPED):
        decode(data)


@FUZZ
@given(st.sampled_from(DECODERS), st.binary(max_size=512))
def test_random_bytes(decode: Callable[[bytes], Any], data: bytes) -> None:
    try:
        decode(data)
    except TYPED:
        return
    raise AssertionError(f"random bytes decoded: {data!r}")


def test_every_truncation_of_every_record() -> None:
    tried = 0
    for decode, raw in VALID:
        for cut in range(len(raw)):
            try:
                decode(raw[:cut])
            except TYPED:
                tried += 1
                continue
            raise AssertionError(f"a record cut at {cut} of {len(raw)} bytes decoded")
    assert tried > 500


@FUZZ
@given(record, st.data())
def test_truncated_mutated_records(
    rec: tuple[Callable[[bytes], Any], bytes], data: st.DataObject
) -> None:
    decode, raw = rec
    cut = data.draw(st.integers(0, len(raw) - 1))
    mutated = bytearray(raw[:cut])
    for at, value in data.draw(
        st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4)
    ):
        if mutated:
            mutated[at % len(mutated)] = value
    _typed_or_valid(decode, bytes(mutated))


@FUZZ
@given(
    record,
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_records(
    rec: tuple[Callable[[bytes], Any], bytes], edits: list[tuple[int, int]]
) -> None:
    decode, raw = rec
    data = bytearray(raw)
    for at, value in edits:
        data[at % len(data)] = value
    _typed_or_valid(decode, bytes(data))


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 64), (1 << 64) - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip
FIELDS = ["format", "id", "approach", "created", "models", "groups", "logical_bytes", "stored_bytes",
          "parent", "schema", "count", "blob", "members", "tensors", "stride", "align", "pack",
          "extents", "hashes", "refs", "size", "update", "depth", "tolerance", "max_chain", "removed",
          "added", "whole", "changed", "delta_blob", "stats", "table"]  # fmt: skip


@FUZZ
@given(
    st.sampled_from(DECODERS), record, st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
)
def test_well_formed_msgpack_with_wrong_fields(decode: Callable[[bytes], Any],
                                               rec: tuple[Callable[[bytes], Any], bytes],
                                               changes: dict[str, Any]) -> None:  # fmt: skip
    base = dict(msgpack.unpackb(rec[1], strict_map_key=False))
    base.update(changes)
    if "groups" in base and isinstance(base["groups"], list) and base["groups"] and changes:
        first = base["groups"][0]
        if isinstance(first, dict):
            first.update(changes)  # reach into a group and its schema as well
            if isinstance(first.get("schema"), dict):
                first["schema"].update(changes)
    if isinstance(base.get("update"), dict) and changes:
        base["update"].update(changes)  # and into an update version's own map
    try:
        data = msgpack.packb(base, use_bin_type=True)
    except (OverflowError, ValueError):
        return  # not encodable as msgpack at all
    _typed_or_valid(decode, data)
