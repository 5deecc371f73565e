"""Model blobs as concatenated zstd frames (codec 2, what a GPU writes with
nvCOMP): the CPU reads them, and damage is caught with the codec's own errors."""

from __future__ import annotations

import pytest
import torch

from mmcore import codec
from mmcore.codec import frames
from mmcore.errors import IntegrityError, InvalidArgumentError


def _blob(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.zeros(n, dtype=torch.uint8)
    b[::97] = torch.randint(0, 256, (len(b[::97]),), dtype=torch.uint8, generator=g)
    return b


def test_chunks_cover_each_span_in_frames_of_at_most_64_kib() -> None:
    offsets, sizes, counts = frames.chunks([(0, 0), (16, 1), (32, 3 * frames.CHUNK + 5)])
    assert counts == [0, 1, 4]
    assert offsets == [16, 32, 32 + frames.CHUNK, 32 + 2 * frames.CHUNK, 32 + 3 * frames.CHUNK]
    assert sizes == [1, frames.CHUNK, frames.CHUNK, frames.CHUNK, 5]


def test_frames_decode_with_the_zstandard_package() -> None:
    buf = _blob(6 * frames.CHUNK)
    spans = [
        (0, 100),
        (112, 0),
        (128, 2 * frames.CHUNK),
        (128 + 2 * frames.CHUNK, 3 * frames.CHUNK + 99),
    ]
    data = bytes(buf.numpy())
    for (start, length), z in zip(spans, frames.compress_cpu(buf, spans)):
        assert (
            codec.plain_bytes(z, codec.ZSTD_FRAMES, length, "blob") == data[start : start + length]
        )
    assert frames.compress_cpu(buf, [(0, 0)]) == [b""]


def test_damage_and_wrong_lengths_are_integrity_errors() -> None:
    buf = _blob(3 * frames.CHUNK)
    (z,) = frames.compress_cpu(buf, [(0, buf.numel())])
    with pytest.raises(IntegrityError, match=r"^blob: the payload decompresses to 100 bytes"):
        codec.plain_bytes(
            z[: len(z) // 3 * 0] + frames.compress_cpu(buf, [(0, 100)])[0], 2, buf.numel(), "blob"
        )
    with pytest.raises(
        IntegrityError, match=r"^blob: the payload decompresses to more than the 10 bytes"
    ):
        codec.plain_bytes(z, codec.ZSTD_FRAMES, 10, "blob")
    bad = bytearray(z)
    bad[0] ^= 0xFF  # the first frame's magic number (damage inside a frame's data is
    # caught by the tensors' hashes after decoding: the frames carry no checksum)
    with pytest.raises(IntegrityError, match=r"^blob: the compressed payload is damaged"):
        codec.plain_bytes(bytes(bad), codec.ZSTD_FRAMES, buf.numel(), "blob")
    with pytest.raises(
        InvalidArgumentError, match=r"span 0 \(bytes 0 to 11\) ends past the buffer's 10 bytes"
    ):
        frames.compress_cpu(torch.zeros(10, dtype=torch.uint8), [(0, 11)])
    with pytest.raises(IntegrityError, match=r"^blob: unknown codec 7 for the model blob"):
        codec.plain_bytes(z, 7, buf.numel(), "blob")


def test_nvcomp_is_used_only_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert frames.for_device(None) is None
    assert frames.for_device(torch.device("cpu")) is None
    monkeypatch.setenv("MMCORE_NVCOMP", "0")
    assert not frames.nvcomp_available()
    assert frames.for_device(torch.device("cuda", 0)) is None
