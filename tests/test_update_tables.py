"""The whole-table update path (issue 21): quantized encodings built over address
tables give the list API's bytes, model blobs are compressed and decoded by
multi-frame calls (and frame by frame where those are missing or fail), a save
whose blobs span many write chunks round-trips bit for bit, and a model whose
encodings do not lie back to back (a quantized tensor within tolerance between two
that are not) is gathered before it is compressed."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from conftest import assert_bit_equal

import mmcore
from mmcore import codec, kernels
from mmcore.errors import IntegrityError, InvalidArgumentError
from mmcore.kernels._segments import FLOAT_KINDS
from mmcore.kernels.quantized import quantize_encode, quantize_encode_table
from mmcore.paths import chain, update

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _table(news: list[torch.Tensor], parents: list[torch.Tensor]) -> list[torch.Tensor]:
    ints = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    buf, offsets = quantize_encode_table(
        ints([t.data_ptr() for t in news]), ints([t.data_ptr() for t in parents]),
        ints([t.numel() for t in news]), ints([FLOAT_KINDS[t.dtype] for t in news]),
        ints([t.element_size() for t in news]), 1e-3,
    )  # fmt: skip
    return [buf[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def test_quantized_table_encodings_are_the_list_apis_bytes() -> None:
    g = torch.Generator().manual_seed(5)
    news, parents = [], []
    for i in range(24):
        dtype = DTYPES[i % 4]
        n = int(torch.randint(0, 2000, (1,), generator=g))
        parent = torch.randn(n, generator=g).to(dtype)
        step = 10.0 ** -(i % 6)  # from every q width to escapes
        new = (parent.double() + step * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
        if n > 4:
            new[2], new[4] = float("inf"), float("nan")
        news.append(new)
        parents.append(parent)
    want, _ = quantize_encode(news, parents, 1e-3)
    got = _table(news, parents)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_quantized_table_refuses_kinds_that_are_not_their_sizes() -> None:
    x = torch.zeros(4)
    ints = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    with pytest.raises(InvalidArgumentError, match="kinds must be FLOAT_KINDS values"):
        quantize_encode_table(ints([x.data_ptr()]), ints([x.data_ptr()]), ints([4]), ints([3]),
                              ints([8]), 1e-3)  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="null address"):
        quantize_encode_table(
            ints([0]), ints([x.data_ptr()]), ints([4]), ints([3]), ints([4]), 1e-3
        )
    with pytest.raises(InvalidArgumentError, match="tolerance must be a finite number"):
        quantize_encode_table(ints([x.data_ptr()]), ints([x.data_ptr()]), ints([4]), ints([3]),
                              ints([4]), 0.0)  # fmt: skip


def _segments(pairs: list[tuple[int, int]]) -> bytes:
    return kernels.tensor_bytes(torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2))


class _NoMulti:
    """zstandard as a backend without the multi-frame calls (cffi) presents it."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def ZstdCompressor(self, **kwargs: Any) -> Any:
        real = self._real.ZstdCompressor(**kwargs)
        return types.SimpleNamespace(compress=real.compress, compressobj=real.compressobj)


def test_compress_segments_frames_each_segment_with_or_without_the_multi_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import zstandard

    data = bytes(range(256)) * 64 + b"\0" * 5000
    pairs = [(0, 100), (100, 3000), (3100, len(data) - 3100)]
    want = [data[a : a + n] for a, n in pairs]
    frames, _ = codec.compress_segments([(data, _segments(pairs))])
    assert [zstandard.ZstdDecompressor().decompress(f) for f in frames] == want
    monkeypatch.setattr(codec, "_zstd", lambda: _NoMulti(zstandard))
    frames, _ = codec.compress_segments([(data, _segments(pairs))])
    assert [zstandard.ZstdDecompressor().decompress(f) for f in frames] == want


def test_decompress_segments_gives_none_for_a_damaged_frame_or_a_wrong_size() -> None:
    import zstandard

    blobs = [bytes([i]) * (1000 + i) for i in range(3)]
    frames = [zstandard.ZstdCompressor().compress(b) for b in blobs]
    data = b"".join(frames)
    at = [0, len(frames[0]), len(frames[0]) + len(frames[1])]
    pairs = [(a, len(f)) for a, f in zip(at, frames)]
    sizes = kernels.tensor_bytes(torch.tensor([len(b) for b in blobs], dtype=torch.int64))
    got = codec.decompress_segments(data, _segments(pairs), sizes)
    assert got is not None and [bytes(p) for p in got[0]] == blobs
    wrong = kernels.tensor_bytes(torch.tensor([len(b) + 1 for b in blobs], dtype=torch.int64))
    assert codec.decompress_segments(data, _segments(pairs), wrong) is None
    damaged = bytearray(data)
    damaged[at[1] : at[1] + 4] = b"\xff\xff\xff\xff"  # frame 1's magic number
    assert codec.decompress_segments(bytes(damaged), _segments(pairs), sizes) is None


def _fleet(n: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {f"m{i:03d}": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g),
                          "s": torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8)}
            for i in range(n)}  # fmt: skip


def _moved(
    models: dict[str, dict[str, torch.Tensor]], seed: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Small steps on most models (deltas that compress), every bit new on every
    fifth (blobs stored raw), and one model left as it is."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, sd) in enumerate(models.items()):
        if i == 7:
            out[name] = sd
        elif i % 5 == 0:  # every byte of s new: its blob is stored raw
            out[name] = {**sd, "s": torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8)}
        else:
            out[name] = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                         else v for k, v in sd.items()}  # fmt: skip
    return out


