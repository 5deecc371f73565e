"""The baseline save path: every parameter of every model, minimal metadata.

Per schema group, models are laid out one after another with a fixed stride,
so a save is a few large sequential writes and one model is one byte range.
Bytes move from the source tensors to a staging buffer and the pack file in
batches through a writer thread (native calls release the GIL), while the
next batch's address table is prepared.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import msgpack
import torch

from .. import kernels
from ..manifest import ContentRecord, GroupRecord
from ..modelset import Group, PreparedSet
from ..store.packs import HEADER_SIZE, PackWriter, align_up

# Bytes per staging buffer: large enough for sequential writes, small enough
# that two of them stay well below the set's size.
STAGING_BYTES = 32 << 20
HASH_ALIGN = 64

Progress = Callable[[int], None]


@dataclass
class WrittenBlob:
    key: bytes
    record: ContentRecord


def blob_key(group: GroupRecord | Group, count: int, hashes: torch.Tensor) -> bytes:
    """Content address of a blob: its layout and the hashes of every tensor in it."""
    schema = group.schema.encode()
    head = b"mmcore-blob-v1" + struct.pack("<Q", count) + bytes(msgpack.packb(schema, use_bin_type=True))
    return kernels.blake3_bytes(head + kernels.tensor_bytes(hashes))


def _relative_offsets(specs_offsets: torch.Tensor, count: int, stride: int) -> torch.Tensor:
    rows = torch.arange(count, dtype=torch.int64).mul_(stride).unsqueeze(1)
    return (rows + specs_offsets.unsqueeze(0)).reshape(-1)


def write_group(writer: PackWriter, group: Group, start: int, progress: Progress,
                pool: ThreadPoolExecutor) -> tuple[WrittenBlob, int]:
    """Writes one group's payload and hash table at ``start``; returns the blob and its end."""
    schema = group.schema
    count = len(group.members)
    ntensors = len(schema.tensors)
    stride = schema.stride
    payload_offset = align_up(start)
    payload_length = count * stride
    hashes_offset = align_up(payload_offset + payload_length, HASH_ALIGN)
    hashes = torch.empty((count * ntensors, kernels.HASH_SIZE), dtype=torch.uint8)

    ptrs = kernels.int64_table([t.data_ptr() for srcs in group.sources for t in srcs])
    spec_lens = kernels.int64_table([s.nbytes for s in schema.tensors])
    spec_offsets = kernels.int64_table([s.offset for s in schema.tensors])
    lens = spec_lens.repeat(count)

    per_batch = max(1, STAGING_BYTES // max(stride, 1))
    nbuf = 2 if count > per_batch else 1
    staging = [torch.zeros(min(per_batch, count) * stride, dtype=torch.uint8) for _ in range(nbuf)]
    pending: list[Future[None]] = []

    def job(buf: torch.Tensor, a: int, b: int, offsets: torch.Tensor) -> None:
        seg = slice(a * ntensors, b * ntensors)
        kernels.gather(buf, ptrs[seg], lens[seg], offsets)
        kernels.blake3_segments(ptrs[seg], lens[seg], out=hashes[seg])
        writer.write_ptr(buf.data_ptr(), (b - a) * stride, payload_offset + a * stride)
        progress((b - a) * stride)

    for i, a in enumerate(range(0, count, per_batch)):
        b = min(count, a + per_batch)
        if len(pending) >= nbuf:
            pending.pop(0).result()
        offsets = _relative_offsets(spec_offsets, b - a, stride)
        pending.append(pool.submit(job, staging[i % nbuf], a, b, offsets))
    for fut in pending:
        fut.result()

    hashes_length = hashes.numel()
    if hashes_length:
        writer.write_ptr(hashes.data_ptr(), hashes_length, hashes_offset)
    record = ContentRecord(
        pack=writer.pack_id,
        payload_offset=payload_offset,
        payload_length=payload_length,
        hashes_offset=hashes_offset,
        hashes_length=hashes_length,
        refs=1,
    )
    return WrittenBlob(blob_key(group, count, hashes), record), hashes_offset + hashes_length


def write_set(writer: PackWriter, prepared: PreparedSet, progress: Progress) -> list[WrittenBlob]:
    """Writes every group of the set into one pack, in group order."""
    blobs = []
    end = HEADER_SIZE
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmcore-writer") as pool:
        for group in prepared.groups:
            blob, end = write_group(writer, group, end, progress, pool)
            blobs.append(blob)
    return blobs


def group_records(prepared: PreparedSet, blobs: list[WrittenBlob]) -> list[GroupRecord]:
    single = len(prepared.groups) == 1
    return [
        GroupRecord(g.schema, len(g.members), blob.key, None if single else list(g.members))
        for g, blob in zip(prepared.groups, blobs)
    ]
