"""The elementwise GPU kernels (csrc/delta_units.h), run thread by thread on
the CPU by the native emulation with the tables kernels.cuda builds, against the
CPU kernels: planes built in registers, 16-byte accesses and their fallbacks
for unaligned buffers, every tail, quantized stats, escapes compacted in one
scan, and copies with equal and unequal misalignment."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import assert_bit_equal

from mmcore.kernels import _segments, cuda, delta
from mmcore.kernels._segments import QUANT_HEADER, XOR_HEADER, call

CPU = torch.device("cpu")
SIZES = [0, 1, 3, 15, 16, 17, 255, 4095, 4096, 4097, 70_001]


def _at(numel: int, dtype: torch.dtype, shift: int, g: torch.Generator) -> torch.Tensor:
    """A random tensor whose data starts ``shift`` bytes past a 16-byte boundary."""
    size = torch.tensor([], dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size + shift + 16,), dtype=torch.uint8, generator=g)
    start = (-raw.data_ptr()) % 16 + shift
    return raw[start : start + numel * size].view(dtype)


Pairs = tuple[list[torch.Tensor], list[torch.Tensor]]


def _pairs(dtypes: list[torch.dtype], seed: int, shifts: tuple[int, ...] = (0,)) -> Pairs:
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    new, parent = [], []
    for dtype in dtypes:
        for n in SIZES:
            shift = rng.choice(shifts) * torch.tensor([], dtype=dtype).element_size()
            p = _at(n, dtype, shift, g)
            q = _at(n, dtype, shift, g)
            q.view(torch.uint8)[::3] = p.view(torch.uint8)[::3]  # some words unchanged
            if n > 40:
                q[:40] = p[:40]
            new.append(q)
            parent.append(p)
    return new, parent


def _outs(sizes: list[int], offset: int) -> list[torch.Tensor]:
    """uint8 buffers whose payload (from ``offset``) starts on a 16-byte boundary
    plus offset - 16 (so offset 16 is aligned, 17 is not)."""
    out = []
    for n in sizes:
        raw = torch.zeros(n + offset + 32, dtype=torch.uint8)
        start = (-raw.data_ptr()) % 16
        out.append(raw[start : start + offset + n])
    return out


XOR_DTYPES = [torch.uint8, torch.float16, torch.float32, torch.float64, torch.complex64]


@pytest.mark.parametrize("offset", [XOR_HEADER.size, XOR_HEADER.size + 1, XOR_HEADER.size + 4])
@pytest.mark.parametrize("shifts", [(0,), (1, 2, 3)])
def test_xor_planes_encode_and_decode(offset: int, shifts: tuple[int, ...]) -> None:
    new, parent = _pairs(XOR_DTYPES, 1, shifts)
    widths = [delta.plane_width(t.dtype) for t in new]
    nbytes = [t.numel() * t.element_size() for t in new]
    outs = _outs(nbytes, offset)
    args, changed = cuda.xor_encode_args(new, parent, outs, widths, offset, CPU)
    call("emulate_xor_planes_encode", *args)
    want, want_changed = delta.xor_planes_encode(new, parent)
    for got, w in zip(outs, want):
        assert_bit_equal(got[offset:], w[XOR_HEADER.size :])
    assert torch.equal(changed, want_changed)
    decoded = [torch.empty_like(t) for t in parent]
    call(
        "emulate_xor_planes_decode",
        *cuda.xor_decode_args(outs, parent, decoded, widths, offset, CPU),
    )
    for got, t in zip(decoded, new):
        assert_bit_equal(got, t)


FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _quant_pairs(
    seed: int, shifts: tuple[int, ...]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    new, parent = [], []
    for i, dtype in enumerate(FLOATS):
        for n in SIZES:
            shift = shifts[(i + n) % len(shifts)] * torch.tensor([], dtype=dtype).element_size()
            p = _at(n, dtype, shift, g)
            p.copy_(torch.randn(n, generator=g).to(dtype))
            q = _at(n, dtype, shift, g)
            scale = [1e-4, 1e-2, 3.0][n % 3]  # q widths 1, 2 and 4
            q.copy_(
                (p.double() + torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
            )
            if n > 10:
                q[3] = float("nan")  # escapes
                q[7] = float("inf")
                q[9] = -0.0
            new.append(q)
            parent.append(p)
    return new, parent


@pytest.mark.parametrize("shifts", [(0,), (1, 3)])
def test_quantized_plan_write_and_decode(shifts: tuple[int, ...]) -> None:
    tol = 1e-3
    new, parent = _quant_pairs(2, shifts)
    kinds = [_segments.FLOAT_KINDS[t.dtype] for t in new]
    want, stats = delta.quantize_encode(new, parent, tol)

    args, raw, max_bits = cuda.quantize_plan_args(new, parent, kinds, tol, CPU)
    call("emulate_quantize_plan", *args)
    assert torch.equal(raw[:, 0], stats.max_abs_q)
    assert torch.equal(raw[:, 1], stats.escapes)
    assert torch.equal(raw[:, 2], stats.changed)
    assert torch.equal(max_bits.view(torch.float64), stats.max_delta)

    widths = [int(w[2]) for w in want]  # header byte 2: the q width
    for offset in (QUANT_HEADER.size, QUANT_HEADER.size + 1):
        outs = _outs([t.numel() * w for t, w in zip(new, widths)], offset)
        args, flags, flag_base = cuda.quantize_write_args(
            new, parent, kinds, tol, widths, outs, offset, CPU
        )
        call("emulate_quantize_write", *args)
        escapes = cuda.escapes_of(flags, flag_base, [t.numel() for t in new])
        for t, w, got, blob, idx in zip(new, widths, outs, want, escapes):
            n = t.numel() * w
            assert_bit_equal(
                got[offset : offset + n], blob[QUANT_HEADER.size : QUANT_HEADER.size + n]
            )
            idx_off, bits_off, _ = delta._layout(t.numel(), w, idx.numel(), t.element_size())
            assert torch.equal(idx, blob[idx_off:bits_off].clone().view(torch.int64))

        decoded = [torch.empty_like(p) for p in parent]
        args = cuda.quantize_decode_args(
            parent, kinds, [tol] * len(new), widths, outs, decoded, offset, CPU
        )
        call("emulate_quantize_decode", *args)
        for out, t, idx in zip(decoded, new, escapes):
            out.view(-1)[idx] = t.view(-1)[idx]  # the escapes, as the caller writes them
        for got, w in zip(decoded, delta.quantize_decode(want, parent)):
            assert_bit_equal(got, w)


def test_escapes_of_splits_one_scan_per_segment() -> None:
    flags = torch.zeros(48, dtype=torch.uint8)
    flags[[0, 5, 16, 40, 47]] = 1
    got = cuda.escapes_of(flags, [0, 16, 32, 48], [7, 3, 16])
    assert [g.tolist() for g in got] == [[0, 5], [0], [8, 15]]


@pytest.mark.parametrize("kernel", ["gather", "scatter"])
def test_copies(kernel: str) -> None:
    rng = random.Random(3)
    g = torch.Generator().manual_seed(3)
    lengths = [0, 1, 15, 16, 17, 100, 16383, 16384, 16385, 70_000] * 3
    segments = [_at(n, torch.uint8, rng.randrange(16), g) for n in lengths]
    offsets, at = [], 0
    for n in lengths:
        at += rng.randrange(16)  # equal and unequal misalignment against the sources
        offsets.append(at)
        at += n
    raw = torch.zeros(at + 32, dtype=torch.uint8)
    buf = raw[(-raw.data_ptr()) % 16 :][:at]
    if kernel == "gather":
        call("emulate_gather", *cuda.copy_args(buf, segments, offsets, CPU))
        for s, o in zip(segments, offsets):
            assert_bit_equal(buf[o : o + s.numel()], s)
    else:
        buf.copy_(torch.randint(0, 256, (at,), dtype=torch.uint8, generator=g))
        dsts = segments  # at their own misalignments
        for d in dsts:
            d.zero_()
        call("emulate_scatter", *cuda.copy_args(buf, dsts, offsets, CPU))
        for d, o in zip(dsts, offsets):
            assert_bit_equal(d, buf[o : o + d.numel()])
