"""The ``xor-planes`` encoding: XOR with the parent, bytes regrouped into planes
(byte 0 of every word, then byte 1, ...). Exact; see docs/FORMAT.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError
from . import blake3_tensors, cuda, int64_table, reference
from ._segments import (
    ENCODING_VERSION,
    XOR_HEADER,
    XOR_PLANES,
    call,
    check_decode,
    check_pairs,
    gather_headers,
    header_bytes,
    i32,
    native_cpu,
    native_cuda,
    outputs_like,
    plane_width,
    ptrs,
)


def xor_planes_encode(
    new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encodes each pair; returns the framed encodings (uint8) and the count of changed words.

    On the CPU the encodings are views of one buffer (one allocation per call).
    """
    outs, changed, _ = _encode(new, parent, hashed=False)
    return outs, changed


def xor_planes_encode_hashed(
    new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``xor_planes_encode`` plus the BLAKE3 of every new tensor ((n, 32) uint8).

    On the CPU this is one fused pass: each 1 KiB chunk is hashed and encoded
    while it is in cache, so the new bytes are read from memory once. On a GPU
    too: BLAKE3's first stage writes the planes of the 16 bytes it has just
    read. The pure-torch reference runs the two apart, with the same results.
    """
    return _encode(new, parent, hashed=True)


def _encode(
    new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], *, hashed: bool
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    device = check_pairs(new, parent)
    n = len(new)
    widths = [plane_width(t.dtype) for t in new]
    nbytes = [t.numel() * t.element_size() for t in new]
    no_hashes = torch.empty((0, 32), dtype=torch.uint8)
    if native_cpu(device):
        if not n:
            return [], torch.zeros(0, dtype=torch.int64), no_hashes
        table = xor_planes_encode_table(ptrs(new), ptrs(parent), int64_table(nbytes),
                                        int64_table(widths), hashed=hashed)  # fmt: skip
        return list(table.views()), table.changed, table.hashes
    headers = [
        XOR_HEADER.pack(ENCODING_VERSION, XOR_PLANES, w, 0, 0, nb) for w, nb in zip(widths, nbytes)
    ]
    outs = [torch.empty(XOR_HEADER.size + nb, dtype=torch.uint8, device=device) for nb in nbytes]
    if native_cuda(device):
        for out, head in zip(outs, headers):
            out[: XOR_HEADER.size] = header_bytes(head, device)
        if hashed:  # one read of each tensor for both
            changed, hashes = cuda.xor_planes_encode_hashed(
                new, parent, outs, widths, offset=XOR_HEADER.size
            )
            return outs, changed, hashes
        changed = cuda.xor_planes_encode(new, parent, outs, widths, offset=XOR_HEADER.size)
        return outs, changed, no_hashes
    changed = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        planes, changed[i] = reference.xor_planes_encode(new[i], parent[i])
        outs[i][XOR_HEADER.size :] = planes
        outs[i][: XOR_HEADER.size] = torch.frombuffer(bytearray(headers[i]), dtype=torch.uint8)
    return outs, changed, blake3_tensors(new) if hashed else no_hashes


@dataclass
class EncodedTable:
    """Framed encodings of a whole table in one buffer: encoding i is
    ``buf[offsets[i] : offsets[i + 1]]`` (header, then planes)."""

    buf: torch.Tensor  # uint8
    offsets: torch.Tensor  # (n + 1,) int64
    changed: torch.Tensor  # (n,) int64: words that differ from the parent
    hashes: torch.Tensor  # (n, 32) uint8 BLAKE3 of each new segment, or (0, 32) when not asked

    def views(self) -> tuple[torch.Tensor, ...]:
        return torch.split(self.buf, (self.offsets[1:] - self.offsets[:-1]).tolist())


def _check_table(name: str, t: torch.Tensor, n: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (n,):
        raise InvalidArgumentError(f"{name} must be an int64 tensor of shape ({n},)")
    if t.device.type != "cpu" or not t.is_contiguous():
        raise InvalidArgumentError(f"{name} must be a contiguous CPU tensor")


def xor_planes_encode_table(
    new_ptrs: torch.Tensor,
    parent_ptrs: torch.Tensor,
    nbytes: torch.Tensor,
    widths: torch.Tensor,
    *,
    hashed: bool = False,
    out: torch.Tensor | None = None,
) -> EncodedTable:
    """Encodes n (new, parent) segments given by address: one buffer for every
    framed encoding, the headers built vectorised and gathered by one native call,
    the planes (and, with ``hashed``, the BLAKE3 of each new segment, fused) by one
    more. Nothing here touches a tensor object per segment, so a save that already
    holds its address tables encodes at the kernel's rate.

    ``new_ptrs``, ``parent_ptrs``, ``nbytes``, ``widths``: CPU int64 tensors of one
    shape (n,); ``widths`` is each segment's plane width (1, 2, 4 or 8, dividing
    its bytes). The caller keeps every addressed byte alive for the call.
    ``out``: a contiguous CPU uint8 buffer to write into (at least the table's
    bytes: ``nbytes.sum() + 16 * n``), reused across calls to spare the allocation
    and the first-touch page faults; ``buf`` (and every view of it) is then its
    leading part, overwritten by the next call given the same ``out``. ``out`` must
    not overlap the segments read.
    """
    from . import gather

    n = new_ptrs.numel() if isinstance(new_ptrs, torch.Tensor) else -1
    for name, t in (("new_ptrs", new_ptrs), ("parent_ptrs", parent_ptrs), ("nbytes", nbytes),
                    ("widths", widths)):  # fmt: skip
        _check_table(name, t, max(n, 0))
    if n and int(nbytes.min()) < 0:
        raise InvalidArgumentError("nbytes must not be negative")
    if n and bool((((new_ptrs == 0) | (parent_ptrs == 0)) & (nbytes > 0)).any()):
        raise InvalidArgumentError("a segment with bytes has a null address")
    if n and not bool(((widths == 1) | (widths == 2) | (widths == 4) | (widths == 8)).all()):
        raise InvalidArgumentError("widths must be 1, 2, 4 or 8")
    if n and bool((nbytes % widths).any()):
        i = int((nbytes % widths).nonzero()[0, 0])
        raise InvalidArgumentError(
            f"segment {i}: {int(nbytes[i])} bytes is not a whole number of {int(widths[i])}-byte words"
        )
    size = XOR_HEADER.size
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(nbytes + size, 0, out=offsets[1:])
    total = int(offsets[-1])
    if out is None:
        buf = torch.empty(total, dtype=torch.uint8)
    elif (
        not isinstance(out, torch.Tensor)
        or out.dtype != torch.uint8
        or out.device.type != "cpu"
        or not out.is_contiguous()
        or out.numel() < total
    ):
        raise InvalidArgumentError(
            f"out must be a contiguous CPU uint8 tensor of at least {total} bytes"
        )
    else:
        buf = out.view(-1)[:total]
    changed = torch.zeros(n, dtype=torch.int64)
    hashes = torch.empty((n if hashed else 0, 32), dtype=torch.uint8)
    if n == 0:
        return EncodedTable(buf, offsets, changed, hashes)
    heads = torch.zeros((n, size), dtype=torch.uint8)  # XOR_HEADER, one row per segment
    heads[:, 0] = ENCODING_VERSION
    heads[:, 1] = XOR_PLANES
    heads[:, 2] = widths.to(torch.uint8)
    heads[:, 8:16] = nbytes.view(torch.uint8).view(n, 8)
    starts = offsets[:-1]
    head_ptrs = torch.arange(n, dtype=torch.int64).mul_(size).add_(heads.data_ptr())
    gather(buf, head_ptrs, torch.full((n,), size, dtype=torch.int64), starts.contiguous())
    planes = starts + (buf.data_ptr() + size)
    args = (new_ptrs, parent_ptrs, nbytes, widths.to(torch.int32), planes, changed)
    if hashed:
        call("xor_planes_encode_hashed", *args, hashes, n)
    else:
        call("xor_planes_encode", *args, n)
    return EncodedTable(buf, offsets, changed, hashes)


def _parse_xor(enc: torch.Tensor, parent: torch.Tensor, i: int) -> None:
    if enc.dtype != torch.uint8 or enc.dim() != 1 or enc.numel() < XOR_HEADER.size:
        raise InvalidArgumentError(
            f"segment {i}: not an xor-planes encoding (too short or not uint8)"
        )
    version, encoding, width, _, _, nbytes = XOR_HEADER.unpack(
        bytes(enc[: XOR_HEADER.size].cpu().tolist())
    )
    if version != ENCODING_VERSION or encoding != XOR_PLANES:
        raise InvalidArgumentError(
            f"segment {i}: encoding version {version}, id {encoding} is not xor-planes v1"
        )
    if nbytes != parent.numel() * parent.element_size() or width != plane_width(parent.dtype):
        raise InvalidArgumentError(
            f"segment {i}: encoding is for {nbytes} bytes, width {width}; parent does not match"
        )
    if enc.numel() != XOR_HEADER.size + nbytes:
        raise InvalidArgumentError(
            f"segment {i}: encoding has {enc.numel()} bytes, expected {XOR_HEADER.size + nbytes}"
        )


def _check_headers(encoded: Sequence[torch.Tensor], parent: Sequence[torch.Tensor]) -> None:
    """All headers checked at once (one native gather, or one launch and one copy back
    on a GPU); the first bad one is re-parsed alone for its precise message. The
    encodings are contiguous and on their parents' device (``check_decode``)."""
    for i, e in enumerate(encoded):
        if e.dtype != torch.uint8 or e.dim() != 1 or e.numel() < XOR_HEADER.size:
            _parse_xor(e, parent[i], i)
            raise InvalidArgumentError(f"segment {i}: not a contiguous uint8 encoding")
    heads = gather_headers(encoded, XOR_HEADER.size)
    nbytes = int64_table([p.numel() * p.element_size() for p in parent])
    ok = (heads[:, 0] == ENCODING_VERSION) & (heads[:, 1] == XOR_PLANES)
    ok &= heads[:, 2].to(torch.int64) == int64_table([plane_width(p.dtype) for p in parent])
    ok &= heads[:, 8:16].contiguous().view(torch.int64).reshape(-1) == nbytes
    ok &= int64_table([e.numel() for e in encoded]) == nbytes + XOR_HEADER.size
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        _parse_xor(encoded[i], parent[i], i)


