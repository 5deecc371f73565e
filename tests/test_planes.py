"""The byte-plane coder (``kernels.compress_planes`` / ``decompress_planes``): every bit
back for every dtype, size and value; smaller than raw on trained-like weights; a
damaged stream refused (IntegrityError), never read or written past its ends."""

from __future__ import annotations

import random

import pytest
import torch

from mmcore import kernels
from mmcore.errors import IntegrityError, InvalidArgumentError

BLOCK = 1 << 16


def _round_trip(t: torch.Tensor, threads: int = 0) -> torch.Tensor:
    blob = kernels.compress_planes(t, threads=threads)
    out = torch.empty_like(t)
    kernels.decompress_planes(blob, out, threads=threads)
    assert torch.equal(out.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    return blob


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.int8, torch.uint8, torch.int64, torch.bool,
                                   torch.complex64])  # fmt: skip
@pytest.mark.parametrize("n", [0, 1, 3, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
def test_every_bit_comes_back(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    if dtype == torch.bool:
        t = torch.rand(n, generator=g) > 0.5
    elif dtype.is_floating_point or dtype.is_complex:
        t = (torch.randn(n, generator=g, dtype=torch.float64) * 0.02).to(dtype)
    else:
        t = torch.randint(-100, 100, (n,), generator=g).to(dtype)
    _round_trip(t)
    _round_trip(t, threads=1)


def test_special_values_and_payloads() -> None:
    t = torch.randn(BLOCK + 500)
    bits = t.view(torch.int32)
    bits[:6] = torch.tensor([0x7FC00001, -1, 0x7F800000, -0x800000, 1, -(2**31)], dtype=torch.int32)
    t[10:14] = torch.tensor([-0.0, 1e-40, -1e-45, 3.4e38])
    _round_trip(t)
    _round_trip(t.view(torch.int16).view(torch.bfloat16))  # every bf16 pattern the halves make


def test_constant_and_uniform_planes() -> None:
    zeros = torch.zeros(3 * BLOCK)
    blob = _round_trip(zeros)
    assert blob.numel() < 400  # one symbol a plane: the tables and states only
    noise = torch.randint(0, 256, (2 * BLOCK * 4,), dtype=torch.uint8).view(torch.float32)
    blob = _round_trip(noise)
    assert blob.numel() <= noise.numel() * 4 + 64  # raw planes: a few bytes over
    every = torch.arange(256 * 1000, dtype=torch.int32).remainder(256).to(torch.uint8)
    _round_trip(every)


def test_trained_like_weights_shrink() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1 << 20, generator=g) * 0.05
    assert kernels.compress_planes(w).numel() < 0.86 * w.numel() * 4
    assert kernels.compress_planes(w.bfloat16()).numel() < 0.70 * w.numel() * 2


def test_a_damaged_stream_is_refused_or_decodes_within_bounds() -> None:
    """Truncations, a wrong length and random byte flips: IntegrityError, or (a flipped
    byte of a raw plane) other values; never a crash. Loads check hashes after."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(BLOCK + 999, generator=g) * 0.05
    blob = kernels.compress_planes(t)
    out = torch.empty_like(t)
    for cut in (0, 3, 15, 16, 20, blob.numel() // 2, blob.numel() - 1):
        with pytest.raises(IntegrityError, match="byte-plane stream"):
            kernels.decompress_planes(blob[:cut].clone(), out)
    with pytest.raises(IntegrityError, match="another number of bytes"):
        kernels.decompress_planes(blob, torch.empty(t.numel() - 1))
    longer = torch.cat([blob, torch.zeros(3, dtype=torch.uint8)])
    with pytest.raises(IntegrityError, match="bytes past its last block"):
        kernels.decompress_planes(longer, out)
    rng = random.Random(2)
    refused = differ = 0
    for _ in range(300):
        bad = blob.clone()
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(bad.numel())] ^= 1 << rng.randrange(8)
        try:
            kernels.decompress_planes(bad, out)
        except IntegrityError:
            refused += 1
            continue
        differ += not torch.equal(out.view(torch.uint8), t.view(torch.uint8))
    # flips in headers, tables and lengths are refused; a flip inside a Huffman or raw
    # plane's bits decodes to other values (the tensor hashes find those)
    assert refused > 10 and refused + differ > 280, (refused, differ)


def _huffman_plane(t: torch.Tensor, mode: int) -> tuple[torch.Tensor, int]:
    """A stream of one block whose last plane is Huffman-coded (``mode``: 2, its table
    as pairs; 3, as nibbles over a range) and where that plane's table starts."""
    blob = kernels.compress_planes(t)
    at = 16 + 4  # header, one block length
    for _ in range(t.element_size() - 1):  # raw planes before it
        assert int(blob[at]) == 0
        at += 1 + t.numel()
    assert int(blob[at]) == mode
    return blob, at + 1


def test_a_damaged_huffman_plane_is_refused() -> None:
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(BLOCK, generator=g) * 0.05).bfloat16()
    out = torch.empty_like(t)
    blob, at = _huffman_plane(t, 3)  # exponents: a narrow range of symbols
    assert torch.equal(kernels.decompress_planes(blob, out).view(torch.int16), t.view(torch.int16))
    count = int(blob[at + 1]) + 1
    table = 2 + (count + 1) // 2

    def all_length_one(b: torch.Tensor) -> None:  # three or more codes of one bit
        b[at + 2 : at + table].fill_(0x11)
        if count % 2:
            b[at + table - 1] = 0x01

    assert count >= 3
    for change, problem in (
        (lambda b: b.__setitem__(at + 2, (int(b[at + 2]) & 0xF0) | 12), "bad Huffman table"),
        (lambda b: b.__setitem__(at, 256 - count + 1), "bad Huffman table"),  # past 255
        (lambda b: b[at + 2 : at + table].fill_(0), "bad Huffman table"),  # no symbol
        (all_length_one, "no prefix code"),
        (lambda b: b.__setitem__(at + table, int(b[at + table]) ^ 1), "Huffman stream"),
    ):
        bad = blob.clone()
        change(bad)
        with pytest.raises(IntegrityError, match=problem):
            kernels.decompress_planes(bad, out)
    if count % 2:  # the unused nibble of an odd range must be zero
        bad = blob.clone()
        bad[at + table - 1] |= 0x10
        with pytest.raises(IntegrityError, match="bad Huffman table"):
            kernels.decompress_planes(bad, out)

    pairs = torch.randint(0, 2, (BLOCK,), generator=g, dtype=torch.uint8) * 255  # symbols 0, 255
    blob, at = _huffman_plane(pairs, 2)
    out8 = torch.empty_like(pairs)
    assert torch.equal(kernels.decompress_planes(blob, out8), pairs)
    nsym = int(blob[at]) + 1
    for change, problem in (
        (lambda b: b.__setitem__(at + 2, 12), "bad Huffman table"),  # longer than 11 bits
        (lambda b: b.__setitem__(at + 2, 0), "bad Huffman table"),
        (lambda b: b.__setitem__(at + 3, int(b[at + 1])), "bad Huffman table"),  # a symbol twice
        (
            lambda b: b.__setitem__(at + 1 + 2 * nsym, int(b[at + 1 + 2 * nsym]) ^ 1),
            "Huffman stream",
        ),  # the first stream's length
    ):
        bad = blob.clone()
        change(bad)
        with pytest.raises(IntegrityError, match=problem):
            kernels.decompress_planes(bad, out8)


def _limited_huffman_bits(counts: list[int], limit: int) -> int:
    """The fewest bits a prefix code of codes at most ``limit`` bits long spends on
    ``counts`` (package-merge, written plainly: the reference for the coder's lengths)."""
    leaves = sorted((c, (s,)) for s, c in enumerate(counts) if c)
    items = list(leaves)
    for _ in range(limit - 1):
        packages = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(items[::2], items[1::2])]
        items = sorted(leaves + packages, key=lambda x: x[0])
    lengths = [0] * len(counts)
    for _, symbols in items[: 2 * len(leaves) - 2]:
        for sym in symbols:
            lengths[sym] += 1
    return sum(c * n for c, n in zip(counts, lengths))


