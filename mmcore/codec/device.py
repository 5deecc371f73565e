"""Coded chunks (docs/FORMAT.md, "Coded blobs") decoded on a CUDA device.

The coded bytes cross to the device as they are stored (one copy, the chunks' span),
and are decoded there by the byte-plane decoder of csrc/planes_units.h: the host only
reads each chunk's stream lengths and each stream's block table (``planes_blocks``,
which checks them as the CPU decoder does) into one table of blocks, and the device
decodes every block of every chunk in two launches. Where a chunk's streams are not its
records whole (several element widths, or bytes no tensor covers), the streams are
decoded into a staging buffer and scattered into the records by one more launch.

On the CPU the same table runs through the device code's emulation
(``_core.planes_emulate``): the CPU tests check the device decoder that way, bit for
bit against the CPU decoder, damaged streams included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import kernels
from .._native import core
from ..errors import IntegrityError
from ..kernels import cuda
from ..modelset import Schema
from .records import _Stream, layout_of

BLOCK_ELEMS = 1 << 16  # the smallest block a byte-plane stream has: the table needs no more rows
PLANES_PER_BLOCK = 8  # a block's row of plane addresses

# planes_units::Error, as messages
_ERRORS = {
    1: "planes that do not add up to their block",
    2: "a table that is no code",
    3: "a stream that ends early",
    4: "a stream longer than its symbols",
    5: "a Huffman stream holding a bit pattern of no code",
    6: "a rANS state out of range",
    7: "a plane of unknown mode",
}


# Tests set this to run the reader's device path on the CPU, through the emulation.
EMULATE_ON_CPU = False


def decodes_on(device: torch.device) -> bool:
    """Whether coded blobs loaded to ``device`` are decoded there: a CUDA device the
    kernels run on (else they are decoded on the host and copied)."""
    if device.type == "cuda":
        return cuda.available()
    return EMULATE_ON_CPU and device.type == "cpu"


def hashes(ptrs: torch.Tensor, lens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """BLAKE3 of segments of memory on ``device`` (int64 CPU tables of addresses and
    lengths), hashed there: a (n, 32) uint8 CPU tensor."""
    if device.type == "cpu":
        return kernels.blake3_segments(ptrs, lens)
    return cuda.blake3_addresses(ptrs, lens, device).cpu()


def _align(n: int, to: int = 64) -> int:
    return -(-n // to) * to


class _Placed(NamedTuple):
    """One stream of one chunk: where its bytes are in the coded buffer and where its
    decoded bytes go (an offset in the records, or in the staging buffer)."""

    at: int
    length: int
    nbytes: int
    stream: _Stream
    dst: int
    first: int
    records: int


def decode(schema: Schema, coded: torch.Tensor, chunks: Sequence[tuple[int, int, int, int]],
           out: torch.Tensor, what: str = "a coded chunk") -> None:  # fmt: skip
    """Decodes chunks of ``coded`` (uint8, on the CPU: each chunk given as (offset in
    ``coded``, length, first record, record count)) into ``out``, the blob's records
    from record 0 (contiguous uint8, on a CUDA device, or on the CPU for the
    emulation). IntegrityError where a chunk does not hold exactly its records."""
    layout = layout_of(schema)
    stride = schema.stride
    device = out.device
    emulate = device.type == "cpu"
    mod = core()
    block_bytes = int(mod.planes_block_bytes)
    streams: list[_Placed] = []
    staged = 0
    k = len(layout.streams)
    for offset, length, first, count in chunks:
        lengths = layout.stream_lengths(coded[offset : offset + length], what)
        at = offset + 4 * k
        for s, n in zip(layout.streams, lengths):
            nbytes = count * s.per_record
            if layout.direct:  # straight into the records
                streams.append(_Placed(at, n, nbytes, s, first * stride, first, count))
            else:
                streams.append(_Placed(at, n, nbytes, s, staged, first, count))
                staged += _align(nbytes)
            at += n
    nblocks = sum(-(-(p.nbytes // p.stream.width) // BLOCK_ELEMS) for p in streams)
    dev_coded = coded if emulate else coded.to(device)
    staging = torch.empty(staged, dtype=torch.uint8, device=device)
    into = out if layout.direct else staging
    scratch = torch.empty(sum(_align(p.nbytes) for p in streams), dtype=torch.uint8,
                          device=device)  # fmt: skip
    table = torch.empty(nblocks * block_bytes, dtype=torch.uint8)
    host, base = coded.data_ptr(), dev_coded.data_ptr()
    rows = scratch_at = 0
    for p in streams:
        try:
            rows += mod.planes_blocks(host + p.at, p.length, p.nbytes, p.stream.width, base + p.at,
                                      into.data_ptr() + p.dst, scratch.data_ptr() + scratch_at,
                                      table.data_ptr() + rows * block_bytes, nblocks - rows)  # fmt: skip
        except ValueError as exc:
            raise IntegrityError(f"{what}: {exc}") from None
        scratch_at += _align(p.nbytes)
    if layout.gaps:
        out.zero_()
    copies = [] if layout.direct or not streams else _scatter_table(streams, stride, out)
    _run(table, rows, device, what, staging, copies)


def decode_planes(blob: torch.Tensor, out: torch.Tensor, what: str = "decode_planes",
                  on_device: torch.Tensor | None = None) -> None:  # fmt: skip
    """Decodes one byte-plane stream (``kernels.compress_planes``'s, uint8 on the CPU)
    into ``out`` (contiguous, as many bytes as the stream holds, on a CUDA device or,
    emulated, on the CPU); IntegrityError where it is damaged. ``on_device``: the same
    bytes already on ``out``'s device (else they are copied there)."""
    mod = core()
    width = int(blob[5]) if blob.numel() > 5 else 1
    nbytes = out.numel() * out.element_size()
    if on_device is not None and (on_device.device != out.device or on_device.shape != blob.shape):
        raise ValueError("decode_planes: on_device is not the blob's bytes on out's device")
    dev = blob if out.device.type == "cpu" else on_device
    if dev is None:
        dev = blob.to(out.device)
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=out.device)
    nblocks = -(-(nbytes // width) // BLOCK_ELEMS)
    table = torch.empty(nblocks * int(mod.planes_block_bytes), dtype=torch.uint8)
    try:
        rows = mod.planes_blocks(blob.data_ptr(), blob.numel(), nbytes, width, dev.data_ptr(),
                                 out.data_ptr(), scratch.data_ptr(), table.data_ptr(), nblocks)  # fmt: skip
    except ValueError as exc:
        raise IntegrityError(f"{what}: {exc}") from None
    _run(table, rows, out.device, what)


def _run(table: torch.Tensor, rows: int, device: torch.device, what: str,
         staging: torch.Tensor | None = None, copies: Sequence[torch.Tensor | int] = ()) -> None:  # fmt: skip
    """The launches over a block table (and the copies out of ``staging``), then the
    error they found, if any, as an IntegrityError."""
    mod = core()
    planes = torch.empty(max(rows, 1) * PLANES_PER_BLOCK, dtype=torch.int64, device=device)
    error = torch.zeros(2, dtype=torch.int32, device=device)
    if device.type == "cpu":
        mod.planes_emulate(table.data_ptr(), rows, planes.data_ptr(), error.data_ptr())
        if copies and staging is not None:
            mod.emulate_scatter(staging.data_ptr(), *map(_addr, copies))
    else:
        dev_table = table.pin_memory().to(device, non_blocking=True)
        with cuda._launching("planes_decode", device) as stream:
            mod.cuda_planes_decode(dev_table.data_ptr(), rows, planes.data_ptr(),
                                   error.data_ptr(), stream)  # fmt: skip
            if copies and staging is not None:
                mod.cuda_scatter(staging.data_ptr(), *map(_addr, copies), stream)
    code, block = (int(x) for x in error.cpu().tolist())
    if code:
        reason = _ERRORS.get(code, f"error {code}")
        raise IntegrityError(f"{what}: its byte-plane block {block} holds {reason}")


def _scatter_table(streams: list[_Placed], stride: int,
                   out: torch.Tensor) -> list[torch.Tensor | int]:  # fmt: skip
    """The copies from the staging buffer into the records, as cuda_kernels.h's scatter
    takes them (but the source): every run of every record of every chunk."""
    device = out.device
    dsts, lens, offsets = [], [], []
    for p in streams:
        d, n, o = p.stream.scatter_table(
            p.records, stride, out.data_ptr() + p.first * stride, p.dst
        )
        dsts.append(d)
        lens.append(n)
        offsets.append(o)
    lens_t = torch.cat(lens)
    tile = int(core().copy_tile_bytes)
    counts = (lens_t + (tile - 1)).div_(tile, rounding_mode="floor").tolist()
    return [_on(torch.cat(dsts), device), _on(lens_t, device), _on(torch.cat(offsets), device),
            *cuda._tiles(counts, device)]  # fmt: skip


def _addr(x: torch.Tensor | int) -> int:
    return x.data_ptr() if isinstance(x, torch.Tensor) else x


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)
