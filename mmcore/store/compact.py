"""Compaction: packs that are mostly dead are rewritten with only their live bytes.

A pack is written by one save and holds that save's new blobs; when some of
them lose their last reference (their version deleted, others still used by a
version that deduplicated them), the pack's dead bytes stay until gc. This
rewrites such a pack: every live blob's byte ranges are copied into a new pack
(group extents and hash tables each; a delta blob's model blobs, table and
hashes as one span, its records' pack offsets then fixed by the content
record's ``shift``), the new pack is made durable, ONE WriteBatch points every
moved content record at it and swaps the pack records, and only then is the old
pack unlinked. A crash before the commit leaves the new pack unreferenced, after
it the old one: either is deleted by the next gc.

With ``compress`` (``gc(compress=True)``), every pack holding a group blob stored plain
is rewritten too, and those blobs are coded on the way (docs/FORMAT.md, "Coded blobs"):
their records are read extent by extent, coded chunk by chunk, and each chunk is
decoded again and compared with the records it came from before it is written, so a
rewrite never replaces bytes with a coding that does not give them back. Their hash
tables and content addresses stay: a coded blob is the same blob.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..codec import records
from ..errors import IntegrityError
from ..manifest import ContentRecord, DatasetRecord, Manifest, pack_record
from ..modelset import Schema
from ..paths.delta_blob import MODEL
from .packs import HEADER_SIZE, SECTION_ALIGN, PackWriter, align_up

if TYPE_CHECKING:
    from ..storage import Storage

_CHUNK = 32 << 20  # bytes copied per read/write
_FIRST = HEADER_SIZE  # where a rewritten pack's first blob goes (the tests move it)
# Hash tables, and a delta blob's span (which keeps its table and hashes where they were
# relative to its start, so it moves by multiples of this).
_ALIGN = 64


@dataclass
class _Live:
    key: bytes
    rec: ContentRecord
    kind: str  # "group", "delta" or "roots"
    ranges: list[tuple[int, int]]  # (pack offset, length) to copy
    extents: int = 0  # how many of the first ranges are group extents
    schema: Schema | None = None  # a group blob's records'

    @property
    def plain(self) -> bool:
        """A group blob stored plain that has bytes to code."""
        return (self.kind == "group" and self.rec.chunks is None and self.schema is not None
                and self.schema.stride > 0 and self.rec.held > 0)  # fmt: skip


Kinds = tuple[dict[bytes, Schema], dict[bytes, int], set[bytes]]


def blob_kinds(manifests: Iterable[Manifest], datasets: Iterable[DatasetRecord]) -> Kinds:
    """What each blob these versions and datasets reference is: group blobs' record
    schemas, delta blobs' model counts, provenance roots tables."""
    schemas: dict[bytes, Schema] = {}
    deltas: dict[bytes, int] = {}
    roots: set[bytes] = set()
    for m in manifests:
        for g in m.groups:
            schemas[g.blob] = g.record_schema
            if g.shared is not None:
                schemas[g.shared.blob] = g.row_schema
        if m.update is not None and m.update.delta_blob is not None:
            deltas[m.update.delta_blob] = len(m.update.changed)
        if m.provenance is not None:
            roots.add(m.provenance.hashes_blob)
    for ds in datasets:
        for g in ds.groups:
            schemas[g.blob] = g.schema
    return schemas, deltas, roots


def _owners(store: Storage) -> Kinds:
    return blob_kinds((Manifest.decode(raw) for _, raw in store.catalog.scan("manifests")),
                      (DatasetRecord.decode(raw) for _, raw in store.catalog.scan("datasets")))  # fmt: skip


def live_item(store: Storage, key: bytes, rec: ContentRecord, kinds: Kinds) -> _Live | None:
    """A blob and the byte ranges that hold it (None: of no kind ``kinds`` names)."""
    schemas, deltas, roots = kinds
    if key in deltas and rec.table is not None:
        return _Live(key, rec, "delta", [_delta_span(store, rec, deltas[key])])
    if key in schemas and rec.chunks is not None:  # a coded blob: its chunks, packed
        spans = [(off, length) for off, length, _ in rec.chunks]
        return _Live(key, rec, "group", [*spans, (rec.hashes_offset, rec.hashes_length)],
                     schema=schemas[key])  # fmt: skip
    if key in schemas and rec.table is None:
        spans = [(off, count * schemas[key].stride) for off, count in rec.extents]
        return _Live(key, rec, "group", [*spans, (rec.hashes_offset, rec.hashes_length)],
                     len(spans), schemas[key])  # fmt: skip
    if key in roots and not rec.extents and rec.table is None:
        return _Live(key, rec, "roots", [(rec.hashes_offset, rec.hashes_length)])
    return None


