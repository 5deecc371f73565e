"""Pure implementations used as test oracles (and nowhere on a hot path)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, in row-major order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return bytes(flat.view(torch.uint8).tolist())


def blake3_digests(chunks: Sequence[bytes]) -> list[bytes]:
    """BLAKE3-256 by the ``blake3`` package (the reference implementation's bindings)."""
    import blake3  # test dependency

    return [blake3.blake3(c).digest() for c in chunks]


def gather(tensors: Sequence[torch.Tensor]) -> bytes:
    return b"".join(tensor_bytes(t) for t in tensors)


# ---- delta encodings (pure torch, any device) -------------------------------------

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_KINDS = {torch.float16: (5, 10), torch.bfloat16: (8, 7)}


def _words(t: torch.Tensor, width: int) -> torch.Tensor:
    """The tensor's bytes as rows of ``width`` bytes (one row per plane word)."""
    flat = t.detach().reshape(-1)
    raw = (
        flat.view(torch.uint8)
        if flat.numel()
        else torch.empty(0, dtype=torch.uint8, device=t.device)
    )
    return raw.reshape(-1, width)


def xor_planes_encode(new: torch.Tensor, parent: torch.Tensor) -> tuple[torch.Tensor, int]:
    width = new.element_size() // (2 if new.dtype.is_complex else 1)
    x = torch.bitwise_xor(_words(new, width), _words(parent, width))
    changed = int((x != 0).any(dim=1).sum())
    return x.t().contiguous().reshape(-1), changed


def xor_planes_decode(planes: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    width = parent.element_size() // (2 if parent.dtype.is_complex else 1)
    words = _words(parent, width)
    x = planes.reshape(width, -1).t()
    out = torch.bitwise_xor(x, words).contiguous().reshape(-1)
    return (
        out.view(parent.dtype).reshape(parent.shape) if parent.numel() else torch.empty_like(parent)
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    return flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64) & (
        (1 << (8 * flat.element_size())) - 1
    )


def to_double(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).to(torch.float64)  # exact for every float dtype


def round_small_float(v: torch.Tensor, exp_bits: int, mant_bits: int) -> torch.Tensor:
    """float64 -> float16/bfloat16 bit patterns, round to nearest even, in one rounding."""
    b = v.view(torch.int64)
    sign = ((b >> 63) & 1) << (exp_bits + mant_bits)
    exp = (b >> 52) & 0x7FF
    sig = (b & ((1 << 52) - 1)) | (1 << 52)
    bias = (1 << (exp_bits - 1)) - 1
    e = exp - 1023
    sub = e < 1 - bias
    shift = (52 - mant_bits) + torch.clamp((1 - bias) - e, min=0)
    zero = (exp == 0) | (shift > 54)
    shift = torch.clamp(shift, max=54)
    rounded = sig >> shift
    rem = sig & ((torch.ones_like(shift) << shift) - 1)
    half = torch.ones_like(shift) << (shift - 1)
    up = (rem > half) | ((rem == half) & ((rounded & 1) == 1))
    rounded = rounded + up.to(torch.int64)
    carry = (~sub) & ((rounded >> (mant_bits + 1)) != 0)
    rounded = torch.where(carry, rounded >> 1, rounded)
    e = e + carry.to(torch.int64)
    normal = ((e + bias) << mant_bits) | (rounded & ((1 << mant_bits) - 1))
    out = torch.where(sub, rounded, normal)
    out = torch.where(
        (~sub) & (e > bias), torch.full_like(out, ((1 << exp_bits) - 1) << mant_bits), out
    )
    out = torch.where(zero, torch.zeros_like(out), out)
    return out | sign


def from_double(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded to ``dtype``, as a tensor of that dtype."""
    if dtype in _KINDS:
        bits = round_small_float(v, *_KINDS[dtype]).to(torch.int16)
        return bits.view(dtype)
    return v.to(dtype)


def within(a: torch.Tensor, b: torch.Tensor, tol: float) -> torch.Tensor:
    """Exactly |a - b| <= tol, elementwise (TwoSum recovers the rounding error)."""
    s = a - b
    bv = s - a
    av = s - bv
    err = (a - av) + (-b - bv)
    mag = s.abs()
    on_edge = (mag == tol) & ((err == 0) | ((err < 0) != (s < 0)))
    return (mag < tol) | on_edge


def quantize(
    new: torch.Tensor, parent: torch.Tensor, tol: float
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, float]]:
    """q, the escape mask, and (max |q|, escapes, changed, max finite |new - parent|)."""
    step = 2.0 * tol
    x, p = to_double(new), to_double(parent)
    finite = torch.isfinite(x) & torch.isfinite(p)
    qd = torch.round((x - p) / step)
    ok = finite & (qd.abs() <= 2147483647.0)
    qi = torch.where(ok, qd, torch.zeros_like(qd)).to(torch.int64)
    rec_t = from_double(p + qi.to(torch.float64) * step, new.dtype)
    rec = to_double(rec_t)
    ok = ok & torch.isfinite(rec) & within(rec, x, tol)
    ok = ok & ((x != 0) | (_bits(rec_t) == _bits(new)).reshape(x.shape))  # a zero keeps its sign
    q = torch.where(ok, qi, torch.zeros_like(qi))
    changed = int((_bits(new) != _bits(parent)).sum())
    deltas = (x - p).abs()[finite]
    max_delta = float(deltas.max()) if deltas.numel() else 0.0
    max_q = int(q.abs().max()) if q.numel() else 0
    return q, ~ok, (max_q, int((~ok).sum()), changed, max_delta)


def dequantize(parent: torch.Tensor, q: torch.Tensor, tol: float) -> torch.Tensor:
    rec = to_double(parent) + q.to(torch.float64) * (2.0 * tol)
    return from_double(rec, parent.dtype).reshape(parent.shape)


def dequantize_blob(blob: torch.Tensor, parent: torch.Tensor, width: int, tol: float, escapes: int,
                    header: int, layout: Any) -> torch.Tensor:  # fmt: skip
    """Decodes one framed quantized segment (see docs/FORMAT.md) with torch ops."""
    blob = blob.to(parent.device)
    idx_off, bits_off, total = layout(parent.numel(), width, escapes, parent.element_size())
    qt = {1: torch.int8, 2: torch.int16, 4: torch.int32}[width]
    q = blob[header : header + parent.numel() * width].view(qt).to(torch.int64)
    out = dequantize(parent, q, tol).reshape(-1).clone()
    if escapes:
        idx = blob[idx_off:bits_off].view(torch.int64)
        out[idx] = blob[bits_off:total].view(parent.dtype)
    return out.reshape(parent.shape)
