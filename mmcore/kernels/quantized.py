"""The ``quantized`` encoding: error-bounded uniform quantization against the
parent as recovered (closed loop), with exact escapes. See docs/FORMAT.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError
from . import cuda, int64_table, reference, tensor_bytes
from ._segments import (
    ENCODING_VERSION,
    FLOAT_KINDS,
    QUANT_HEADER,
    QUANTIZED,
    call,
    check_decode,
    check_pairs,
    f64,
    framed_buffers,
    gather_headers,
    header_bytes,
    i32,
    native_cpu,
    native_cuda,
    outputs_like,
    ptrs,
)


@dataclass
class QuantStats:
    """Per segment: largest |q|, escapes, changed elements, largest finite |new - parent|."""

    max_abs_q: torch.Tensor
    escapes: torch.Tensor
    changed: torch.Tensor
    max_delta: torch.Tensor


def _qwidth(max_abs_q: int) -> int:
    return 1 if max_abs_q <= 127 else 2 if max_abs_q <= 32767 else 4


def _align8(n: int) -> int:
    return -(-n // 8) * 8


def _layout(numel: int, qwidth: int, escapes: int, itemsize: int) -> tuple[int, int, int]:
    """Byte offsets of the escape indices and escape values, and the total size."""
    idx = QUANT_HEADER.size + _align8(numel * qwidth)
    bits = idx + 8 * escapes
    return idx, bits, bits + escapes * itemsize


def check_tolerance(tolerance: float) -> float:
    tol = float(tolerance)
    if not (math.isfinite(tol) and tol > 0 and math.isfinite(2 * tol)):
        raise InvalidArgumentError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    return tol


def _check_float(dtype: torch.dtype, i: int) -> int:
    try:
        return FLOAT_KINDS[dtype]
    except KeyError:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_KINDS)
        raise InvalidArgumentError(
            f"segment {i}: quantized encoding needs one of {names}, got {dtype}"
        ) from None


def quantize_encode(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor],
                    tolerance: float) -> tuple[list[torch.Tensor], QuantStats]:  # fmt: skip
    """Encodes each new tensor against the parent *as recovered* (closed loop), so
    that every decoded element is within ``tolerance`` of the new one."""
    device = check_pairs(new, parent)
    tol = check_tolerance(tolerance)
    kinds = [_check_float(t.dtype, i) for i, t in enumerate(new)]
    n = len(new)
    if native_cuda(device) and n:
        return _quantize_encode_cuda(new, parent, kinds, tol)
    if not native_cpu(device):
        ref_blobs, stats = [], []
        for a, b, kind in zip(new, parent, kinds):
            q, escaped, st = reference.quantize(a, b, tol)
            blob, _ = _frame(q, escaped, a, kind, tol, st[0])
            ref_blobs.append(blob.to(device))
            stats.append(st)
        cols = list(zip(*stats)) if stats else [(), (), (), ()]
        return ref_blobs, QuantStats(
            *(
                torch.tensor(c, dtype=torch.float64 if j == 3 else torch.int64)
                for j, c in enumerate(cols)
            )
        )
    numels = int64_table([t.numel() for t in new])
    kinds_t = torch.tensor(kinds, dtype=torch.int32)
    tols = torch.full((n,), tol, dtype=torch.float64)
    raw = torch.zeros((n, 4), dtype=torch.int64)
    max_delta = torch.zeros(n, dtype=torch.float64)
    news, parents = ptrs(new), ptrs(parent)
    if n:
        call("quantize_plan", news, parents, numels, kinds_t, tols, n, raw, max_delta)
    widths = [_qwidth(int(m)) for m in raw[:, 0].tolist()]
    escapes = raw[:, 1].tolist()
    blobs: list[torch.Tensor] = []
    if n:
        offs = [_layout(t.numel(), w, e, t.element_size()) for t, w, e in zip(new, widths, escapes)]
        headers = [
            QUANT_HEADER.pack(ENCODING_VERSION, QUANTIZED, w, k, 0, tol, t.numel(), e)
            for t, k, w, e in zip(new, kinds, widths, escapes)
        ]
        blobs = framed_buffers(headers, [o[2] for o in offs], zeroed=True)  # zero: q padding
        call(
            "quantize_write", news, parents, numels, kinds_t, tols, i32(widths),
            int64_table([b.data_ptr() + QUANT_HEADER.size for b in blobs]),
            int64_table([b.data_ptr() + o[0] for b, o in zip(blobs, offs)]),
            int64_table([b.data_ptr() + o[1] for b, o in zip(blobs, offs)]), n,
        )  # fmt: skip
    return blobs, QuantStats(raw[:, 0].clone(), raw[:, 1].clone(), raw[:, 2].clone(), max_delta)


def quantize_encode_table(new_ptrs: torch.Tensor, parent_ptrs: torch.Tensor, numel: torch.Tensor,
                          kinds: torch.Tensor, itemsize: torch.Tensor,
                          tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``quantize_encode`` of n CPU segments given by address: every encoding framed in
    one buffer, encoding i at ``buf[offsets[i] : offsets[i + 1]]``, back to back (the
    bytes ``quantize_encode`` gives). Two native calls (plan, write);
    sizes and headers are computed as columns, with no step per segment.

    ``new_ptrs``, ``parent_ptrs``: addresses of ``numel[i]`` elements of float kind
    ``kinds[i]`` (``FLOAT_KINDS``' values), ``itemsize[i]`` bytes each; every table a
    contiguous int64 CPU tensor of shape (n,). The caller keeps every addressed byte
    alive for the call. Returns (buf, offsets)."""
    from . import gather
    from .xor_planes import _check_table

    tol = check_tolerance(tolerance)
    n = new_ptrs.numel() if isinstance(new_ptrs, torch.Tensor) else -1
    for name, t in (("new_ptrs", new_ptrs), ("parent_ptrs", parent_ptrs), ("numel", numel),
                    ("kinds", kinds), ("itemsize", itemsize)):  # fmt: skip
        _check_table(name, t, max(n, 0))
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    if n == 0:
        return torch.empty(0, dtype=torch.uint8), offsets
    sizes = torch.tensor([2, 2, 4, 8], dtype=torch.int64)
    if not bool(((kinds >= 1) & (kinds <= 4)).all()) or not torch.equal(itemsize, sizes[kinds - 1]):
        raise InvalidArgumentError("kinds must be FLOAT_KINDS values, itemsize their element sizes")
    if int(numel.min()) < 0:
        raise InvalidArgumentError("numel must not be negative")
    if bool((((new_ptrs == 0) | (parent_ptrs == 0)) & (numel > 0)).any()):
        raise InvalidArgumentError("a segment with elements has a null address")
    kinds32 = kinds.to(torch.int32)
    tols = torch.full((n,), tol, dtype=torch.float64)
    stats = torch.zeros((n, 4), dtype=torch.int64)
    max_delta = torch.zeros(n, dtype=torch.float64)
    call("quantize_plan", new_ptrs, parent_ptrs, numel, kinds32, tols, n, stats, max_delta)
    max_q, escapes = stats[:, 0], stats[:, 1]
    width = torch.where(max_q <= 127, 1, torch.where(max_q <= 32767, 2, 4)).to(torch.int64)
    head = QUANT_HEADER.size
    index_at = head + (numel * width + 7) // 8 * 8
    bits_at = index_at + 8 * escapes
    torch.cumsum(bits_at + escapes * itemsize, 0, out=offsets[1:])
    buf = torch.zeros(int(offsets[-1]), dtype=torch.uint8)  # zeros: the padding of q
    fields = torch.empty((n, 4), dtype=torch.int64)  # QUANT_HEADER as four u64, per segment
    fields[:, 0] = ENCODING_VERSION | QUANTIZED << 8 | width << 16 | kinds << 24
    fields[:, 1] = tols.view(torch.int64)
    fields[:, 2] = numel
    fields[:, 3] = escapes
    heads = fields.view(torch.uint8)
    starts = offsets[:-1]
    head_ptrs = torch.arange(n, dtype=torch.int64).mul_(head).add_(heads.data_ptr())
    gather(buf, head_ptrs, torch.full((n,), head, dtype=torch.int64), starts.contiguous())
    at = starts + buf.data_ptr()
    call("quantize_write", new_ptrs, parent_ptrs, numel, kinds32, tols, width.to(torch.int32),
         at + head, at + index_at, at + bits_at, n)  # fmt: skip
    return buf, offsets


