"""Quantized deltas decoded by address tables (issue 21): the table-driven decode
gives the list API's bits, refuses every header field that does not fit its tensor
(before any byte is written), and lossy chains load as model records."""

from __future__ import annotations

import gc
import struct

import pytest
import torch
from conftest import assert_bit_equal

import mmcore
from mmcore.kernels._segments import QUANT_HEADER
from mmcore.kernels.quantized import quantize_decode, quantize_encode
from mmcore.modelset import Schema, TensorSpec
from mmcore.paths import chain

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _pair(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parent = torch.randn(n, generator=g).to(dtype)
    new = (parent.double() + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    if n > 3:  # escapes: values no quantum reaches
        new[1], new[3] = float("inf"), float("nan")
    return new, parent


def _schema(dtypes: list[torch.dtype], n: int) -> Schema:
    specs, at = [], 0
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
             torch.float64: "float64"}  # fmt: skip
    for i, dt in enumerate(dtypes):
        specs.append(TensorSpec(f"t{i}", names[dt], (n,), at, n * dt.itemsize))
        at += -(-n * dt.itemsize // 8) * 8
    return Schema(specs, at, 8)


def _encoded(
    n: int = 37,
) -> tuple[Schema, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    news, parents = zip(*(_pair(dt, n, i) for i, dt in enumerate(DTYPES)))
    encs, _ = quantize_encode(list(news), list(parents), 1e-3)
    return _schema(DTYPES, n), list(parents), encs, quantize_decode(encs, list(parents))


def _run(schema: Schema, parents: list[torch.Tensor], encs: list[torch.Tensor],
         outs: list[torch.Tensor]) -> int | None:  # fmt: skip
    k = len(encs)
    return chain._decode_quantized(
        schema,
        torch.arange(k, dtype=torch.int64),
        torch.tensor([e.data_ptr() for e in encs], dtype=torch.int64),
        torch.tensor([e.numel() for e in encs], dtype=torch.int64),
        torch.tensor([p.data_ptr() for p in parents], dtype=torch.int64),
        torch.tensor([o.data_ptr() for o in outs], dtype=torch.int64),
    )


def test_the_table_decode_gives_the_list_apis_bits() -> None:
    schema, parents, encs, want = _encoded()
    outs = [torch.empty_like(p) for p in parents]
    assert _run(schema, parents, encs, outs) is None
    for got, expected in zip(outs, want):
        assert_bit_equal(got, expected)


# (field offset in the header, struct format, a value that does not fit)
BAD_FIELDS = [
    (0, "<B", 9),  # encoding version
    (1, "<B", 1),  # encoding id: xor-planes, not quantized
    (2, "<B", 3),  # quantum width
    (3, "<B", 1),  # float kind: float16 for another dtype
    (16, "<Q", 36),  # element count
    (24, "<Q", 1 << 40),  # escapes: more than elements
    (24, "<Q", 0),  # escapes: the length no longer adds up
]


@pytest.mark.parametrize(("at", "fmt", "value"), BAD_FIELDS)
@pytest.mark.parametrize("which", [0, 2])
def test_a_header_field_that_does_not_fit_is_refused_before_decoding(
    at: int, fmt: str, value: int, which: int
) -> None:
    schema, parents, encs, _ = _encoded()
    if at == 3 and which == 0:
        value = 3  # float32's kind for the float16 tensor
    bad = encs[which].clone()
    bad[at : at + struct.calcsize(fmt)] = torch.frombuffer(
        bytearray(struct.pack(fmt, value)), dtype=torch.uint8
    )
    encs[which] = bad
    outs = [torch.zeros_like(p) for p in parents]
    assert _run(schema, parents, encs, outs) == which
    assert all(not bool(o.view(torch.uint8).any()) for o in outs)  # nothing written


def test_a_truncated_encoding_is_refused() -> None:
    schema, parents, encs, _ = _encoded()
    encs[1] = encs[1][: QUANT_HEADER.size - 1].clone()
    assert _run(schema, parents, encs, [torch.empty_like(p) for p in parents]) == 1
    encs[1] = torch.empty(0, dtype=torch.uint8)
    assert _run(schema, parents, encs, [torch.empty_like(p) for p in parents]) == 1


def test_a_lossy_chain_loads_as_model_records(store: mmcore.ModelStore) -> None:
    g = torch.Generator().manual_seed(4)
    models = {f"m{i}": {"w": torch.randn(40, generator=g).to(dt), "n": torch.arange(3)}
              for i, dt in enumerate(DTYPES)}  # fmt: skip
    vid, current = store.save(models), models
    for step in range(4):
        current = {n: {"w": (sd["w"].double() + 1e-2 * (step + 1)).to(sd["w"].dtype), "n": sd["n"]}
                   for n, sd in current.items()}  # fmt: skip
        vid = store.save(current, approach="update", parent=vid, tolerance=1e-3,
                         max_recovery=None)  # fmt: skip
    names, states, _, _ = chain._recover(store.storage, vid, None, verify=True)  # hashes checked
    assert all(type(states[n]) is not chain._LooseState for n in names)
    for name, sd in current.items():
        got = states[name]["w"].double()
        assert float((got - sd["w"].double()).abs().max()) <= 1e-3 * 1.01
    assert store.info(vid).changes["delta"] == 4


@pytest.mark.parametrize("changed", [2, 8])
def test_an_update_loads_its_records_as_views_per_buffer(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch, changed: int
) -> None:
    """A load keeps the models a delta decodes as records until the end, and so the
    models of a group most of which a delta replaces; then it views them per buffer
    (one unbind where at least half a buffer is wanted, record by record else). The
    models left in the base group are views of its mapping, the decoded ones views of
    the wave's buffer, and no view is made of a replaced base record."""
    g = torch.Generator().manual_seed(changed)
    base = {f"m{i}": {"w": torch.randn(6, 3, generator=g), "b": torch.randn(6, generator=g)}
            for i in range(10)}  # fmt: skip
    v1 = store.save(base)
    new = {n: ({k: t + 1 for k, t in sd.items()} if i < changed else sd)
           for i, (n, sd) in enumerate(base.items())}  # fmt: skip
    v2 = store.save(new, approach="update", parent=v1)
    made: list[int] = []
    views = chain.record_views
    monkeypatch.setattr(chain, "record_views",
                        lambda buf, schema, count: made.append(count) or views(buf, schema, count))  # fmt: skip
    got = store.load(v2)
    assert list(got) == list(new)
    for name, sd in new.items():
        assert list(got[name]) == list(sd)
        for key, t in sd.items():
            assert_bit_equal(got[name][key], t)
    storage = {n: got[n]["w"].untyped_storage().data_ptr() for n in got}
    assert len({storage[n] for n in list(new)[:changed]}) == 1  # the decoded wave's buffer
    assert len({storage[n] for n in list(new)[changed:]}) == 1  # the base group's mapping
    # 2 of 10 replaced: the base group read with views (by the reader, as a baseline's);
    # 8 of 10: read as records, its 2 models left viewed one by one, no view of the 8
    assert sorted(made) == sorted([changed] + ([] if changed < 5 else [1] * (10 - changed)))


def test_a_chain_load_lets_the_gc_collect_once(store: mmcore.ModelStore) -> None:
    """A load keeps Python's GC paused from its first table to its last view: a pause per
    step let a collection run between them, walking every view and record made so far
    (and later again, as they aged)."""
    g = torch.Generator().manual_seed(9)
    base = {f"m{i}": {"w": torch.randn(4, generator=g), "b": torch.randn(2, generator=g)}
            for i in range(3000)}  # fmt: skip
    vid, current = store.save(base), base
    for step in range(2):
        current = {n: ({k: t + step + 1 for k, t in sd.items()} if i % 10 == step else sd)
                   for i, (n, sd) in enumerate(current.items())}  # fmt: skip
        vid = store.save(current, approach="update", parent=vid)
    store.load(vid)  # (tables cached, like every load after the first)
    collections: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(seen)
    try:
        got = store.load(vid)
    finally:
        gc.callbacks.remove(seen)
    assert len(collections) <= 1, collections
    for name, sd in current.items():
        for key, t in sd.items():
            assert_bit_equal(got[name][key], t)
