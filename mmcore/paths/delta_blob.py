"""The delta blob of an update version: one table entry per changed model and
per tensor, the BLAKE3 of every recovered tensor, and the model blobs they point
to (docs/FORMAT.md, "Update versions")."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property

import torch

from .. import kernels
from ..errors import IntegrityError

# Per changed model: pack offset of its blob, stored length, plain length,
# index of its first tensor entry, tensor count, delta depth, codec, padding.
MODEL = struct.Struct("<QQQIIHB5x")
# Per tensor: how it is stored (codec.SAME/RAW/XOR/QUANT), offset and length in the plain blob.
TENSOR = struct.Struct("<B7xQQ")


@dataclass
class DeltaTable:
    """The parsed tables, as recovery reads them."""

    rows: list[tuple[int, ...]]  # per changed model: MODEL's fields (offset, stored, plain,
    #                              first, count, depth, codec)
    # (tensors, 3) int64, per tensor: its kind, offset and length in the plain blob
    columns: torch.Tensor
    hashes: torch.Tensor  # (tensors, 32) BLAKE3 of each recovered tensor

    @cached_property
    def entries(self) -> list[tuple[int, int, int]]:
        """``columns`` as tuples (the path that decodes tensor by tensor)."""
        return [(k, a, b) for k, a, b in self.columns.tolist()]


def encode_tables(models: torch.Tensor, tensors: torch.Tensor) -> bytes:
    """``models``: (n, 6) int64, per model (offset, stored, plain, tensor count, depth,
    codec) in ``changed`` order, each model's first tensor entry the sum of the counts
    before it; ``tensors``: (kind, offset, length) of every model's tensors, in order, as
    an (n, 3) int64 tensor (its little-endian bytes are ``TENSOR`` rows as they are:
    the kind in the first byte of eight, then the two 8-byte fields). Both tables are
    laid out by column operations, no step per model."""
    models = models.to(torch.int64).reshape(-1, 6)
    n = models.shape[0]
    count = models[:, 3]
    first = count.cumsum(0) - count
    limits = ((models[:, :3], None), (torch.stack([first, count], 1), 1 << 32),
              (models[:, 4], 1 << 16), (models[:, 5], 1 << 8))  # fmt: skip
    for column, limit in limits:  # (an int64 is below 2**63: the unsigned 8-byte fields)
        fits = column >= 0 if limit is None else (column >= 0) & (column < limit)
        if column.numel() and not bool(fits.all()):
            raise ValueError("a delta table field does not fit its width")
    if int(count.sum()) != tensors.shape[0]:
        raise ValueError(f"{int(count.sum())} tensor entries announced, {tensors.shape[0]} given")
    if tensors.numel() and not bool(((tensors[:, 0] >= 0) & (tensors[:, 0] < 256)).all()):
        raise ValueError("a tensor entry's kind does not fit its byte")
    head = torch.zeros((n, MODEL.size), dtype=torch.uint8)
    if n:  # (the little-endian fields, as MODEL packs them)
        head[:, :24] = models[:, :3].contiguous().view(torch.uint8).reshape(n, 24)
        pair = torch.stack([first, count], 1).to(torch.int32).contiguous()
        head[:, 24:32] = pair.view(torch.uint8).reshape(n, 8)
        head[:, 32:34] = models[:, 4:5].to(torch.int16).contiguous().view(torch.uint8)
        head[:, 34] = models[:, 5].to(torch.uint8)
    return kernels.tensor_bytes(head) + kernels.tensor_bytes(tensors.to(torch.int64).contiguous())


def blob_key(table: bytes, hashes: torch.Tensor) -> bytes:
    return kernels.blake3_bytes(b"mmcore-delta-v1" + table + kernels.tensor_bytes(hashes))


def decode_tables(data: bytes, models: int, hashes: torch.Tensor, what: str) -> DeltaTable:
    head = MODEL.size * models
    if len(data) < head or (len(data) - head) % TENSOR.size:
        raise IntegrityError(f"{what}: the delta table is {len(data)} bytes, not a valid length")
    rows = torch.frombuffer(bytearray(data[:head]), dtype=torch.uint8).reshape(models, MODEL.size)
    q = rows[:, :24].contiguous().view(torch.int64)
    # (MODEL's I and H fields are unsigned)
    i = rows[:, 24:32].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    depth = rows[:, 32:34].contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    entries = (len(data) - head) // TENSOR.size
    ents = torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8).reshape(entries, TENSOR.size)
    kind = ents[:, :1].to(torch.int64)
    spans = ents[:, 8:24].contiguous().view(torch.int64)
    if (models and int((i[:, 0] + i[:, 1]).max()) > entries) or hashes.shape[0] != entries:
        raise IntegrityError(f"{what}: the delta table's entries do not add up")
    columns = torch.cat([q, i, depth, rows[:, 34:35].to(torch.int64)], dim=1)
    return DeltaTable(
        rows=[tuple(r) for r in columns.tolist()],
        columns=torch.cat([kind, spans], dim=1),
        hashes=hashes,
    )