def _delta_span(store: Storage, rec: ContentRecord, models: int) -> tuple[int, int]:
    """The bytes of a delta blob: from its first model blob to the end of its hashes."""
    assert rec.table is not None
    start = rec.table[0]
    if models:
        head = bytearray(MODEL.size * models)
        store.tier.read_into(
            rec.pack, rec.table[0], len(head), torch.frombuffer(head, dtype=torch.uint8).data_ptr()
        )
        start = min(start, *(row[0] + rec.shift for row in struct.iter_unpack(MODEL.format, head)))
    return start, rec.hashes_offset + rec.hashes_length - start


def plan(store: Storage) -> dict[str, list[_Live]]:
    """Per pack, its live blobs and their byte ranges; None for a pack holding a blob
    nothing here can place (then the pack is left alone)."""
    kinds = _owners(store)
    packs: dict[str, list[_Live] | None] = {}
    for key, raw in store.catalog.scan("content"):
        rec = ContentRecord.decode(raw)
        items = packs.setdefault(rec.pack, [])
        if items is None:
            continue
        live = live_item(store, key, rec, kinds)
        if live is None:
            packs[rec.pack] = None
            continue
        items.append(live)
    return {pack: items for pack, items in packs.items() if items is not None}


def copy_range(
    store: Storage, pack: str, offset: int, length: int, writer: PackWriter, to: int
) -> None:
    """``length`` bytes at ``offset`` of ``store``'s ``pack`` to ``to`` in ``writer``
    (a pack of this store or, for ``mmcore.transfer``, of another)."""
    buf = torch.empty(min(length, _CHUNK), dtype=torch.uint8)
    done = 0
    while done < length:
        n = min(_CHUNK, length - done)
        store.tier.read_into(pack, offset + done, n, buf.data_ptr())
        writer.write_ptr(buf.data_ptr(), n, to + done)
        done += n


def relocated(item: _Live, moved: dict[int, int], pack: str) -> ContentRecord:
    rec = item.rec
    if item.kind == "delta":
        start = item.ranges[0][0]
        d = moved[start] - start
        assert rec.table is not None
        return replace(rec, pack=pack, table=(rec.table[0] + d, rec.table[1]),
                       hashes_offset=rec.hashes_offset + d, shift=rec.shift + d)  # fmt: skip
    extents = [[moved[off], count] for off, count in rec.extents]
    chunks = None if rec.chunks is None else [[moved[off], n, c] for off, n, c in rec.chunks]
    return replace(rec, pack=pack, extents=extents, chunks=chunks,
                   hashes_offset=moved[rec.hashes_offset])  # fmt: skip


def layout(items: list[_Live]) -> tuple[list[tuple[_Live, list[int]]], int]:
    """Where each live blob's ranges go in a rewritten pack (per blob, in pack order,
    the new offset of each of its ranges), and where the rewritten pack ends. Laid out
    as the writers lay a pack out: every group extent first, each on a page of its own
    (FORMAT.md promises that alignment: load maps it), then every other range (hashes,
    delta blobs) 64-byte aligned; so a pack whose bytes are all live is rewritten no
    larger than it was."""
    ordered = sorted(items, key=lambda i: min(off for off, _ in i.ranges))
    targets = [[0] * len(item.ranges) for item in ordered]
    at = _FIRST
    for extents in (True, False):
        for item, mine in zip(ordered, targets):
            for i, (_, length) in enumerate(item.ranges):
                if (i < item.extents) != extents:
                    continue
                place = align_up(at, SECTION_ALIGN if extents else _ALIGN)
                mine[i] = place
                if length:  # (nothing to map or read, as a group of empty tensors: no page)
                    at = place + length
    return list(zip(ordered, targets)), at


