"""The baseline save path: every parameter of every model, minimal metadata.

Models are validated and written in one streaming pass. Per schema group,
models are batched into *extents*: runs of whole models laid out one after
another with the schema's fixed stride, each one large sequential write. While
the Python thread validates the next models, one thread hashes the sources of
the previous batch and another copies them into a staging buffer and writes it
(native calls release the GIL). Memory stays bounded by the staging buffers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from .. import kernels
from .._gc import gc_paused
from ..manifest import ContentRecord, GroupRecord
from ..modelset import Grouper, ModelEntry, Schema, StackedInput, iter_models
from ..store.packs import HEADER_SIZE, PackWriter, align_up

# Bytes per batch (one extent): large enough for sequential writes, small
# enough that batches in flight stay far below the set's size.
BATCH_BYTES = 32 << 20
MAX_BATCHES_IN_FLIGHT = 3
HASH_ALIGN = 64

Progress = Callable[[int], None]


def blob_key(schema: Schema, count: int, hashes: torch.Tensor) -> bytes:
    """Content address of a blob: its layout and the hashes of every tensor in it."""
    head = b"mmcore-blob-v1" + struct.pack("<Q", count)
    head += bytes(msgpack.packb(schema.encode(), use_bin_type=True))
    return kernels.blake3_bytes(head + kernels.tensor_bytes(hashes))


@dataclass
class _GroupState:
    schema: Schema
    members: list[int] = field(default_factory=list)
    extents: list[list[int]] = field(default_factory=list)  # [pack offset, model count]
    hash_parts: list[torch.Tensor] = field(default_factory=list)
    pending_ptrs: list[int] = field(default_factory=list)
    pending_sources: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def batch_models(self) -> int:
        return max(1, BATCH_BYTES // max(self.schema.stride, 1))


@dataclass
class WrittenSet:
    names: list[str]
    groups: list[GroupRecord]
    blobs: list[tuple[bytes, ContentRecord]]
    logical_bytes: int
    end: int = 0  # first pack offset after everything written


class _SetWriter:
    def __init__(
        self, writer: PackWriter, hash_pool: ThreadPoolExecutor, write_pool: ThreadPoolExecutor
    ) -> None:
        self.writer = writer
        self.hash_pool = hash_pool
        self.write_pool = write_pool
        self.end = HEADER_SIZE
        self.groups: list[_GroupState] = []
        self.futures: list[Future[None]] = []

    def add(self, gi: int, schema: Schema, index: int, entry: ModelEntry) -> None:
        if gi == len(self.groups):
            self.groups.append(_GroupState(schema))
        g = self.groups[gi]
        g.members.append(index)
        g.pending_ptrs.extend(entry.ptrs)
        g.pending_sources.append(entry.sources)
        if len(g.pending_sources) >= g.batch_models:
            self._flush(g)

    def _flush(self, g: _GroupState) -> None:
        count = len(g.pending_sources)
        if count == 0:
            return
        keep = g.pending_sources  # the sources must outlive both jobs
        ptrs = kernels.int64_table(g.pending_ptrs)
        g.pending_ptrs, g.pending_sources = [], []
        self._write_batch(g, count, ptrs, keep)

    def add_rows(self, gi: int, schema: Schema, members: list[int], rows: torch.Tensor,
                 keep: Any) -> None:  # fmt: skip
        """Queues models given as an address table (models, tensors), at ``members`` (their
        positions in the set, ascending): batch by batch, no per-model step. ``keep``
        holds the memory behind the addresses."""
        if gi == len(self.groups):
            self.groups.append(_GroupState(schema))
        g = self.groups[gi]
        self._flush(g)
        count = rows.shape[0]
        g.members.extend(members)
        step = g.batch_models
        for start in range(0, count, step):
            part = rows[start : start + step]
            self._write_batch(g, part.shape[0], part.reshape(-1).contiguous(), keep)

    def _write_batch(self, g: _GroupState, count: int, ptrs: torch.Tensor, keep: Any) -> None:
        """Hashes and writes ``count`` models (``ptrs``: each tensor's address, model
        after model) as the group's next records. A batch that follows the group's
        previous one directly extends its extent: a group written without another in
        between is one extent, one contiguous run of records."""
        schema = g.schema
        nbytes = count * schema.stride
        last = g.extents[-1] if g.extents else None
        if last is not None and last[0] + last[1] * schema.stride == self.end:
            offset = self.end
            last[1] += count
        else:
            offset = align_up(self.end)
            g.extents.append([offset, count])
        self.end = offset + nbytes
        lens = kernels.int64_table([s.nbytes for s in schema.tensors]).repeat(count)
        spec_offsets = kernels.int64_table([s.offset for s in schema.tensors])
        rows = torch.arange(count, dtype=torch.int64).mul_(schema.stride).unsqueeze(1)
        dst_offsets = (rows + spec_offsets.unsqueeze(0)).reshape(-1)
        hashes = torch.empty((ptrs.numel(), kernels.HASH_SIZE), dtype=torch.uint8)
        g.hash_parts.append(hashes)

        # Both jobs hold `keep`, so the source tensors outlive every read of them.
        def hash_job() -> None:
            assert keep is not None
            kernels.blake3_segments(ptrs, lens, out=hashes, threads=1)

        def write_job() -> None:
            assert keep is not None
            self.writer.write_segments(offset, ptrs, lens, dst_offsets, nbytes)

        self.futures.append(self.hash_pool.submit(hash_job))
        self.futures.append(self.write_pool.submit(write_job))
        self._reap()

    def _reap(self) -> None:
        """Re-raises failed jobs; waits while too many batches are in flight."""
        while self.futures and (
            self.futures[0].done() or len(self.futures) > 2 * MAX_BATCHES_IN_FLIGHT
        ):
            self.futures.pop(0).result()

    def finish(self, names: list[str]) -> WrittenSet:
        for g in self.groups:
            self._flush(g)
        for f in self.futures:
            f.result()
        self.futures = []
        records, blobs = [], []
        single = len(self.groups) == 1
        for g in self.groups:
            count = len(g.members)
            hashes = (
                torch.cat(g.hash_parts)
                if g.hash_parts
                else torch.empty((0, kernels.HASH_SIZE), dtype=torch.uint8)
            )
            hashes_offset = align_up(self.end, HASH_ALIGN)
            if hashes.numel():
                self.writer.write_ptr(hashes.data_ptr(), hashes.numel(), hashes_offset)
            self.end = hashes_offset + hashes.numel()
            key = blob_key(g.schema, count, hashes)
            rec = ContentRecord(
                self.writer.pack_id, g.extents, hashes_offset, hashes.numel(), refs=1
            )
            blobs.append((key, rec))
            members = None if single else g.members
            records.append(GroupRecord(g.schema, count, key, members))
        logical = sum(len(g.members) * sum(s.nbytes for s in g.schema.tensors) for g in self.groups)
        return WrittenSet(names, records, blobs, logical, self.end)


def write_set(writer: PackWriter, models: Any, progress: Progress) -> WrittenSet:
    """Validates ``models`` and writes every group into one pack, streaming.

    ``progress(1)`` is called once per model queued for writing.
    """
    grouper = Grouper()
    names: list[str] = []
    with ThreadPoolExecutor(1, thread_name_prefix="mmcore-hash") as hp, \
            ThreadPoolExecutor(1, thread_name_prefix="mmcore-write") as wp, gc_paused():  # fmt: skip
        sw = _SetWriter(writer, hp, wp)
        try:
            if isinstance(models, StackedInput):  # address tables from the stacks' strides
                for part in models.parts:
                    part = part.on_host()
                    gi = grouper.group_of_layout(part.keys, part.signature, part.names[0])
                    at = torch.tensor(models.positions(part), dtype=torch.int64)
                    at, by = torch.sort(
                        at
                    )  # the group's records in the set's order, as a dict gives
                    sw.add_rows(gi, grouper.schemas[gi], at.tolist(), part.row_table()[by],
                                part.columns)  # fmt: skip
                    progress(len(part.names))
                return sw.finish(models.order)
            for entry in iter_models(models):
                gi = grouper.group_of(entry)
                sw.add(gi, grouper.schemas[gi], len(names), entry)
                names.append(entry.name)
                progress(1)
            if not names:
                from ..errors import InvalidModelSetError

                raise InvalidModelSetError("the model set is empty: pass at least one model")
            return sw.finish(names)
        finally:
            for f in sw.futures:  # never leave a job touching freed sources
                f.cancel() or f.exception()