def xor_planes_decode(
    encoded: Sequence[torch.Tensor], parent: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Recovers each new tensor exactly from its encoding and its parent (both on one device)."""
    device = check_decode(encoded, parent)
    if (native_cpu(device) or native_cuda(device)) and len(parent):
        _check_headers(encoded, parent)
    else:
        for i, (e, p) in enumerate(zip(encoded, parent)):
            _parse_xor(e, p, i)
    outs = outputs_like(parent, device)
    if native_cuda(device):
        widths = [plane_width(p.dtype) for p in parent]
        cuda.xor_planes_decode(encoded, parent, outs, widths, offset=XOR_HEADER.size)
        return outs
    if not native_cpu(device):
        for i, (e, p) in enumerate(zip(encoded, parent)):
            outs[i] = reference.xor_planes_decode(e[XOR_HEADER.size :], p)
        return outs
    n = len(parent)
    if n:
        call(
            "xor_planes_decode", int64_table([e.data_ptr() + XOR_HEADER.size for e in encoded]), ptrs(parent),
            int64_table([p.numel() * p.element_size() for p in parent]), i32([plane_width(p.dtype) for p in parent]),
            ptrs(outs), n,
        )  # fmt: skip
    return outs


def xor_planes_decode_table(
    enc: torch.Tensor, enc_lens: torch.Tensor, parents: torch.Tensor, outs: torch.Tensor,
    nbytes: torch.Tensor, widths: torch.Tensor,
) -> None:  # fmt: skip
    """Decodes n framed encodings given by address (CPU int64 tables, one row per
    segment) into memory at ``outs``: the whole table in one native call, headers
    checked vectorised. The caller keeps every addressed buffer alive and in bounds;
    a header that does not match raises InvalidArgumentError naming the segment."""
    n = enc.numel()
    if n == 0:
        return
    from . import gather

    size = XOR_HEADER.size
    heads = torch.empty((n, size), dtype=torch.uint8)
    gather(
        heads,
        enc,
        torch.full((n,), size, dtype=torch.int64),
        torch.arange(n, dtype=torch.int64) * size,
    )
    ok = (heads[:, 0] == ENCODING_VERSION) & (heads[:, 1] == XOR_PLANES)
    ok &= heads[:, 2].to(torch.int64) == widths
    ok &= heads[:, 8:16].contiguous().view(torch.int64).reshape(-1) == nbytes
    ok &= enc_lens == nbytes + size
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise InvalidArgumentError(
            f"segment {i}: not an xor-planes v1 encoding of {int(nbytes[i])} bytes, width {int(widths[i])}"
        )
    call("xor_planes_decode", enc + size, parents, nbytes, widths.to(torch.int32), outs, n)