def _frame(q: torch.Tensor, escaped: torch.Tensor, new: torch.Tensor, kind: int, tol: float,
           max_abs_q: int) -> tuple[torch.Tensor, int]:  # fmt: skip
    """The byte layout of one quantized segment from reference results (CPU)."""
    width = _qwidth(max_abs_q)
    idx = escaped.reshape(-1).nonzero().reshape(-1).cpu()
    esc = idx.numel()
    idx_off, bits_off, total = _layout(new.numel(), width, esc, new.element_size())
    blob = torch.zeros(total, dtype=torch.uint8)
    head = QUANT_HEADER.pack(ENCODING_VERSION, QUANTIZED, width, kind, 0, tol, new.numel(), esc)
    blob[: QUANT_HEADER.size] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    qt = {1: torch.int8, 2: torch.int16, 4: torch.int32}[width]
    qbytes = q.reshape(-1).cpu().to(qt).view(torch.uint8)
    blob[QUANT_HEADER.size : QUANT_HEADER.size + qbytes.numel()] = qbytes
    blob[idx_off:bits_off] = idx.to(torch.int64).view(torch.uint8)
    flat = new.detach().reshape(-1).cpu()
    blob[bits_off:total] = flat[idx].contiguous().view(torch.uint8)
    return blob, esc


