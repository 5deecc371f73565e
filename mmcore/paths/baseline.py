"""The baseline save path: every parameter of every model, minimal metadata.

Models are validated and written in one streaming pass. Per schema group,
models are batched into *extents*: runs of whole models laid out one after
another with the schema's fixed stride, each one large sequential write. While
the Python thread validates the next models, one thread hashes the sources of
the previous batch and another copies them into a staging buffer and writes it
(native calls release the GIL). Memory stays bounded by the staging buffers,
except where models may share tensors: a group with a tensor of ``SHARE_MIN``
bytes or more is held until the set is read, then written once its equal tensors
are found (``plan_shared``; each distinct value once, in a row blob).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from .. import kernels
from .._gc import gc_paused
from ..codec import records
from ..manifest import ContentRecord, GroupRecord, SharedTensors, split_schema, unshared
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
    coder: records.Layout | None = None  # compress=True: its records coded in chunks
    chunks: list[list[int]] = field(default_factory=list)  # [pack offset, length, count]

    @property
    def batch_models(self) -> int:
        if self.coder is not None:  # whole chunks (a batch of one chunk at least)
            per = self.coder.records_per_chunk()
            return per * max(1, BATCH_BYTES // (per * max(self.schema.stride, 1)))
        return max(1, BATCH_BYTES // max(self.schema.stride, 1))


@dataclass
class WrittenSet:
    names: list[str]
    groups: list[GroupRecord]
    blobs: list[tuple[bytes, ContentRecord | None]]  # None: a row blob the store holds already
    logical_bytes: int
    end: int = 0  # first pack offset after everything written
    coded_saved: int = 0  # bytes compression saved on the blobs written (compress=True)


@dataclass
class _Written:
    """One writer group's blob once written: its key, record and members."""

    key: bytes
    rec: ContentRecord
    members: list[int]


class _SetWriter:
    def __init__(self, writer: PackWriter, hash_pool: ThreadPoolExecutor,
                 write_pool: ThreadPoolExecutor, compress: bool = False) -> None:  # fmt: skip
        self.compress = compress
        self.writer = writer
        self.hash_pool = hash_pool
        self.write_pool = write_pool
        self.end = HEADER_SIZE
        self.groups: list[_GroupState] = []
        self.futures: list[Future[None]] = []

    def _group(self, gi: int, schema: Schema) -> _GroupState:
        if gi == len(self.groups):
            coder = records.layout_of(schema) if self.compress else None
            self.groups.append(_GroupState(schema, coder=coder))
        return self.groups[gi]

    def add(self, gi: int, schema: Schema, index: int, entry: ModelEntry) -> None:
        g = self._group(gi, schema)
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
        g = self._group(gi, schema)
        self._flush(g)
        count = rows.shape[0]
        g.members.extend(members)
        step = g.batch_models
        for start in range(0, count, step):
            part = rows[start : start + step]
            self._write_batch(g, part.shape[0], part.reshape(-1).contiguous(), keep)

    def _write_batch(self, g: _GroupState, count: int, ptrs: torch.Tensor, keep: Any) -> None:
        """Hashes and writes ``count`` models (``ptrs``: each tensor's address, model
        after model) as the group's next records, on the hash and write threads."""
        lens = kernels.int64_table([s.nbytes for s in g.schema.tensors]).repeat(count)
        hashes = torch.empty((ptrs.numel(), kernels.HASH_SIZE), dtype=torch.uint8)
        g.hash_parts.append(hashes)
        write = (
            self._coded(g, count, ptrs)
            if g.coder is not None
            else self._plain(g, count, ptrs, lens)
        )

        # Both jobs hold `keep`, so the source tensors outlive every read of them.
        def hash_job() -> None:
            assert keep is not None
            kernels.blake3_segments(ptrs, lens, out=hashes, threads=1)

        def write_job() -> None:
            assert keep is not None
            write()

        self.futures.append(self.hash_pool.submit(hash_job))
        self.futures.append(self.write_pool.submit(write_job))
        self._reap()

    def _plain(self, g: _GroupState, count: int, ptrs: torch.Tensor,
               lens: torch.Tensor) -> Callable[[], None]:  # fmt: skip
        """Places the records (a batch that follows the group's previous one directly
        extends its extent: a group written without another in between is one extent,
        one contiguous run of records) and returns what writes them."""
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
        spec_offsets = kernels.int64_table([s.offset for s in schema.tensors])
        rows = torch.arange(count, dtype=torch.int64).mul_(schema.stride).unsqueeze(1)
        dst_offsets = (rows + spec_offsets.unsqueeze(0)).reshape(-1)
        return lambda: self.writer.write_segments(offset, ptrs, lens, dst_offsets, nbytes)

    def _coded(self, g: _GroupState, count: int, ptrs: torch.Tensor) -> Callable[[], None]:
        """What writes the records coded chunk by chunk (``codec.records``): run on the
        write thread, it codes each chunk (on every core) and places it where the pack
        ends (64-byte aligned), so jobs of every group take their places in the order
        they were queued."""
        coder = g.coder
        assert coder is not None
        n = len(g.schema.tensors)

        def write() -> None:
            per = coder.records_per_chunk()
            for first in range(0, count, per):
                k = min(per, count - first)
                chunk = coder.encode(ptrs[first * n : (first + k) * n], k)
                offset = align_up(self.end, HASH_ALIGN)  # (as compaction places it)
                if chunk.numel():
                    self.writer.write_ptr(chunk.data_ptr(), chunk.numel(), offset)
                self.end = offset + chunk.numel()
                g.chunks.append([offset, chunk.numel(), k])

        return write

    def _reap(self) -> None:
        """Re-raises failed jobs; waits while too many batches are in flight."""
        while self.futures and (
            self.futures[0].done() or len(self.futures) > 2 * MAX_BATCHES_IN_FLIGHT
        ):
            self.futures.pop(0).result()

    def finish(self) -> list[_Written]:
        """Writes the hash tables; each writer group's blob, in the order first added."""
        for g in self.groups:
            self._flush(g)
        for f in self.futures:
            f.result()
        self.futures = []
        out = []
        for g in self.groups:
            hashes = (
                torch.cat(g.hash_parts)
                if g.hash_parts
                else torch.empty((0, kernels.HASH_SIZE), dtype=torch.uint8)
            )
            hashes_offset = align_up(self.end, HASH_ALIGN)
            if hashes.numel():
                self.writer.write_ptr(hashes.data_ptr(), hashes.numel(), hashes_offset)
            self.end = hashes_offset + hashes.numel()
            key = blob_key(g.schema, len(g.members), hashes)
            chunks = g.chunks if g.coder is not None else None
            rec = ContentRecord(self.writer.pack_id, g.extents, hashes_offset, hashes.numel(),
                                refs=1, chunks=chunks)  # fmt: skip
            out.append(_Written(key, rec, g.members))
        return out


