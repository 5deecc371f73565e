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


def encode_tables(
    models: list[tuple[int, int, int, int, int, int]], tensors: torch.Tensor
) -> bytes:
    """``models``: (offset, stored, plain, tensor count, depth, codec) in ``changed``
    order; ``tensors``: (kind, offset, length) of every model's tensors, in order, as
    an (n, 3) int64 tensor (its little-endian bytes are ``TENSOR`` rows as they are:
    the kind in the first byte of eight, then the two 8-byte fields)."""
    out = bytearray()
    first = 0
    for offset, stored, plain, count, depth, codec in models:
        out += MODEL.pack(offset, stored, plain, first, count, depth, codec)
        first += count
    if first != tensors.shape[0]:
        raise ValueError(f"{first} tensor entries announced, {tensors.shape[0]} given")
    if tensors.numel() and not bool(((tensors[:, 0] >= 0) & (tensors[:, 0] < 256)).all()):
        raise ValueError("a tensor entry's kind does not fit its byte")
    out += kernels.tensor_bytes(tensors.to(torch.int64).contiguous())
    return bytes(out)


def blob_key(table: bytes, hashes: torch.Tensor) -> bytes:
    return kernels.blake3_bytes(b"mmcore-delta-v1" + table + kernels.tensor_bytes(hashes))


def decode_tables(data: bytes, models: int, hashes: torch.Tensor, what: str) -> DeltaTable:
    head = MODEL.size * models
    if len(data) < head or (len(data) - head) % TENSOR.size:
        raise IntegrityError(f"{what}: the delta table is {len(data)} bytes, not a valid length")
    rows = torch.frombuffer(bytearray(data[:head]), dtype=torch.uint8).reshape(models, MODEL.size)
    q = rows[:, :24].contiguous().view(torch.int64)
    i = rows[:, 24:32].contiguous().view(torch.int32).to(torch.int64)
    depth = rows[:, 32:34].contiguous().view(torch.int16).to(torch.int64)
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