def _headers(
    encoded: Sequence[torch.Tensor],
) -> list[tuple[int, int, int, int, int, float, int, int]]:
    """Every encoding's header fields: read by one native gather (CPU) or one launch
    and one copy back (all on one GPU the kernels run on), else one by one."""
    for i, blob in enumerate(encoded):
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() < QUANT_HEADER.size:
            raise InvalidArgumentError(
                f"segment {i}: not a quantized encoding (too short or not uint8)"
            )
    device = encoded[0].device
    together = native_cpu(device) or native_cuda(device)
    if not together or not all(b.device == device and b.is_contiguous() for b in encoded):
        return [QUANT_HEADER.unpack(bytes(b[: QUANT_HEADER.size].cpu().tolist())) for b in encoded]
    heads = gather_headers(encoded, QUANT_HEADER.size)
    return list(QUANT_HEADER.iter_unpack(tensor_bytes(heads)))


def _parse_quant(
    blob: torch.Tensor,
    parent: torch.Tensor,
    i: int,
    header: tuple[int, int, int, int, int, float, int, int],
) -> tuple[int, int, float, int, int, int]:
    """Checks one header against its parent; returns (qwidth, kind, tolerance,
    escapes, escape-index offset, escape-bits offset)."""
    version, encoding, width, kind, _, tol, numel, esc = header
    if version != ENCODING_VERSION or encoding != QUANTIZED or width not in (1, 2, 4):
        raise InvalidArgumentError(
            f"segment {i}: encoding version {version}, id {encoding} is not quantized v1"
        )
    if kind != FLOAT_KINDS.get(parent.dtype) or numel != parent.numel():
        raise InvalidArgumentError(
            f"segment {i}: encoding is for {numel} elements of kind {kind}; parent does not match"
        )
    idx_off, bits_off, total = _layout(numel, width, esc, parent.element_size())
    if blob.numel() != total:
        raise InvalidArgumentError(
            f"segment {i}: encoding has {blob.numel()} bytes, its header says otherwise"
        )
    return width, kind, tol, esc, idx_off, bits_off