def test_huffman_code_lengths_are_the_best_within_eleven_bits() -> None:
    # exponents of weights with a long tail: unlimited Huffman codes would pass 11 bits
    g = torch.Generator().manual_seed(11)
    t = (torch.randn(BLOCK, generator=g) * torch.rand(BLOCK, generator=g).pow(8) * 0.5).bfloat16()
    blob, at = _huffman_plane(t, 3)
    v = t.view(torch.int16).to(torch.int64) & 0xFFFF
    exponents = (((v << 1) | (v >> 15)) >> 8) & 0xFF  # plane 1: the byte above the sign
    counts = torch.bincount(exponents, minlength=256).tolist()
    lo, n = int(blob[at]), int(blob[at + 1]) + 1
    nibbles = blob[at + 2 : at + 2 + (n + 1) // 2].tolist()
    lengths = [0] * 256
    for k in range(n):
        lengths[lo + k] = (nibbles[k // 2] >> (4 * (k % 2))) & 0xF
    assert max(lengths) == 11 and sum(2.0**-n for n in lengths if n) == 1.0
    assert all((c > 0) == (n > 0) for c, n in zip(counts, lengths))
    bits = sum(c * n for c, n in zip(counts, lengths))
    assert bits == _limited_huffman_bits(counts, 11)
    out = torch.empty_like(t)
    assert torch.equal(kernels.decompress_planes(blob, out).view(torch.int16), t.view(torch.int16))
    # and on skewed byte distributions of 2 to 256 symbols (one plane: a 1-byte dtype)
    checked = 0
    for seed in range(40):
        g.manual_seed(seed)
        k = int(torch.randint(2, 257, (1,), generator=g))
        weights = torch.rand(k, generator=g).pow(float(torch.randint(1, 12, (1,), generator=g)))
        data = torch.multinomial(weights + 1e-9, BLOCK, replacement=True, generator=g)
        plane = (data * 7 % 256).to(torch.uint8)  # symbols spread over the byte
        blob = kernels.compress_planes(plane)
        mode, at = int(blob[20]), 21
        if mode not in (2, 3):
            continue
        lengths = [0] * 256
        if mode == 2:
            for j in range(int(blob[at]) + 1):
                lengths[int(blob[at + 1 + 2 * j])] = int(blob[at + 2 + 2 * j])
        else:
            lo, n = int(blob[at]), int(blob[at + 1]) + 1
            for j in range(n):
                lengths[lo + j] = (int(blob[at + 2 + j // 2]) >> (4 * (j % 2))) & 0xF
        counts = torch.bincount(plane.to(torch.int64), minlength=256).tolist()
        assert sum(c * n for c, n in zip(counts, lengths)) == _limited_huffman_bits(counts, 11)
        assert torch.equal(kernels.decompress_planes(blob, torch.empty_like(plane)), plane)
        checked += 1
    assert checked >= 10, checked


def test_headers_of_both_versions_and_every_block_size() -> None:
    """Version 2 says its block size (2^16 to 2^20 elements); version 1 is 2^16 with
    byte 6 zero; anything else is refused."""
    g = torch.Generator().manual_seed(6)
    t = torch.randn(5 * BLOCK + 3, generator=g) * 0.05
    out = torch.empty_like(t)
    for log2 in range(16, 21):
        blob = kernels.compress_planes(t, block_log2=log2)
        assert int(blob[4]) == 2 and int(blob[6]) == log2
        kernels.decompress_planes(blob, out)
        assert torch.equal(out.view(torch.int32), t.view(torch.int32))
    v1 = kernels.compress_planes(t, block_log2=16)
    v1[4] = 1
    v1[6] = 0  # a version-1 stream (its planes as a version-1 writer's, but for mode 3)
    kernels.decompress_planes(v1, out)
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))
    for at, value, problem in ((4, 3, "version 3"), (6, 15, "block size"), (6, 21, "block size"),
                               (7, 1, "block size")):  # fmt: skip
        bad = kernels.compress_planes(t).clone()
        bad[at] = value
        with pytest.raises(IntegrityError, match=problem):
            kernels.decompress_planes(bad, out)
    bad = v1.clone()
    bad[6] = 16
    with pytest.raises(IntegrityError, match="block size"):
        kernels.decompress_planes(bad, out)
    with pytest.raises(InvalidArgumentError, match="block_log2"):
        kernels.compress_planes(t, block_log2=21)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        kernels.decompress_planes(kernels.compress_planes(torch.ones(4)), torch.ones(8)[::2])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 15, 16, 17, 31, 33, 64 + 7, 1000, BLOCK - 1, BLOCK + 13])
def test_huffman_planes_of_every_length_round_trip(n: int) -> None:
    """Planes whose symbols do not fill the four streams' rounds: the tail decoded one
    by one; skewed exponents (one symbol and a rare one too)."""
    g = torch.Generator().manual_seed(n)
    for t in ((torch.randn(n, generator=g) * 0.05).bfloat16(), torch.randn(n, generator=g) * 1e-3,
              torch.full((n,), 0.5).bfloat16()):  # fmt: skip
        blob = kernels.compress_planes(t)
        back = kernels.decompress_planes(blob, torch.empty_like(t))
        assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))
