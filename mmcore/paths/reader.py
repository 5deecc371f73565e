"""Reading blobs back: whole groups, single models, and verification.

Each extent of a group is mapped (or read) as one buffer; its tensors are views
of that buffer, built in C++ by ``unbind``. When hashes are checked, a reader
thread hashes the bytes while this thread builds the views.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .. import dtypes, kernels
from .._gc import gc_paused
from ..codec import device as device_codec
from ..codec import records
from ..codec.records import segment_table
from ..errors import CorruptRecordError, IntegrityError, StoreError
from ..manifest import ContentRecord, GroupRecord, Manifest, unshared
from ..modelset import Schema
from ..record import DAMAGED
from ..stacked import Stack, StackedSet
from ..store.packs import MIN_MAP_BYTES, PayloadTier

StateDict = dict[str, torch.Tensor]

# Bytes of records brought in and handed to the hashing thread at a time: from a cold
# page cache the disk read of one piece overlaps the hashing of the one before.
HASH_PIECE = 16 << 20


def _first_mismatch(computed: torch.Tensor, stored: torch.Tensor) -> int | None:
    if torch.equal(computed, stored):
        return None
    bad = (computed != stored).any(dim=1).nonzero()
    return int(bad[0, 0])


def record_columns(buf: torch.Tensor, schema: Schema, count: int) -> dict[str, torch.Tensor]:
    """Per tensor of the schema, a [count, *shape] strided view of ``buf`` (count records
    of ``stride`` bytes, model after model): the models' tensors, stacked, no copy."""
    rows = buf.view(count, schema.stride) if schema.stride else buf.new_empty((count, 0))
    columns = {}
    for spec in schema.tensors:
        dtype = dtypes.from_name(spec.dtype)
        if not spec.nbytes:  # no bytes to view (and a 0-wide byte column cannot change dtype)
            columns[spec.name] = buf.new_empty((count, *spec.shape), dtype=dtype)
            continue
        col = rows[:, spec.offset : spec.offset + spec.nbytes]
        if dtype != torch.uint8:
            col = col.view(dtype)
        columns[spec.name] = col.view((count, *spec.shape))
    return columns


def record_views(buf: torch.Tensor, schema: Schema, count: int) -> list[StateDict]:
    """count state dicts whose tensors are views of ``buf`` (count x stride bytes)."""
    with gc_paused():
        columns = [col.unbind(0) for col in record_columns(buf, schema, count).values()]
        names = [spec.name for spec in schema.tensors]
        if not names:
            return [{} for _ in range(count)]
        return [dict(zip(names, row)) for row in zip(*columns)]