def quantize_decode(
    encoded: Sequence[torch.Tensor], parent: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Recovers each tensor: parent + q * 2 * tolerance, then the exact escapes.
    Encodings and parents must be on one device."""
    device = check_decode(encoded, parent)
    heads = _headers(encoded) if encoded else []
    meta = [_parse_quant(e, p, i, h) for i, (e, p, h) in enumerate(zip(encoded, parent, heads))]
    outs = outputs_like(parent, device)
    if native_cuda(device):
        cuda.quantize_decode(parent, [m[1] for m in meta], [m[2] for m in meta], [m[0] for m in meta],
                             encoded, outs, offset=QUANT_HEADER.size)  # fmt: skip
        for (_, _, _, esc, idx_off, bits_off), e, p, out in zip(meta, encoded, parent, outs):
            if esc:
                out.view(-1)[e[idx_off:bits_off].view(torch.int64)] = e[bits_off:].view(p.dtype)
        return outs
    if not native_cpu(device):
        for i, ((width, _, tol, esc, _, _), e, p) in enumerate(zip(meta, encoded, parent)):
            outs[i] = reference.dequantize_blob(e, p, width, tol, esc, QUANT_HEADER.size, _layout)
        return outs
    n = len(parent)
    if n:
        call(
            "quantize_decode", ptrs(parent), int64_table([p.numel() for p in parent]), i32([m[1] for m in meta]),
            f64([m[2] for m in meta]), i32([m[0] for m in meta]),
            int64_table([e.data_ptr() + QUANT_HEADER.size for e in encoded]), int64_table([m[3] for m in meta]),
            int64_table([e.data_ptr() + m[4] for e, m in zip(encoded, meta)]),
            int64_table([e.data_ptr() + m[5] for e, m in zip(encoded, meta)]), ptrs(outs), n,
        )  # fmt: skip
    return outs


def quantize_decode_table(src: torch.Tensor, length: torch.Tensor, parents: torch.Tensor,
                          outs: torch.Tensor, kinds: torch.Tensor, itemsize: torch.Tensor,
                          numel: torch.Tensor) -> int | None:  # fmt: skip
    """Decodes k quantized encodings on the CPU by one native call over address tables
    (int64, shape (k,) each): encoding ``j`` at ``src[j]`` (``length[j]`` bytes) of a
    tensor of float kind ``kinds[j]`` (0: not a float, refused), ``numel[j]`` elements
    of ``itemsize[j]`` bytes, against ``parents[j]`` into ``outs[j]``. Headers are read
    by one gather and checked as columns before any byte is written. Returns the index
    of the first encoding that does not fit, or None."""
    from . import gather

    k, head = src.numel(), QUANT_HEADER.size
    short = (length < head) | (kinds == 0)
    if bool(short.any()):
        return int(short.nonzero()[0, 0])
    heads = torch.empty((k, head), dtype=torch.uint8)
    gather(heads, src.contiguous(), torch.full((k,), head, dtype=torch.int64),
           torch.arange(k, dtype=torch.int64) * head)  # fmt: skip
    width = heads[:, 2].to(torch.int64)
    tol = heads[:, 8:16].contiguous().view(torch.float64).reshape(k)
    count = heads[:, 16:24].contiguous().view(torch.int64).reshape(k)
    escapes = heads[:, 24:32].contiguous().view(torch.int64).reshape(k)
    index_at = head + (count * width + 7) // 8 * 8
    bits_at = index_at + 8 * escapes
    bad = (heads[:, 0] != ENCODING_VERSION) | (heads[:, 1] != QUANTIZED)
    bad |= (width != 1) & (width != 2) & (width != 4)
    bad |= (heads[:, 3].to(torch.int64) != kinds) | (count != numel)
    bad |= (escapes < 0) | (escapes > numel) | (bits_at + escapes * itemsize != length)
    if bool(bad.any()):
        return int(bad.nonzero()[0, 0])
    if k:
        call("quantize_decode", parents.contiguous(), numel.contiguous(), kinds.to(torch.int32),
             tol.contiguous(), width.to(torch.int32), (src + head).contiguous(), escapes.contiguous(),
             (src + index_at).contiguous(), (src + bits_at).contiguous(), outs.contiguous(), k)  # fmt: skip
    return None


def _quantize_encode_cuda(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], kinds: list[int],
                          tol: float) -> tuple[list[torch.Tensor], QuantStats]:  # fmt: skip
    device = new[0].device
    raw, max_delta = cuda.quantize_plan(new, parent, kinds, tol)  # host copies: widths decide sizes
    widths = [_qwidth(int(m)) for m in raw[:, 0].tolist()]
    escapes = raw[:, 1].tolist()
    blobs = []
    for t, kind, width, esc in zip(new, kinds, widths, escapes):
        blob = torch.zeros(
            _layout(t.numel(), width, esc, t.element_size())[2], dtype=torch.uint8, device=device
        )
        head = QUANT_HEADER.pack(ENCODING_VERSION, QUANTIZED, width, kind, 0, tol, t.numel(), esc)
        blob[: QUANT_HEADER.size] = header_bytes(head, device)
        blobs.append(blob)
    indices = cuda.quantize_write(new, parent, kinds, tol, widths, blobs, offset=QUANT_HEADER.size)
    for t, width, esc, blob, idx in zip(new, widths, escapes, blobs, indices):
        if esc:
            idx_off, bits_off, total = _layout(t.numel(), width, esc, t.element_size())
            blob[idx_off:bits_off] = idx.view(torch.uint8)
            blob[bits_off:total] = t.reshape(-1)[idx].contiguous().view(torch.uint8)
    return blobs, QuantStats(raw[:, 0].clone(), raw[:, 1].clone(), raw[:, 2].clone(), max_delta)