# Shared tensors (docs/FORMAT.md): tensors of at least this many bytes are hashed before a
# group is written; those equal across its models are stored once per distinct value.
SHARE_MIN = 512
# A group's shared tensors must save at least this many bytes (else it is written whole).
SHARE_SAVES = 64 << 10
# Models of a group held before looking whether any may share a tensor: where none of
# these does, the group streams (a fleet of independently trained models).
SHARE_LOOK = 16
PREFIX = 32  # bytes of each tensor compared before any is hashed


@dataclass
class _Plan:
    """A group's shared tensors: their indices, each model's row, each row's first model."""

    tensors: list[int]
    rows: list[int]
    firsts: list[int]


def plan_shared(schema: Schema, entries: list[ModelEntry], threads: int = 0) -> _Plan | None:
    """Which of the group's tensors to store once per distinct value, or None.

    Tensors of ``SHARE_MIN`` bytes or more whose first bytes repeat (``_repeated``)
    are hashed; each such column splits the models by value. The columns that split
    them alike form a candidate; the one saving the most bytes wins, with every column
    equal wherever it is (a column whose value follows the winner's rows: all models'
    equal step counter, say). ``SHARE_SAVES`` bytes or more saved, else None."""
    n = len(entries)
    cand = _repeated(schema, entries)
    if not cand:
        return None
    ptrs = kernels.int64_table([e.ptrs[i] for e in entries for i in cand])
    lens = kernels.int64_table([schema.tensors[i].nbytes for i in cand]).repeat(n)
    hashes = kernels.blake3_segments(ptrs, lens, threads=threads).view(n, len(cand), -1)
    labels: list[tuple[int, ...]] = []
    classes: dict[tuple[int, ...], list[int]] = {}
    for c in range(len(cand)):
        _, inverse = torch.unique(hashes[:, c], dim=0, return_inverse=True)
        first: dict[int, int] = {}
        canon = tuple(first.setdefault(v, len(first)) for v in inverse.tolist())
        labels.append(canon)
        if len(first) < n:  # some models share this tensor
            classes.setdefault(canon, []).append(c)
    if not classes:
        return None

    def saved(canon: tuple[int, ...], cols: list[int]) -> int:
        return (n - (max(canon) + 1)) * sum(schema.tensors[cand[c]].nbytes for c in cols)

    best = max(classes, key=lambda k: saved(k, classes[k]))
    firsts: list[int] = []
    for i, row in enumerate(best):
        if row == len(firsts):
            firsts.append(i)
    cols = [c for c in range(len(cand))
            if all(labels[c][i] == labels[c][firsts[best[i]]] for i in range(n))]  # fmt: skip
    if saved(best, cols) < SHARE_SAVES:
        return None
    return _Plan([cand[c] for c in cols], list(best), firsts)


