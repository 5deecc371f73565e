"""Whole-model compression: a group's records coded as byte planes, chunk by chunk
(docs/FORMAT.md, "Coded blobs").

A *chunk* holds ``count`` consecutive records of a schema. Its tensors are sorted by
element width (8, 4, 2, 1 bytes: a complex number's parts, a float's whole exponent in
one plane); per width, the bytes of every tensor of that width in every record of the
chunk, record after record, tensor after tensor in record order, form one stream,
coded by ``kernels.compress_planes`` (each plane Huffman- or rANS-coded, or raw where
coding does not pay). A chunk is a u32 length per stream followed by the streams. The
bytes of a record no tensor covers are zero, as in any record, and not stored.

Decoding writes each stream straight into the records where they are one stream (every
tensor of one width, no gap: a float32 model), else into a scratch buffer that is then
scattered into the records; chunks are decoded on all cores.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import kernels
from .._native import core
from ..errors import IntegrityError
from ..modelset import Schema

# Plain bytes a writer puts in one chunk (at least one record): small enough that a
# single model of a small-model set decodes with a few of its neighbours only, large
# enough that each plane's frequency table is a small share of its block.
CHUNK_BYTES = 1 << 20

# Element width of each dtype's stream: a complex number as its two real parts.
WIDTH = {
    "float64": 8,
    "int64": 8,
    "uint64": 8,
    "complex128": 8,
    "float32": 4,
    "int32": 4,
    "uint32": 4,
    "complex64": 4,
    "float16": 2,
    "bfloat16": 2,
    "int16": 2,
    "uint16": 2,
    "complex32": 2,
}  # fmt: skip   (every other dtype: 1)
_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def width_of(dtype: str) -> int:
    return WIDTH.get(dtype, 1)


def _starts(lens: torch.Tensor) -> torch.Tensor:
    """Where each of segments of ``lens`` bytes, laid end to end, starts."""
    return torch.cumsum(lens, 0) - lens


class _Stream:
    """The tensors of one width in a record: each tensor (for the encoder, one segment
    per tensor) and the runs of adjacent ones (the decoder's segments), as tables of
    lengths and of where each starts in the record's share of the stream; built once
    per schema, not per chunk."""

    def __init__(self, width: int, tensors: list[int], nbytes: list[int],
                 runs: list[tuple[int, int]]) -> None:  # fmt: skip
        self.width = width
        self.tensors = tensors  # schema indices, in record order
        self.per_record = sum(nbytes)  # stream bytes one record holds
        self.tensor_lens = kernels.int64_table(nbytes)
        self.tensor_starts = _starts(self.tensor_lens)
        self.runs = runs  # (record offset, length), in record order
        self.run_offsets = kernels.int64_table([o for o, _ in runs])
        self.run_lens = kernels.int64_table([n for _, n in runs])
        self.run_starts = _starts(self.run_lens)

    def scatter_table(self, count: int, stride: int, records: int,
                      decoded: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The scatter of ``count`` records' share of this stream, decoded from offset
        ``decoded`` on, into their records (``stride`` bytes each, from address or offset
        ``records`` on): each run's destination, length and offset in the stream."""
        rows = torch.arange(count, dtype=torch.int64).unsqueeze(1)
        dsts = (rows * stride + self.run_offsets + records).reshape(-1)
        srcs = (rows * self.per_record + self.run_starts + decoded).reshape(-1)
        return dsts, self.run_lens.repeat(count), srcs


class Layout:
    """How records of ``schema`` are coded: its streams, in decreasing width."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        by_width: dict[int, list[int]] = {}
        order = sorted(range(len(schema.tensors)), key=lambda i: schema.tensors[i].offset)
        for i in order:
            spec = schema.tensors[i]
            if spec.nbytes:
                by_width.setdefault(width_of(spec.dtype), []).append(i)
        self.streams = []
        for width in sorted(by_width, reverse=True):
            runs: list[tuple[int, int]] = []
            for i in by_width[width]:
                spec = schema.tensors[i]
                if runs and runs[-1][0] + runs[-1][1] == spec.offset:
                    runs[-1] = (runs[-1][0], runs[-1][1] + spec.nbytes)
                else:
                    runs.append((spec.offset, spec.nbytes))
            nbytes = [schema.tensors[i].nbytes for i in by_width[width]]
            self.streams.append(_Stream(width, by_width[width], nbytes, runs))
        covered = sum(s.per_record for s in self.streams)
        # one stream that is each record whole: decoded straight into the records
        self.direct = len(self.streams) == 1 and covered == schema.stride
        gaps, at = [], 0  # bytes no tensor covers, (offset, length) in a record: zeroed on decode
        for offset, length in sorted(run for s in self.streams for run in s.runs):
            if offset > at:
                gaps.append((at, offset - at))
            at = max(at, offset + length)
        if at < schema.stride:
            gaps.append((at, schema.stride - at))
        self.gaps = bool(gaps)
        self.gap_offsets = kernels.int64_table([o for o, _ in gaps])
        self.gap_lens = kernels.int64_table([n for _, n in gaps])

    def records_per_chunk(self) -> int:
        return max(1, CHUNK_BYTES // max(self.schema.stride, 1))

    # -- encoding ---------------------------------------------------------------
    def encode(self, ptrs: torch.Tensor, count: int, threads: int = 0) -> torch.Tensor:
        """The chunk of ``count`` records whose tensors are at ``ptrs`` (int64 addresses,
        record after record in schema order), as a uint8 tensor."""
        n = len(self.schema.tensors)
        table = ptrs.view(count, n) if n else ptrs.view(count, 0)
        coded = []
        for s in self.streams:
            rows = torch.arange(count, dtype=torch.int64).mul_(s.per_record).unsqueeze(1)
            stream = torch.empty(count * s.per_record, dtype=torch.uint8)
            kernels.gather(stream, table[:, s.tensors].reshape(-1).contiguous(),
                           s.tensor_lens.repeat(count), (rows + s.tensor_starts).reshape(-1),
                           threads=1)  # fmt: skip
            coded.append(kernels.compress_planes(stream.view(_INT[s.width]), threads=threads))
        head = struct.pack(f"<{len(coded)}I", *(c.numel() for c in coded))
        return (
            torch.cat([kernels.bytes_tensor(head), *coded])
            if coded
            else torch.empty(0, dtype=torch.uint8)
        )

    # -- decoding ---------------------------------------------------------------
    def stream_lengths(self, chunk: torch.Tensor, what: str) -> tuple[int, ...]:
        """The lengths of a chunk's streams (uint8 CPU bytes, as ``encode`` wrote them),
        checked to add up to the chunk; IntegrityError where they do not."""
        k = len(self.streams)
        if chunk.numel() < 4 * k:
            raise IntegrityError(f"{what}: {chunk.numel()} bytes cannot hold its stream lengths")
        lengths = struct.unpack(f"<{k}I", kernels.tensor_bytes(chunk[: 4 * k]))
        if 4 * k + sum(lengths) != chunk.numel():
            raise IntegrityError(
                f"{what}: its streams' lengths add up to {4 * k + sum(lengths)} bytes, "
                f"not its {chunk.numel()}; the stored bytes are corrupted"
            )
        return lengths

    def decode(self, chunk: torch.Tensor, out: torch.Tensor, count: int, threads: int = 0,
               what: str = "a coded chunk",
               scratch: Callable[[int], torch.Tensor] | None = None) -> None:  # fmt: skip
        """Decodes ``chunk`` (uint8, as ``encode`` wrote it) into ``out``: ``count``
        records, ``count * stride`` contiguous bytes. IntegrityError where the chunk
        does not hold exactly those records. ``scratch(n)`` gives the buffer a stream
        is decoded into before it is scattered (default: a new one each time)."""
        lengths = self.stream_lengths(chunk, what)
        stride = self.schema.stride
        if self.gaps:
            out.zero_()
        at = 4 * len(self.streams)
        for s, length in zip(self.streams, lengths):
            stream = chunk[at : at + length]
            at += length
            if self.direct:
                _decode(stream, out, threads, what)
                continue
            n = count * s.per_record
            into = torch.empty(n, dtype=torch.uint8) if scratch is None else scratch(n)
            _decode(stream, into, threads, what)
            kernels.scatter(into, *s.scatter_table(count, stride, out.data_ptr(), 0), threads=1)


def _decode(stream: torch.Tensor, out: torch.Tensor, threads: int, what: str) -> None:
    try:
        kernels.decompress_planes(stream, out, threads=threads)
    except IntegrityError as exc:
        raise IntegrityError(f"{what}: {exc}") from None


_layouts: dict[tuple[object, ...], Layout] = {}


def layout_of(schema: Schema) -> Layout:
    """The (cached) layout of a schema."""
    key = schema.layout_key()
    got = _layouts.get(key)
    if got is None:
        if len(_layouts) > 256:
            _layouts.clear()
        got = _layouts[key] = Layout(schema)
    return got


# A decoded buffer this large comes from the cache of released ones (``buffer_cache``):
# it is written without page faults when one fits.
LARGE_BYTES = 32 << 20
_cache_env = "MMCORE_BUFFER_CACHE"
_cache_set = False


def buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes``: where it is large, a decode
    buffer, from the cache of released ones where one fits (no page faults: a fresh
    one's pages are zeroed by the kernel as they are first written), else
    ``torch.empty``."""
    if nbytes < LARGE_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    if not _cache_set:
        buffer_cache()
    return torch.frombuffer(core().decode_buffer(nbytes), dtype=torch.uint8)


def buffer_cache(limit: int | None = None) -> dict[str, int]:
    """The cache of released decode buffers: ``limit`` (bytes of idle buffers kept at
    most; default an eighth of physical memory, at most 1 GiB, or the environment's
    ``MMCORE_BUFFER_CACHE``; 0 keeps none), ``idle_bytes`` and ``idle_buffers``. Sets
    the limit first where one is given. A buffer goes back to the cache when the last
    tensor over it is freed; meanwhile its pages are the kernel's to reclaim under
    memory pressure (MADV_FREE)."""
    global _cache_set
    if limit is None and not _cache_set:
        text = os.environ.get(_cache_env, "").strip()
        if text:
            try:
                limit = int(text)
            except ValueError:
                raise ValueError(f"{_cache_env} must be a number of bytes, got {text!r}") from None
    if limit is not None and limit < 0:
        raise ValueError(f"a buffer cache limit must be >= 0 bytes, got {limit}")
    got = core().decode_buffer_cache(-1 if limit is None else limit)
    _cache_set = True
    return dict(zip(("limit", "idle_bytes", "idle_buffers"), got, strict=True))


def cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def decode_chunks(schema: Schema, chunks: Sequence[tuple[torch.Tensor, int, int]],
                  out: torch.Tensor, what: str,
                  then: Callable[[int, int, int], None] | None = None) -> None:  # fmt: skip
    """Decodes chunks given as (bytes, first record, record count) into ``out`` (the
    records of the blob from record 0), on all cores: chunks side by side where there
    are enough of them, else each one's blocks. ``then(first, count, threads)`` runs
    on each chunk's records as soon as they are decoded, on the same thread (hashing
    them while they are in its cache)."""
    layout = layout_of(schema)
    stride = schema.stride
    workers = cores()
    kept: dict[int, torch.Tensor] = {}  # per thread, its scratch buffer, for this call only

    def scratch(n: int) -> torch.Tensor:
        buf = kept.get(threading.get_ident())
        if buf is None or buf.numel() < n:  # (faulted in once per thread, not per chunk)
            buf = kept[threading.get_ident()] = buffer(n)
        return buf[:n]

    def one(item: tuple[torch.Tensor, int, int], threads: int) -> None:
        chunk, first, count = item
        layout.decode(chunk, out[first * stride : (first + count) * stride], count, threads,
                      what, scratch)  # fmt: skip
        if then is not None:
            then(first, count, threads)

    if len(chunks) < 2 or workers == 1:
        for item in chunks:
            one(item, 0)
        return
    with ThreadPoolExecutor(min(workers, len(chunks)), thread_name_prefix="mmcore-decode") as pool:
        for f in [pool.submit(one, item, 1) for item in chunks]:
            f.result()


class ChunkDecode:
    """``decode_chunks`` prepared, with each chunk's tensors hashed into ``hashes``
    (where given: a row per tensor of each record from record 0, 32 bytes each) as soon
    as the chunk is decoded: call it to run it here, or ``start`` it and call what that
    returns to wait for it (and have its error raised).

    Two chunks or more are decoded (and hashed) by one native job on threads of its own
    (``planes_decode_chunks_start``), started by one call: it takes no GIL from start to
    end, so the thread that builds the views meanwhile never waits for a decoder, nor a
    decoder for it, and waiting makes that thread a worker too. Each stream goes into
    its runs in the records (each block straight into its run where one run holds it,
    else through scratch), the gaps no tensor covers are zeroed, then the chunk is
    hashed. A single chunk (or one whose stream lengths are damaged) is decoded as
    ``decode_chunks`` does (on ``start``'s pool, if given)."""

    def __init__(self, schema: Schema, chunks: Sequence[tuple[torch.Tensor, int, int]],
                 out: torch.Tensor, what: str, hashes: torch.Tensor | None = None) -> None:  # fmt: skip
        layout = layout_of(schema)
        stride = schema.stride
        n = len(schema.tensors) if hashes is not None else 0  # (no segments: nothing hashed)
        self.schema, self.chunks, self.what = schema, chunks, what
        self.out, self.hashes = out, hashes
        rows: list[tuple[int, int, int, int]] = []  # per chunk
        streams: list[tuple[int, int, int, int, int]] = []  # per stream of each chunk
        runs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (addresses, lengths) per stream
        held = 0  # runs so far
        for chunk, first, count in chunks if len(chunks) > 1 else ():
            try:
                lengths = layout.stream_lengths(chunk, what)
            except IntegrityError:  # (the chunk-by-chunk path raises it, in chunk order)
                rows.clear()
                break
            base = out.data_ptr() + first * stride
            at = chunk.data_ptr() + 4 * len(layout.streams)
            rows.append((len(streams), len(layout.streams) + layout.gaps, first * n, count * n))
            for s, length in zip(layout.streams, lengths, strict=True):
                if layout.direct:  # one run: the records
                    dsts, lens = kernels.int64_table([base]), kernels.int64_table([count * stride])
                else:
                    dsts, lens, _ = s.scatter_table(count, stride, base, 0)
                streams.append((at, length, count * s.per_record, held, dsts.numel()))
                runs.append((dsts, lens))
                held, at = held + dsts.numel(), at + length
            if layout.gaps:  # zeros
                rec = torch.arange(count, dtype=torch.int64).mul_(stride).add_(base).unsqueeze(1)
                dsts = (rec + layout.gap_offsets).reshape(-1)
                lens = layout.gap_lens.repeat(count)
                streams.append((0, 0, int(lens.sum()), held, dsts.numel()))
                runs.append((dsts, lens))
                held += dsts.numel()
        self.native: tuple[torch.Tensor, ...] | None = None
        if rows:
            records = sum(count for _, _, count in chunks)
            if (max(first + count for _, first, count in chunks) > records
                    or out.numel() < records * stride):  # fmt: skip
                raise ValueError("chunks that are not the records of out")
            if hashes is not None and (hashes.shape != (records * n, kernels.HASH_SIZE)
                                       or not hashes.is_contiguous()):  # fmt: skip
                raise ValueError(f"hashes must be a contiguous ({records * n}, 32) uint8 tensor")
            ptrs, lens = segment_table(out.data_ptr(), schema, records if n else 0)
            run_table = torch.stack([torch.cat([d for d, _ in runs]),
                                     torch.cat([ln for _, ln in runs])], 1).contiguous()  # fmt: skip
            self.native = (kernels.int64_table([v for row in rows for v in row]).view(-1, 4),
                           kernels.int64_table([v for row in streams for v in row]),
                           run_table, ptrs, lens)  # fmt: skip

    def __call__(self) -> None:
        self.start()()

    def start(self, pool: ThreadPoolExecutor | None = None) -> Callable[[], None]:
        if self.native is None:
            if pool is None:
                self._chunk_by_chunk()
                return lambda: None
            job = pool.submit(self._chunk_by_chunk)
            return job.result
        table, streams, runs, ptrs, lens = self.native
        keep = (self.native, self.chunks, self.out, self.hashes)  # held by the job until it ends
        hashes = self.hashes.data_ptr() if self.hashes is not None else 0
        native = core().planes_decode_chunks_start(
            table.data_ptr(), table.shape[0], streams.data_ptr(), runs.data_ptr(),
            ptrs.data_ptr(), lens.data_ptr(), hashes, cores(), keep)  # fmt: skip
        what = self.what

        def wait() -> None:
            try:
                native.wait()
            except ValueError as exc:
                raise IntegrityError(f"{what}: {exc}: the stored bytes are corrupted") from None

        return wait

    def _chunk_by_chunk(self) -> None:
        schema, out, hashes = self.schema, self.out, self.hashes
        stride, n = schema.stride, len(schema.tensors)
        then = None
        if hashes is not None:

            def then(first: int, count: int, threads: int) -> None:
                ptrs, lens = segment_table(out.data_ptr() + first * stride, schema, count)
                kernels.blake3_segments(ptrs, lens, out=hashes[first * n : (first + count) * n],
                                        threads=threads)  # fmt: skip

        decode_chunks(schema, self.chunks, out, self.what, then)


def segment_table(base: int, schema: Schema, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Address (or, from base 0, offset) and length of every tensor of ``count`` records."""
    offsets = kernels.int64_table([s.offset for s in schema.tensors])
    lens = kernels.int64_table([s.nbytes for s in schema.tensors])
    rows = torch.arange(count, dtype=torch.int64).mul_(schema.stride).add_(base).unsqueeze(1)
    return (rows + offsets.unsqueeze(0)).reshape(-1), lens.repeat(count)