def test_a_save_written_in_many_chunks_round_trips_bit_for_bit(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(update, "_CHUNK", 20_000)  # a few models per compress-and-write chunk
    base = _fleet(90, 1)
    v1 = store.save(base)
    new = _moved(base, 2)
    v2 = store.save(new, approach="update", parent=v1)
    codecs = {row[6] for row in chain.delta_table(store.storage, store.manifest(v2)).rows}
    assert codecs == {codec.ZSTD, codec.NONE}  # both kinds of blob, across the chunks
    assert store.manifest(v2).update.stats["unchanged"] == 1  # type: ignore[union-attr]
    got = store.load(v2)
    for name, sd in new.items():
        for key, t in sd.items():
            assert_bit_equal(got[name][key], t)
    assert_bit_equal(store.load_model(v2, "m045")["w"], new["m045"]["w"])


def test_quantized_pieces_with_a_hole_are_gathered_and_round_trip(store: mmcore.ModelStore) -> None:
    g = torch.Generator().manual_seed(3)
    base = {f"m{i}": {"a": torch.randn(300, generator=g), "b": torch.randn(200, generator=g),
                      "c": torch.randn(100, generator=g)} for i in range(80)}  # fmt: skip
    v1 = store.save(base)
    new = {name: {"a": sd["a"] + 0.5, "b": sd["b"] + 1e-6, "c": sd["c"] - 0.5}  # b within tolerance
           for name, sd in base.items()}  # fmt: skip
    v2 = store.save(new, approach="update", parent=v1, tolerance=1e-3)
    table = chain.delta_table(store.storage, store.manifest(v2))
    kinds = table.columns[:, 0].reshape(80, 3)
    assert bool((kinds[:, 1] == codec.SAME).all())  # the hole: b is the parent's
    assert bool((kinds[:, 0] != codec.SAME).all()) and bool((kinds[:, 2] != codec.SAME).all())
    got = store.load(v2)
    for name, sd in new.items():
        assert_bit_equal(got[name]["b"], base[name]["b"])
        for key in ("a", "c"):
            assert float((got[name][key] - sd[key]).abs().max()) <= 1e-3


def test_a_damaged_blob_among_many_is_named_after_the_multi_frame_call_fails(
    store: mmcore.ModelStore,
) -> None:
    base = _fleet(80, 4)
    v1 = store.save(base)
    new = {n: {k: v + 1e-3 if v.is_floating_point() else v for k, v in sd.items()}
           for n, sd in base.items()}  # fmt: skip
    v2 = store.save(new, approach="update", parent=v1)
    m = store.manifest(v2)
    rows = chain.delta_table(store.storage, m).rows
    assert sum(row[6] == codec.ZSTD for row in rows) >= 64  # the multi-frame call is taken
    i = m.update.changed.index("m033")  # type: ignore[union-attr]
    rec = store.storage.content(m.update.delta_blob)  # type: ignore[union-attr]
    path = store.tier.path_of(rec.pack)
    with open(path, "r+b") as f:
        f.seek(rows[i][0])
        f.write(b"\xff\xff\xff\xff")  # its frame's magic number
    store.storage.delta_tables.clear()
    with pytest.raises(IntegrityError, match=r"model 'm033'.*damaged"):
        store.load(v2)


def test_delta_tables_built_by_columns_are_the_format_s_rows() -> None:
    """``encode_tables`` lays the model rows out by column operations: byte for byte the
    MODEL rows of the format (first entry = the counts before), then the tensor rows;
    a field too wide for its bytes is refused."""
    from mmcore.paths.delta_blob import MODEL, TENSOR, decode_tables, encode_tables

    models = torch.tensor([[64, 10, 30, 2, 1, 1], [(1 << 62) + 5, 0, 0, 0, 65535, 255],
                           [4096, 7, 7, 1, 3, 0]], dtype=torch.int64)  # fmt: skip
    tensors = torch.tensor([[2, 0, 12], [0, 12, 0], [1, 0, 7]], dtype=torch.int64)
    got = encode_tables(models, tensors)
    firsts = [0, 2, 2]
    want = b"".join(MODEL.pack(*row[:3], first, *row[3:])
                    for row, first in zip(models.tolist(), firsts))  # fmt: skip
    want += b"".join(TENSOR.pack(*row) for row in tensors.tolist())
    assert got == want
    table = decode_tables(got, 3, torch.zeros((3, kernels.HASH_SIZE), dtype=torch.uint8), "t")
    assert table.rows == [(*row[:3], first, *row[3:])
                          for row, first in zip(models.tolist(), firsts)]  # fmt: skip
    assert encode_tables(torch.empty((0, 6), dtype=torch.int64), tensors[:0]) == b""
    for row, col, value in ((0, 4, 65536), (0, 5, 256), (0, 0, -1), (2, 3, -1)):
        bad = models.clone()
        bad[row, col] = value
        with pytest.raises(ValueError, match="does not fit its width"):
            encode_tables(bad, tensors)
    with pytest.raises(ValueError, match="3 tensor entries announced, 2 given"):
        encode_tables(models, tensors[:2])