def _repeated(schema: Schema, entries: list[ModelEntry]) -> list[int]:
    """The tensors of ``SHARE_MIN`` bytes or more whose first ``PREFIX`` bytes repeat
    among ``entries``: the only ones that may be equal in two models (hashing only
    these, a set of independently trained models costs one gather of prefixes)."""
    n = len(entries)
    cand = [i for i, spec in enumerate(schema.tensors) if spec.nbytes >= SHARE_MIN]
    if n < 2 or not cand:
        return []
    lens = kernels.int64_table([min(PREFIX, schema.tensors[i].nbytes) for i in cand]).repeat(n)
    prefixes = torch.zeros(n * len(cand) * PREFIX, dtype=torch.uint8)
    ptrs = kernels.int64_table([e.ptrs[i] for e in entries for i in cand])
    kernels.gather(prefixes, ptrs, lens, torch.arange(n * len(cand), dtype=torch.int64) * PREFIX)
    rows = prefixes.view(n, len(cand), PREFIX)
    return [i for c, i in enumerate(cand) if torch.unique(rows[:, c], dim=0).shape[0] < n]


def _part(entry: ModelEntry, keep: list[int]) -> ModelEntry:
    return ModelEntry(entry.name, tuple(entry.keys[i] for i in keep),
                      tuple(entry.signature[i] for i in keep), [entry.sources[i] for i in keep],
                      [entry.ptrs[i] for i in keep], entry.device)  # fmt: skip


Split = tuple[Any, list[int]]  # a schema's layout key, and the indices of its shared tensors


def write_set(writer: PackWriter, models: Any, progress: Progress,
              stored: Callable[[bytes], bool] | None = None,
              splits: Sequence[Split] = (), compress: bool = False) -> WrittenSet:  # fmt: skip
    """Validates ``models`` and writes every group into one pack.

    ``progress(1)`` is called once per model queued for writing. With ``stored`` (is a
    blob in the store?), tensors equal across a group's models are stored once
    (``plan_shared``), and a row blob the store holds already is not written again: the
    models of a group with a tensor of ``SHARE_MIN`` bytes or more are held until the
    set is read. The others stream: each batch is written while the next models are
    validated. A group of one model shares the tensors a split of ``splits`` names
    where the store holds them as a row blob of one row (an update's new fine-tune of
    a family whose backbone an earlier version shared)."""
    grouper = Grouper()
    names: list[str] = []
    with ThreadPoolExecutor(1, thread_name_prefix="mmcore-hash") as hp, \
            ThreadPoolExecutor(1, thread_name_prefix="mmcore-write") as wp, gc_paused():  # fmt: skip
        sw = _SetWriter(writer, hp, wp, compress)
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
                return _assemble(sw, grouper.schemas, models.order)
            # A group with a tensor that may be shared (where ``stored`` is given) is held
            # until the set is read; the others stream.
            by_group: dict[int, list[tuple[int, ModelEntry]]] = {}
            first: dict[int, int] = {}  # a set's group: its records' writer group
            for entry in iter_models(models):
                gi = grouper.group_of(entry)
                schema = grouper.schemas[gi]
                if gi not in first and gi not in by_group:
                    if stored is not None and any(s.nbytes >= SHARE_MIN for s in schema.tensors):
                        by_group[gi] = []
                    else:
                        first[gi] = len(sw.groups)
                if gi in first:
                    sw.add(first[gi], schema, len(names), entry)
                else:
                    held = by_group[gi]
                    held.append((len(names), entry))
                    if len(held) == SHARE_LOOK and not _repeated(schema, [e for _, e in held]):
                        first[gi] = len(sw.groups)  # none of the first few share: it streams
                        for index, e in by_group.pop(gi):
                            sw.add(first[gi], schema, index, e)
                names.append(entry.name)
                progress(1)
            _refuse_empty(names)
            shares: dict[int, tuple[_Plan, int | bytes]] = {}
            rows_at: dict[bytes, int] = {}  # row blobs this save writes: their writer group
            for gi, members in sorted(by_group.items()):
                assert stored is not None  # (only then are groups held)
                schema = grouper.schemas[gi]
                first[gi] = len(sw.groups)
                plan = plan_shared(schema, [e for _, e in members])
                known: bytes | None = None  # a row blob the store holds for a lone model
                if plan is None and len(members) == 1:
                    found = _stored_split(schema, members[0][1], splits, stored)
                    if found is not None:
                        plan, known = found
                if plan is None:
                    for index, entry in members:
                        sw.add(first[gi], schema, index, entry)
                    continue
                inline = unshared(len(schema.tensors), plan.tensors)
                record, row = split_schema(schema, plan.tensors)
                for index, entry in members:
                    sw.add(first[gi], record, index, _part(entry, inline))
                if known is not None:
                    shares[gi] = (plan, known)
                    continue
                rows = [_part(members[i][1], plan.tensors) for i in plan.firsts]
                key = _row_key(row, rows)
                if key in rows_at:  # another architecture's group of this set has them
                    shares[gi] = (plan, rows_at[key])
                    continue
                if stored(key):  # the store holds these rows: referenced, not written
                    shares[gi] = (plan, key)
                    continue
                row_at = rows_at[key] = len(sw.groups)
                shares[gi] = (plan, row_at)
                for r, entry in enumerate(rows):
                    sw.add(row_at, row, r, entry)
            return _assemble(sw, grouper.schemas, names, first, shares)
        finally:
            for f in sw.futures:  # never leave a job touching freed sources
                f.cancel() or f.exception()