def _hash_piece(buf: torch.Tensor, ptrs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """The hashes of segments inside ``buf``. ``buf`` is an argument so that the queued
    job holds the mapping: it stays while it is read even if the caller has gone (an
    error while the job waited)."""
    return kernels.blake3_segments(ptrs, lens)


# A tier that reads over a network keeps pages of hash tables it read (for one model's
# load, the page around its hashes): a process loading model after model of a set then
# needs one request per model, its bytes. Pages never change (packs are immutable).
HASH_PAGE = 64 << 10
HASH_PAGES_KEPT = 256  # at most 16 MiB


class BlobReader:
    def __init__(self, tier: PayloadTier, content: Callable[[bytes], ContentRecord]) -> None:
        self.tier = tier
        self.content = content
        self._hash_pages: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()

    def _hash_ranges(self, rec: ContentRecord, positions: list[int], nbytes: int,
                     stored: torch.Tensor) -> tuple[list[tuple[int, int, int]], Callable[[], None]]:  # fmt: skip
        """The reads that bring the hashes of the models at ``positions`` (``nbytes``
        each) into ``stored``, and what copies them there once read: directly, or, for
        a tier without local files, through the kept pages of the hash table."""
        base = stored.data_ptr()
        if self.tier.local_files:
            return [(rec.hashes_offset + pos * nbytes, nbytes, base + i * nbytes)
                    for i, pos in enumerate(positions)], lambda: None  # fmt: skip
        pages: dict[int, torch.Tensor] = {}
        reads = []
        for pos in positions:
            first = pos * nbytes // HASH_PAGE
            last = ((pos + 1) * nbytes - 1) // HASH_PAGE
            for page in range(first, last + 1):
                key = (rec.pack, rec.hashes_offset, page)
                if page in pages:
                    continue
                kept = self._hash_pages.get(key)
                if kept is not None:
                    self._hash_pages.move_to_end(key)
                    pages[page] = kept
                    continue
                size = min(HASH_PAGE, rec.hashes_length - page * HASH_PAGE)
                pages[page] = buf = torch.empty(size, dtype=torch.uint8)
                reads.append((rec.hashes_offset + page * HASH_PAGE, size, buf.data_ptr()))

        def place() -> None:
            flat = stored.view(-1)
            for page, buf in pages.items():
                self._hash_pages[(rec.pack, rec.hashes_offset, page)] = buf
            while len(self._hash_pages) > HASH_PAGES_KEPT:
                self._hash_pages.popitem(last=False)
            for i, pos in enumerate(positions):
                at = pos * nbytes
                while at < (pos + 1) * nbytes:
                    page, off = divmod(at, HASH_PAGE)
                    n = min(HASH_PAGE - off, (pos + 1) * nbytes - at)
                    dst = i * nbytes + at - pos * nbytes
                    flat[dst : dst + n] = pages[page][off : off + n]
                    at += n

        return reads, place

    def _check(
        self,
        manifest: Manifest,
        group: GroupRecord,
        computed: torch.Tensor,
        stored: torch.Tensor,
        first_pos: int = 0,
        rows: bool = False,
    ) -> None:
        """Raises IntegrityError naming the first model and tensor whose hashes differ:
        ``computed`` and ``stored`` hold the group blob's records from ``first_pos`` on
        (or, with ``rows``, its row blob's rows: the first model of that row is named)."""
        bad = _first_mismatch(computed, stored)
        if bad is None:
            return
        schema = group.row_schema if rows else group.record_schema
        pos, ti = divmod(bad, len(schema.tensors))
        at = first_pos + pos
        if rows:
            assert group.shared is not None
            at = group.shared.rows.index(at) if at in group.shared.rows else 0
        model = (
            group.names[at] if group.names is not None else manifest.models[group.positions()[at]]
        )
        tensor = schema.tensors[ti].name
        raise IntegrityError(
            f"version {manifest.id}: model {model!r}, tensor {tensor!r} does not match its "
            "recorded BLAKE3 hash: the stored bytes are corrupted",
            model=model,
            tensor=tensor,
        )

    def group_content(self, manifest: Manifest, group: GroupRecord) -> ContentRecord:
        """The content record of a group's blob, checked against the group before any of
        it is used: its extents hold exactly the group's models, each at an offset its
        tensors can be viewed from, its hash table one hash per tensor of each model, and
        all of it lies inside the pack (nothing is allocated for a damaged length)."""
        return self._blob_content(manifest, group.blob, group.record_schema, group.count, "models")

    def row_content(self, manifest: Manifest, group: GroupRecord) -> ContentRecord:
        """The content record of a group's row blob (``group.shared``), checked as
        ``group_content`` checks the group's."""
        assert group.shared is not None
        return self._blob_content(manifest, group.shared.blob, group.row_schema,
                                  group.shared.count, "rows")  # fmt: skip

    def _blob_content(self, manifest: Manifest, key: bytes, schema: Schema, count: int,
                      what: str) -> ContentRecord:  # fmt: skip
        rec = self.content(key)
        held = rec.held
        want = count * len(schema.tensors) * kernels.HASH_SIZE
        odd = [off for off, _ in rec.extents if off % schema.align]
        problem = ""
        if held != count:
            problem = f"its extents hold {held} {what}, its group {count}"
        elif rec.hashes_length != want:
            problem = f"a hash table of {rec.hashes_length} bytes, not {want} ({count} "
            problem += f"{what} of {len(schema.tensors)} tensors, 32 bytes a tensor)"
        elif odd:
            problem = f"an extent at offset {odd[0]}, not a multiple of align {schema.align}"
        if problem:
            raise CorruptRecordError(
                f"version {manifest.id}: the content record of blob {key.hex()[:16]}: "
                f"{problem}; {DAMAGED}"
            )
        if rec.chunks is not None:
            spans = [(off, length) for off, length, _ in rec.chunks]
        else:
            spans = [(off, n * schema.stride) for off, n in rec.extents]
        self.check_in_pack(rec, [*spans, (rec.hashes_offset, rec.hashes_length)])
        return rec

    def group_hashes(self, manifest: Manifest, group: GroupRecord) -> torch.Tensor:
        """The stored hash of every tensor of every model of the group, model after model
        in schema order ((count x tensors, 32)): where tensors are shared, each model's
        row's hashes put in their places."""
        stored = self.stored_hashes(self.group_content(manifest, group))
        if group.shared is None:
            return stored
        rows = self.stored_hashes(self.row_content(manifest, group))
        n = len(group.schema.tensors)
        out = torch.empty((group.count, n, kernels.HASH_SIZE), dtype=torch.uint8)
        shared = torch.tensor(group.shared.tensors, dtype=torch.int64)
        inline = unshared(n, group.shared.tensors)
        out[:, inline] = stored.view(group.count, len(inline), kernels.HASH_SIZE)
        which = torch.tensor(group.shared.rows, dtype=torch.int64)
        out[:, shared] = rows.view(group.shared.count, len(shared), kernels.HASH_SIZE)[which]
        return out.view(-1, kernels.HASH_SIZE)

    def check_in_pack(self, rec: ContentRecord, spans: list[tuple[int, int]]) -> None:
        """Refuses byte ranges past the end of the pack before a buffer is made for them
        (a damaged length would otherwise be allocated, or mapped)."""
        try:
            size = self.tier.size(rec.pack)
        except StoreError:  # a missing pack: the read that follows says so
            return
        end = max((off + length for off, length in spans if length), default=0)  # 0: no read
        if end > size:
            raise IntegrityError(
                f"pack {rec.pack} is {size} bytes, shorter than the {end} its content record "
                "names: the pack is truncated, or the store's catalog is damaged"
            )

    def stored_hashes(self, rec: ContentRecord) -> torch.Tensor:
        self.check_in_pack(rec, [(rec.hashes_offset, rec.hashes_length)])
        stored = torch.empty(
            (rec.hashes_length // kernels.HASH_SIZE, kernels.HASH_SIZE), dtype=torch.uint8
        )
        self.tier.read_into(rec.pack, rec.hashes_offset, rec.hashes_length, stored.data_ptr())
        return stored

    def _extent_buffers(self, rec: ContentRecord, schema: Schema, *,
                        populate: bool = True) -> list[tuple[torch.Tensor, int]]:  # fmt: skip
        assert rec.chunks is None  # (a coded blob is decoded: _mapped_and_hashed)
        return [
            (self.tier.map_range(rec.pack, off, count * schema.stride, populate=populate), count)
            for off, count in rec.extents
        ]

    def _mapped_and_hashed(
        self, rec: ContentRecord, schema: Schema, pool: ThreadPoolExecutor, verify: bool
    ) -> tuple[
        list[tuple[torch.Tensor, int]], Callable[[], tuple[torch.Tensor, torch.Tensor] | None]
    ]:
        """The extents mapped (a coded blob: its buffer, being decoded), each with its
        record count, and ``done``: it waits for what is still running and gives
        (computed, stored) hashes with ``verify`` (else None). Call it before the bytes
        are used (a coded blob's are not all there before), and the caller's thread can
        build views meanwhile. The pages of a mapped blob are brought in piece by piece
        (``HASH_PIECE`` bytes of whole records) while the pool's thread hashes the
        pieces already in: from a cold page cache the disk read and the hashing overlap
        instead of following each other. Without ``verify`` every page is brought in at
        once. A coded blob is decoded (and with ``verify`` hashed, chunk by chunk) by
        ``ChunkDecode`` on its own threads or the pool's."""
        if rec.chunks is not None:
            computed = torch.empty((rec.held * len(schema.tensors) if verify else 0,
                                    kernels.HASH_SIZE), dtype=torch.uint8)  # fmt: skip
            buf, run = self._decoder(rec, schema, hashes=computed if verify else None)
            wait = run.start(pool)

            def decoded() -> tuple[torch.Tensor, torch.Tensor] | None:
                wait()
                return (computed, self.stored_hashes(rec)) if verify else None

            return [(buf, rec.held)], decoded
        if not verify:
            return self._extent_buffers(rec, schema), lambda: None
        buffers = self._extent_buffers(rec, schema, populate=False)
        per = max(1, HASH_PIECE // max(schema.stride, 1))
        jobs: list[Future[torch.Tensor]] = []
        try:
            for buf, count in buffers:
                for first in range(0, count, per):
                    n = min(per, count - first)
                    self.tier.populate(buf, first * schema.stride, n * schema.stride)
                    ptrs, lens = segment_table(buf.data_ptr() + first * schema.stride, schema, n)
                    jobs.append(pool.submit(_hash_piece, buf, ptrs, lens))
        except BaseException:
            for job in jobs:  # never leave a job reading a mapping that goes away
                job.cancel() or job.exception()
            raise

        def hashes() -> tuple[torch.Tensor, torch.Tensor]:
            assert buffers  # the mapped bytes outlive the hashing
            try:
                parts = [job.result() for job in jobs]
            except BaseException:
                for job in jobs:  # every job done before the mappings can go
                    job.cancel() or job.exception()
                raise
            computed = (
                torch.cat(parts)
                if parts
                else torch.empty((0, kernels.HASH_SIZE), dtype=torch.uint8)
            )
            return computed, self.stored_hashes(rec)

        return buffers, hashes

    def _blob_buffers(self, manifest: Manifest, group: GroupRecord, *, rows: bool, verify: bool,
                      pool: ThreadPoolExecutor) -> list[tuple[torch.Tensor, int]]:  # fmt: skip
        """The extents of the group's blob (or, with ``rows``, its row blob) mapped, each
        with its record count, checked against their hashes with ``verify``."""
        if rows:
            rec, schema = self.row_content(manifest, group), group.row_schema
        else:
            rec, schema = self.group_content(manifest, group), group.record_schema
        buffers, done = self._mapped_and_hashed(rec, schema, pool, verify)
        hashes = done()
        if hashes is not None:
            self._check(manifest, group, *hashes, rows=rows)
        return buffers

    def _blob_buffer(self, manifest: Manifest, group: GroupRecord, *, rows: bool, verify: bool,
                     pool: ThreadPoolExecutor) -> torch.Tensor:  # fmt: skip
        """``_blob_buffers`` as one buffer: one extent mapped (no copy), or all joined."""
        buffers = self._blob_buffers(manifest, group, rows=rows, verify=verify, pool=pool)
        if len(buffers) == 1:
            return buffers[0][0]
        if buffers:
            return torch.cat([b for b, _ in buffers])
        return torch.empty(0, dtype=torch.uint8)

    def read_records(self, manifest: Manifest, group: GroupRecord, *, verify: bool,
                     pool: ThreadPoolExecutor) -> torch.Tensor:  # fmt: skip
        """The group's records as one CPU buffer (count x stride bytes, model after
        model): its one extent mapped (copy-on-write, no copy), or its extents joined;
        where it shares tensors, its records and rows put together (a copy)."""
        buf = self._blob_buffer(manifest, group, rows=False, verify=verify, pool=pool)
        if group.shared is None:
            return buf
        rows = self._blob_buffer(manifest, group, rows=True, verify=verify, pool=pool)
        return whole_records(group, buf, rows)

    def read_group(
        self,
        manifest: Manifest,
        group: GroupRecord,
        *,
        verify: bool,
        device: torch.device,
        pool: ThreadPoolExecutor,
    ) -> list[StateDict]:
        if group.shared is not None:
            rows = self.device_buffer(manifest, group, rows=True, verify=verify, device=device,
                                      pool=pool)  # fmt: skip
            buf = self.device_buffer(manifest, group, rows=False, verify=verify, device=device,
                                     pool=pool)  # fmt: skip
            return shared_views(group, buf, self._own_rows(manifest, group, rows))
        rec = self.group_content(manifest, group)
        schema = group.schema
        if rec.chunks is not None and device_codec.decodes_on(device):
            out = self.device_buffer(manifest, group, rows=False, verify=verify, device=device,
                                     pool=pool)  # fmt: skip
            return record_views(out, schema, group.count)
        on_cpu = device.type == "cpu"
        # hashed (a coded blob: decoded too) on other threads while this one builds views
        buffers, done = self._mapped_and_hashed(rec, schema, pool, verify)
        models: list[StateDict] = []
        try:
            if on_cpu:
                for buf, count in buffers:
                    models.extend(record_views(buf, schema, count))
        finally:
            hashes = done()  # (the bytes are all there only now)
        if hashes is not None:
            self._check(manifest, group, *hashes)
        if not on_cpu:
            for buf, count in buffers:
                models.extend(record_views(buf.to(device), schema, count))
        return models

    def read_model(
        self,
        manifest: Manifest,
        group: GroupRecord,
        pos: int,
        *,
        verify: bool,
        device: torch.device,
    ) -> StateDict:
        return self.read_models(manifest, group, [pos], verify=verify, device=device)[0]

    def read_models(
        self,
        manifest: Manifest,
        group: GroupRecord,
        positions: list[int],
        *,
        verify: bool,
        device: torch.device,
    ) -> list[StateDict]:
        """Some models of a group: each one read into one shared buffer, all hashed by one
        call (and, where they share tensors, each one's row read into another)."""
        buf = self._read_positions(manifest, group, positions, verify=verify, rows=False)
        if group.shared is not None:  # each model's row read into a buffer of its own
            which = [group.shared.rows[p] for p in positions]
            rows = self._read_positions(manifest, group, which, verify=verify, rows=True)
            return shared_views(group, buf.to(device),
                                list(rows.to(device).view(len(which), -1).unbind(0)))  # fmt: skip
        if device.type != "cpu":
            buf = buf.to(device)
        return record_views(buf, group.schema, len(positions))

    def _own_rows(self, manifest: Manifest, group: GroupRecord,
                  rows: torch.Tensor) -> list[torch.Tensor]:  # fmt: skip
        """Per model of the group, a buffer of its row of its own (``rows``: the row
        blob, checked): on a tier with local files the row mapped again, privately (no
        copy: its pages are the page cache's until written), else a copy."""
        assert group.shared is not None
        schema = group.row_schema
        table = rows.view(group.shared.count, schema.stride) if schema.stride else None
        rec = self.row_content(manifest, group)
        on_cpu = rows.device.type == "cpu"
        if (
            table is not None
            and rec.chunks is not None
            and on_cpu
            and schema.stride >= MIN_MAP_BYTES
        ):
            return _private_rows(rows, schema.stride, group.shared.rows)
        mapped = self.tier.local_files and rec.chunks is None and on_cpu
        if table is None or not mapped:
            empty = rows.new_empty(0)
            return [empty if table is None else table[r].clone() for r in group.shared.rows]
        out = []
        for r in group.shared.rows:
            offset, index = rec.locate(r)
            out.append(self.tier.map_range(rec.pack, offset + index * schema.stride, schema.stride))
        return out

    def _read_positions(self, manifest: Manifest, group: GroupRecord, positions: list[int], *,
                        verify: bool, rows: bool) -> torch.Tensor:  # fmt: skip
        """The records at ``positions`` of the group's blob (or rows of its row blob),
        read one after another into one buffer, checked against their hashes."""
        if rows:
            rec, schema = self.row_content(manifest, group), group.row_schema
        else:
            rec, schema = self.group_content(manifest, group), group.record_schema
        k, stride = len(positions), schema.stride
        buf = torch.empty(k * stride, dtype=torch.uint8)
        base = buf.data_ptr()
        ranges: list[tuple[int, int, int]] = []
        decode: Callable[[], None] = lambda: None  # noqa: E731
        if rec.chunks is not None:
            ranges, decode = self._chunk_reads(rec, schema, positions, buf)
        else:
            for i, pos in enumerate(positions):
                extent_offset, index = rec.locate(pos)
                ranges.append((extent_offset + index * stride, stride, base + i * stride))
        ntensors = len(schema.tensors)
        nbytes = ntensors * kernels.HASH_SIZE
        stored = torch.empty((k * ntensors if verify else 0, kernels.HASH_SIZE), dtype=torch.uint8)
        place: Callable[[], None] = lambda: None  # noqa: E731
        if verify and k:
            hashes, place = self._hash_ranges(rec, positions, nbytes, stored)
            ranges += hashes
        self.tier.read_many(rec.pack, ranges)  # (the records and their hashes: one round trip)
        place()
        decode()
        if verify and k:
            computed = kernels.blake3_segments(*segment_table(base, schema, k))
            bad = _first_mismatch(computed, stored)
            if bad is not None:
                i = bad // ntensors
                part = slice(i * ntensors, (i + 1) * ntensors)
                self._check(manifest, group, computed[part], stored[part], first_pos=positions[i],
                            rows=rows)  # fmt: skip
        return buf

    def decoded(self, rec: ContentRecord, schema: Schema, chunk: int | None = None) -> torch.Tensor:
        """A coded blob's records (or those of one of its chunks) decoded into a new
        buffer, on all cores: its chunks mapped where the tier has local files (the
        page cache's pages, no copy), else read in one round trip."""
        out, run = self._decoder(rec, schema, chunk)
        run()
        return out

    def _decoder(self, rec: ContentRecord, schema: Schema, chunk: int | None = None, *,
                 hashes: torch.Tensor | None = None) -> tuple[torch.Tensor, records.ChunkDecode]:  # fmt: skip
        """``decoded``'s buffer, not yet filled, and what fills it (the chunks mapped or
        read already)."""
        assert rec.chunks is not None
        chunks = rec.chunks if chunk is None else [rec.chunks[chunk]]
        out = records.buffer(sum(count for *_, count in chunks) * schema.stride)
        coded, placed = self._coded_chunks(rec, chunks)
        items = [(coded[at : at + length], first, count) for at, length, first, count in placed]
        return out, records.ChunkDecode(schema, items, out, f"a coded blob in pack {rec.pack}",
                                        hashes)  # fmt: skip

    def _coded_chunks(self, rec: ContentRecord, chunks: Sequence[Sequence[int]]
                      ) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:  # fmt: skip
        """The bytes of ``chunks`` (of ``rec``) in one CPU tensor, mapped where the tier
        has local files (the page cache's pages, no copy), else read in one round trip;
        and each chunk as (offset in it, length, first record, record count)."""
        held = [(off, length) for off, length, _ in chunks if length]  # (an empty one: anywhere)
        placed, first = [], 0
        if self.tier.local_files and held:
            lo = min(off for off, _ in held)
            lo -= lo % mmap.ALLOCATIONGRANULARITY
            coded = self.tier.map_range(rec.pack, lo, max(off + n for off, n in held) - lo)
            for offset, length, count in chunks:
                placed.append((offset - lo if length else 0, length, first, count))
                first += count
            return coded, placed
        coded = torch.empty(sum(length for _, length, _ in chunks), dtype=torch.uint8)
        ranges, at = [], 0
        for offset, length, count in chunks:
            ranges.append((offset, length, coded.data_ptr() + at))
            placed.append((at, length, first, count))
            at, first = at + length, first + count
        self.tier.read_many(rec.pack, [r for r in ranges if r[1]])
        return coded, placed

    def device_buffer(self, manifest: Manifest, group: GroupRecord, *, rows: bool, verify: bool,
                      device: torch.device, pool: ThreadPoolExecutor) -> torch.Tensor:  # fmt: skip
        """``_blob_buffer`` on ``device``. A coded blob is decoded there where the device
        decoder runs on it (a CUDA device; the CPU where the tests ask for its
        emulation): its coded bytes cross, not its records, and are hashed there."""
        if rows:
            rec, schema = self.row_content(manifest, group), group.row_schema
            count = group.shared.count if group.shared is not None else 0
        else:
            rec, schema = self.group_content(manifest, group), group.record_schema
            count = group.count
        if rec.chunks is None or not device_codec.decodes_on(device):
            buf = self._blob_buffer(manifest, group, rows=rows, verify=verify, pool=pool)
            return buf.to(device)
        out = torch.empty(count * schema.stride, dtype=torch.uint8, device=device)
        coded, placed = self._coded_chunks(rec, rec.chunks)
        device_codec.decode(schema, coded, placed, out, f"a coded blob in pack {rec.pack}")
        if verify:
            ptrs, lens = segment_table(out.data_ptr(), schema, count)
            self._check(manifest, group, device_codec.hashes(ptrs, lens, device),
                        self.stored_hashes(rec), rows=rows)  # fmt: skip
        return out

    def _chunk_reads(self, rec: ContentRecord, schema: Schema, positions: list[int],
                     buf: torch.Tensor) -> tuple[list[tuple[int, int, int]], Callable[[], None]]:  # fmt: skip
        """The reads of the chunks that hold the records at ``positions``, and what
        decodes them (each chunk once) and copies the records into ``buf``, in order."""
        assert rec.chunks is not None
        stride = schema.stride
        needed: dict[int, tuple[int, list[tuple[int, int]]]] = {}  # chunk: first, (pos, i)
        for i, pos in enumerate(positions):
            ci, first = rec.chunk_of(pos)
            needed.setdefault(ci, (first, []))[1].append((i, pos - first))
        coded = {ci: torch.empty(rec.chunks[ci][1], dtype=torch.uint8) for ci in needed}
        reads = [
            (rec.chunks[ci][0], t.numel(), t.data_ptr()) for ci, t in coded.items() if t.numel()
        ]

        def decode() -> None:
            for ci, (_, wanted) in needed.items():
                count = rec.chunks[ci][2]  # type: ignore[index]
                out = torch.empty(count * stride, dtype=torch.uint8)
                records.decode_chunks(schema, [(coded[ci], 0, count)], out,
                                      f"a coded blob in pack {rec.pack}")  # fmt: skip
                for i, index in wanted:
                    buf[i * stride : (i + 1) * stride] = out[index * stride : (index + 1) * stride]

        return reads, decode

    def verify_group(self, manifest: Manifest, group: GroupRecord) -> None:
        """Re-hashes every byte of the group (its rows too), and checks each hash table
        against its blob key."""
        self._verify_blob(manifest, group, rows=False)
        if group.shared is not None:
            self._verify_blob(manifest, group, rows=True)

    def _verify_blob(self, manifest: Manifest, group: GroupRecord, *, rows: bool) -> None:
        from .baseline import blob_key

        if rows:
            assert group.shared is not None
            rec, schema = self.row_content(manifest, group), group.row_schema
            key, total = group.shared.blob, group.shared.count
        else:
            rec, schema = self.group_content(manifest, group), group.record_schema
            key, total = group.blob, group.count
        stored = self.stored_hashes(rec)
        ntensors = len(schema.tensors)
        stride = schema.stride
        per = max(1, HASH_PIECE // max(stride, 1))  # memory stays bounded: a group is one extent
        first = 0
        for i, (_, _, count) in enumerate(rec.chunks or ()):  # a coded blob: chunk by chunk
            buf = self.decoded(rec, schema, i)
            computed = kernels.blake3_segments(*segment_table(buf.data_ptr(), schema, count))
            part = stored[first * ntensors : (first + count) * ntensors]
            self._check(manifest, group, computed, part, first_pos=first, rows=rows)
            first += count
        for off, count in rec.extents:
            for at in range(0, count, per):
                n = min(per, count - at)
                buf = torch.empty(n * stride, dtype=torch.uint8)
                self.tier.read_into(rec.pack, off + at * stride, buf.numel(), buf.data_ptr())
                ptrs, lens = segment_table(buf.data_ptr(), schema, n)
                part = stored[first * ntensors : (first + n) * ntensors]
                computed = kernels.blake3_segments(ptrs, lens)
                self._check(manifest, group, computed, part, first_pos=first, rows=rows)
                first += n
        if blob_key(schema, total, stored) != key:
            raise IntegrityError(
                f"version {manifest.id}: the hash table of a blob in pack {rec.pack} does not "
                "match its content address: the stored hashes are corrupted"
            )


def _private_rows(rows: torch.Tensor, stride: int, which: list[int]) -> list[torch.Tensor]:
    """Per entry of ``which``, that row of ``rows`` (decoded, in memory) as a buffer of
    its own without a copy each: the rows copied once into an anonymous file
    (``memfd_create``) and each row mapped from it privately, its pages shared until
    one is written (as a mapped pack's rows are). A copy each where there is no memfd."""
    if not hasattr(os, "memfd_create"):
        table = rows.view(-1, stride)
        return [table[r].clone() for r in which]
    fd = os.memfd_create("mmcore-rows", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, rows.numel())
        with mmap.mmap(fd, rows.numel(), flags=mmap.MAP_SHARED) as shared:
            torch.frombuffer(shared, dtype=torch.uint8).copy_(rows)
        out = []
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        for r in which:
            start = r * stride
            lo = start - start % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(
                fd, start + stride - lo, flags=mmap.MAP_PRIVATE, prot=prot, offset=lo
            )
            out.append(torch.frombuffer(mapped, dtype=torch.uint8)[start - lo :])
        return out
    finally:
        os.close(fd)  # (each mapping keeps the file)


def whole_records(group: GroupRecord, buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The group's records as they are without sharing (count x stride bytes), from its
    blob's records (``buf``) and its rows: each model's row copied into its record."""
    assert group.shared is not None
    schema, count = group.schema, group.count
    out = torch.zeros(count * schema.stride, dtype=torch.uint8).view(count, schema.stride)
    own = buf.view(count, group.record_schema.stride)
    shared = rows.view(group.shared.count, group.row_schema.stride)
    which = torch.tensor(group.shared.rows, dtype=torch.int64)
    places = {s.name: s.offset for s in group.record_schema.tensors}
    row_places = {s.name: s.offset for s in group.row_schema.tensors}
    for spec in schema.tensors:
        span = slice(spec.offset, spec.offset + spec.nbytes)
        if spec.name in places:
            at = places[spec.name]
            out[:, span] = own[:, at : at + spec.nbytes]
        else:
            at = row_places[spec.name]
            out[:, span] = shared[which, at : at + spec.nbytes]
    return out.view(-1)


class LooseState(dict[str, torch.Tensor]):
    """A state whose tensors are not views of one model record of its schema: assembled
    tensor by tensor (recovery's deltas), or of a group that shares tensors."""


def shared_views(
    group: GroupRecord, buf: torch.Tensor, rows: list[torch.Tensor]
) -> list[StateDict]:
    """The state dicts of records ``buf`` (of the group's record schema), each with its
    own row buffer (``rows``, one per record): its own tensors views of ``buf``, its
    shared ones views of its row (no two models share memory: a change of one is its
    own)."""
    own = record_views(buf, group.record_schema, len(rows))
    names = [spec.name for spec in group.schema.tensors]
    out: list[StateDict] = []
    for sd, row in zip(own, rows):
        shared = record_views(row, group.row_schema, 1)[0]
        out.append(LooseState({n: sd[n] if n in sd else shared[n] for n in names}))
    return out


def stacked_groups(reader: BlobReader, manifest: Manifest, *, verify: bool, device: torch.device,
                   pool: ThreadPoolExecutor) -> StackedSet:  # fmt: skip
    """The groups of a baseline manifest (or a dataset's) as stacks."""
    stacks = []
    for group in manifest.groups:
        names = [manifest.models[i] for i in group.positions()]
        if group.shared is not None:
            stacks.append(_shared_stack(reader, manifest, group, names, verify, device, pool))
            continue
        if device_codec.decodes_on(device):  # (a coded blob decoded there)
            buf = reader.device_buffer(manifest, group, rows=False, verify=verify, device=device,
                                       pool=pool)  # fmt: skip
        else:
            buf = reader.read_records(manifest, group, verify=verify, pool=pool)
        stacks.append(stack_of(names, buf, group.schema, device))
    return StackedSet(stacks, manifest.models)


def _shared_stack(reader: BlobReader, manifest: Manifest, group: GroupRecord, names: list[str],
                  verify: bool, device: torch.device, pool: ThreadPoolExecutor) -> Stack:  # fmt: skip
    """A group that shares tensors as a stack: its own tensors viewed in its records (no
    copy), a shared tensor one model's row expanded where every model has that row, else
    gathered (a copy)."""
    assert group.shared is not None
    buf = reader.device_buffer(manifest, group, rows=False, verify=verify, device=device, pool=pool)
    rows = reader.device_buffer(manifest, group, rows=True, verify=verify, device=device, pool=pool)
    own = record_columns(buf, group.record_schema, group.count)
    if group.shared.count == 1:
        shared = {n: c.expand(group.count, *c.shape[1:])
                  for n, c in record_columns(rows, group.row_schema, 1).items()}  # fmt: skip
    else:  # the rows' bytes gathered model by model
        which = torch.tensor(group.shared.rows, dtype=torch.int64, device=device)
        stride = group.row_schema.stride
        gathered = rows.view(group.shared.count, stride)[which].view(-1)
        shared = record_columns(gathered, group.row_schema, group.count)
    return Stack(names, {s.name: own[s.name] if s.name in own else shared[s.name]
                         for s in group.schema.tensors})  # fmt: skip


def stack_of(names: list[str], buf: torch.Tensor, schema: Schema, device: torch.device) -> Stack:
    """The stack viewing ``buf`` (records of ``schema``), moved to ``device`` in one copy."""
    stack = Stack(names, record_columns(buf, schema, len(names)), records=(buf, schema))
    return stack.to(device)