def compact(store: Storage, below: float, progress: bool | None = None,
            compress: bool = False) -> int:  # fmt: skip
    """Rewrites every pack whose live bytes, laid out as the rewrite would lay them
    out, are less than ``below`` of its size, and with ``compress`` every pack holding
    a group blob stored plain (coding those blobs); returns the bytes reclaimed."""
    from .._progress import progress_bar

    if below <= 0 and not compress:
        return 0
    todo = []
    for pack, items in plan(store).items():
        size = store.tier.size(pack)
        placed, end = layout(items)
        # Counting the extents' page padding: a pack of small groups, all live, would
        # otherwise look mostly dead, and be rewritten as it is by every gc.
        due = below > 1 or (below > 0 and end - _FIRST < below * (size - HEADER_SIZE))
        plain = (placed, end) if due else None
        live = sum(length for item in items for _, length in item.ranges)
        recode = sorted((item for item in items if compress and item.plain),
                        key=lambda item: item.ranges[0][0])  # fmt: skip
        if recode:  # the others laid out as ever, then each of these coded, then its hashes
            placed_rest, end_rest = layout([item for item in items if not item.plain])
            todo.append((pack, placed_rest, end_rest, recode, size, live, plain))
        elif plain is not None:
            todo.append((pack, *plain, [], size, live, None))
    freed = 0
    total = sum(live for *_, live, _ in todo)
    label = "compressing and compacting packs" if compress else "compacting packs"
    with progress_bar(total, label, progress, min_total=64 << 20) as bar:
        for pack, placed, end, recode, size, live, fallback in todo:
            got = _rewrite(store, pack, placed, end, size, recode)
            if got is None and fallback is not None:  # coding did not pay: compacted plain
                got = _rewrite(store, pack, *fallback, size)
            freed += got or 0
            bar(live)
    return freed


def _rewrite(store: Storage, pack: str, placed: list[tuple[_Live, list[int]]], end: int,
             size: int, recode: Sequence[_Live] = ()) -> int | None:  # fmt: skip
    """One pack's live bytes into a new pack, as ``layout`` placed them (ending at
    ``end``), then each blob of ``recode`` coded, its hashes behind it (the order the
    next compaction's layout keeps, so it never grows the pack); returns the bytes it
    frees, or None (nothing changed) where coding them would not make the pack smaller."""
    writer = store.tier.create()
    try:
        records = []
        copies = []
        for item, targets in placed:
            copies += [(to, offset, length)
                       for (offset, length), to in zip(item.ranges, targets) if length]  # fmt: skip
            moved = {offset: to for (offset, _), to in zip(item.ranges, targets)}
            records.append((item.key, relocated(item, moved, writer.pack_id)))
        for to, offset, length in sorted(copies):  # front to back
            copy_range(store, pack, offset, length, writer, to)
        for item in recode:
            chunks, end = _recode(store, pack, item, writer, end)
            hashes_at = align_up(end, _ALIGN)
            rec = item.rec
            copy_range(store, pack, rec.hashes_offset, rec.hashes_length, writer, hashes_at)
            end = hashes_at + rec.hashes_length
            records.append((item.key, replace(rec, pack=writer.pack_id, extents=[], chunks=chunks,
                                              hashes_offset=hashes_at)))  # fmt: skip
        if recode and end >= size:  # (small models that do not code smaller)
            writer.abort()
            return None
        new_size = writer.finish()
    except BaseException:
        writer.abort()
        raise
    puts = [("content", key, rec.encode()) for key, rec in records]
    puts.append(("packs", writer.pack_id.encode(), pack_record(new_size, time.time())))
    store.catalog.commit(puts, [("packs", pack.encode())])  # from here the old pack is garbage
    store.delta_tables.clear()  # parsed with the old offsets
    store.tier.delete(pack)
    return size - new_size


def _recode(store: Storage, pack: str, item: _Live, writer: PackWriter,
            at: int) -> tuple[list[list[int]], int]:  # fmt: skip
    """A plain group blob's records (its extents in ``pack``) coded chunk by chunk into
    ``writer`` from ``at`` on, each chunk decoded again and compared with its records
    first (IntegrityError, and nothing written, where they differ); its chunks and where
    they end."""
    schema = item.schema
    assert schema is not None
    stride = schema.stride
    coder = records.layout_of(schema)
    per = coder.records_per_chunk()
    buf = torch.empty(per * stride, dtype=torch.uint8)
    back = torch.empty(per * stride, dtype=torch.uint8)
    chunks: list[list[int]] = []
    for offset, count in item.rec.extents:
        for first in range(0, count, per):
            k = min(per, count - first)
            n = k * stride
            store.tier.read_into(pack, offset + first * stride, n, buf.data_ptr())
            chunk = coder.encode(records.segment_table(buf.data_ptr(), schema, k)[0], k)
            what = f"pack {pack}: a blob's records {first} to {first + k} of an extent"
            coder.decode(chunk, back[:n], k, what=what)
            if not torch.equal(back[:n], buf[:n]):
                raise IntegrityError(f"{what} do not decode back to themselves when coded "
                                     "(bytes between tensors not zero?); nothing was rewritten")  # fmt: skip
            place = align_up(at, _ALIGN)
            if chunk.numel():
                writer.write_ptr(chunk.data_ptr(), chunk.numel(), place)
            chunks.append([place, chunk.numel(), k])
            at = place + chunk.numel()
    return chunks, at