def _assemble(sw: _SetWriter, schemas: list[Schema], names: list[str],
              at: dict[int, int] | None = None,
              shares: dict[int, tuple[_Plan, int | bytes]] | None = None) -> WrittenSet:  # fmt: skip
    """The set's groups and blobs once written: group ``gi``'s records in writer group
    ``at[gi]`` (default ``gi``), its shared tensors' rows in the writer group or the
    stored blob ``shares`` names."""
    written = sw.finish()
    records: list[GroupRecord] = []
    blobs: list[tuple[bytes, ContentRecord | None]] = []
    for gi, schema in enumerate(schemas):
        own = written[gi if at is None else at[gi]]
        members = None if len(schemas) == 1 else own.members
        blobs.append((own.key, own.rec))
        shared = None
        if shares is not None and gi in shares:
            plan, rows = shares[gi]
            if isinstance(rows, bytes):
                key, rec = rows, None
            else:
                key, rec = written[rows].key, written[rows].rec
            blobs.append((key, rec))
            shared = SharedTensors(plan.tensors, len(plan.firsts), key, plan.rows)
        records.append(GroupRecord(schema, len(own.members), own.key, members, shared=shared))
    logical = sum(g.count * sum(s.nbytes for s in g.schema.tensors) for g in records)
    coded = sum(len(g.members) * g.schema.stride - sum(n for _, n, _ in g.chunks)
                for g in sw.groups if g.coder is not None)  # fmt: skip
    return WrittenSet(names, records, blobs, logical, sw.end, coded)


def _stored_split(schema: Schema, entry: ModelEntry, splits: Sequence[Split],
                  stored: Callable[[bytes], bool]) -> tuple[_Plan, bytes] | None:  # fmt: skip
    """A split of ``splits`` for ``schema`` whose tensors of ``entry`` the store holds
    as a row blob of one row: its plan (one row) and the blob's key."""
    layout = schema.layout_key()
    for key_of, tensors in splits:
        if key_of != layout or not tensors or tensors[-1] >= len(schema.tensors):
            continue
        key = _row_key(split_schema(schema, tensors)[1], [_part(entry, tensors)])
        if stored(key):
            return _Plan(list(tensors), [0], [0]), key
    return None


def _row_key(schema: Schema, rows: list[ModelEntry]) -> bytes:
    """The content key of a row blob, from its rows' hashes (hashed here, before it is
    written: a row blob the store holds is not written again)."""
    ptrs = kernels.int64_table([p for e in rows for p in e.ptrs])
    lens = kernels.int64_table([s.nbytes for s in schema.tensors]).repeat(len(rows))
    return blob_key(schema, len(rows), kernels.blake3_segments(ptrs, lens))


def _refuse_empty(names: list[str]) -> None:
    if not names:
        from ..errors import InvalidModelSetError

        raise InvalidModelSetError("the model set is empty: pass at least one model")
