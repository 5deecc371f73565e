"""Payload codecs of update versions (docs/FORMAT.md, "Update versions").

A changed model is stored as one *model blob*: the encodings of its changed
tensors, one after another, then compressed as one zstd frame (``ZSTD``), as
frames of 64 KiB chunks when a GPU compressed it (``ZSTD_FRAMES``, see
:mod:`mmcore.codec.frames`) or, when that would not be smaller than the
tensors' raw bytes, the raw bytes of the changed tensors themselves
(``NONE``). Each tensor's entry says how it is stored: unchanged (nothing), raw,
xor-planes or quantized (the kernels' self-describing encodings,
mmcore.kernels.delta).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Union

from ..errors import IntegrityError

# Compression of a model blob.
NONE = 0
ZSTD = 1
ZSTD_FRAMES = 2  # zstd frames of at most 64 KiB plain each, concatenated (written on a GPU)

# How one tensor of a changed model is stored.
SAME = 0  # equal to the parent's tensor: no bytes
RAW = 1  # the tensor's bytes
XOR = 2  # xor-planes encoding against the parent's recovered tensor
QUANT = 3  # quantized encoding against the parent's recovered tensor

# Level 1: on xor-planes encodings about as small as level 3's (their random low-
# mantissa planes do not compress at any level; the zero and exponent planes do at
# every level) and faster: on ResNet-18 all-layer fine-tune deltas, 28.9% of the input
# at 0.48 GB/s against 28.5% at 0.34 GB/s (one thread, this project's 2-core machine).
ZSTD_LEVEL = 1
_THREADS = 2
_MT_BYTES = 8 << 20  # a frame this large is compressed by zstd's own worker threads

Buffer = Union[bytes, bytearray, memoryview]


def _zstd() -> object:
    import zstandard

    return zstandard


def _frame(compressor: Any, pieces: Sequence[Buffer]) -> bytes:
    """One frame of ``pieces`` as if concatenated (streamed: no copy joins them)."""
    if len(pieces) == 1:
        return bytes(compressor.compress(pieces[0]))
    stream = compressor.compressobj(size=sum(memoryview(p).nbytes for p in pieces))
    out = [stream.compress(p) for p in pieces]
    out.append(stream.flush())
    return b"".join(out)


def compress_many(blobs: Sequence[Sequence[Buffer]]) -> list[bytes]:
    """One zstd frame per blob, a blob given as its pieces (compressed as if
    concatenated). Many blobs are split over a small thread pool (zstandard releases
    the GIL); a few large ones are each compressed by zstd's own worker threads."""
    zstandard: Any = _zstd()
    if len(blobs) < 64:
        large = sum(memoryview(p).nbytes for b in blobs for p in b) >= _MT_BYTES
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=_THREADS if large else 0)
        return [_frame(compressor, b) for b in blobs]
    # ZstdCompressor objects are not thread-safe: one per worker, over contiguous slices.
    parts = [blobs[i::_THREADS] for i in range(_THREADS)]

    def work(part: Sequence[Sequence[Buffer]]) -> list[bytes]:
        own = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return [_frame(own, b) for b in part]

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="mmcore-zstd") as pool:
        done = list(pool.map(work, parts))
    out: list[bytes] = [b""] * len(blobs)
    for i, part in enumerate(done):
        out[i::_THREADS] = part
    return out


def compress_segments(parts: Sequence[tuple[Buffer, bytes]]) -> tuple[list[memoryview], Any]:
    """One zstd frame per segment of every part: a part is a buffer and its segments
    as (offset, length) pairs of little-endian u64 (bytes). Compressed by zstd's own
    worker threads, with no Python step per segment. Returns the frames in order (as
    views) and the object they live in, which the caller holds while it reads them."""
    zstandard: Any = _zstd()
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    if not hasattr(compressor, "multi_compress_to_buffer"):  # a backend without it (cffi)
        blobs: list[list[Buffer]] = []
        for data, segments in parts:
            view = memoryview(data).cast("B")
            pairs = memoryview(segments).cast("Q")
            blobs.extend(
                [view[pairs[i] : pairs[i] + pairs[i + 1]]] for i in range(0, len(pairs), 2)
            )
        return [memoryview(f) for f in compress_many(blobs)], None
    if not parts:
        return [], None
    collection = zstandard.BufferWithSegmentsCollection(
        *(zstandard.BufferWithSegments(data, segments) for data, segments in parts)
    )
    out = compressor.multi_compress_to_buffer(collection, threads=_THREADS)
    return [memoryview(out[i]) for i in range(len(out))], out


_local = (
    threading.local()
)  # one decompression context per thread: making one costs more than a small frame

# No zstd input yields more than this many plain bytes per byte: a block holds at most
# 128 KiB, and the densest block (RLE) takes 4 bytes of input.
MAX_RATIO = 1 << 15
_STEP = 1 << 20  # plain bytes produced per streamed read


def _damaged(what: str, exc: Exception) -> IntegrityError:
    return IntegrityError(f"{what}: the compressed payload is damaged ({exc})")


def _check_bound(data: Buffer, plain_length: int, what: str) -> None:
    """A recorded length no zstd input of this size can produce is refused before any
    buffer of that length is made."""
    if plain_length > memoryview(data).nbytes * MAX_RATIO:
        raise IntegrityError(
            f"{what}: {memoryview(data).nbytes} compressed bytes cannot hold the "
            f"{plain_length} recorded"
        )


def _streamed(data: Buffer, plain_length: int, what: str, *, across: bool) -> bytes:
    """Decodes ``data`` a step at a time and stops once it passes ``plain_length``:
    neither the output nor zstd's window grows past what the record allows, whatever
    sizes the (possibly damaged) frame headers declare."""
    zstandard: Any = _zstd()
    # A frame never needs a window larger than its content. The 8 MiB floor admits the
    # window of every zstd level up to 19 for a writer that did not shrink it to a small
    # content (zstd checks the declared window, not what the frame then uses).
    window = 1 << max(23, min(31, (plain_length - 1).bit_length()))
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(
            data, read_across_frames=across
        )
        while len(out) <= plain_length:
            piece = reader.read(min(_STEP, plain_length + 1 - len(out)))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as exc:
        raise _damaged(what, exc) from None
    if len(out) > plain_length:
        raise IntegrityError(
            f"{what}: the payload decompresses to more than the {plain_length} bytes recorded"
        )
    return bytes(out)


def decompress_segments(
    data: Buffer, segments: bytes, sizes: bytes
) -> tuple[list[memoryview], Any] | None:
    """The plain bytes of one zstd frame per segment of ``data`` (segments as (offset,
    length) pairs of little-endian u64), each exactly its size in ``sizes`` (u64 each):
    decoded by zstd's own worker threads into buffers of those sizes, with no Python
    step per frame. Returns the plain blobs (views) and what holds them; or None where
    any frame fails (damaged, or another size) or the backend lacks the call: the
    caller then decodes frame by frame, which names what is wrong."""
    zstandard: Any = _zstd()
    context = zstandard.ZstdDecompressor()
    if not hasattr(context, "multi_decompress_to_buffer"):
        return None
    try:
        out = context.multi_decompress_to_buffer(
            zstandard.BufferWithSegments(data, segments), decompressed_sizes=sizes, threads=_THREADS
        )
    except zstandard.ZstdError:
        return None
    return [memoryview(out[i]) for i in range(len(out))], out


def _check_length(plain: Buffer, plain_length: int, what: str) -> None:
    got = memoryview(plain).nbytes
    if got != plain_length:
        raise IntegrityError(
            f"{what}: the payload decompresses to {got} bytes, not the {plain_length} recorded"
        )


def decompress(frame: bytes | bytearray | memoryview, plain_length: int, what: str) -> bytes:
    """The plain bytes of one zstd frame, which must be exactly ``plain_length`` long.
    The size a frame header declares is checked before anything is decoded (zstd
    allocates it at once); a frame that declares none is decoded in bounded steps."""
    zstandard = _zstd()
    _check_bound(frame, plain_length, what)
    try:
        declared = zstandard.frame_content_size(frame)  # type: ignore[attr-defined]
    except zstandard.ZstdError as exc:  # type: ignore[attr-defined]
        raise _damaged(what, exc) from None
    if declared < 0:  # not in the header
        plain = _streamed(frame, plain_length, what, across=False)
        _check_length(plain, plain_length, what)
        return plain
    if declared != plain_length:
        raise IntegrityError(
            f"{what}: the compressed payload declares {declared} bytes, not the "
            f"{plain_length} recorded"
        )
    context = getattr(_local, "decompressor", None)
    if context is None:
        context = _local.decompressor = zstandard.ZstdDecompressor()  # type: ignore[attr-defined]
    try:
        plain = context.decompress(frame, max_output_size=plain_length)
    except zstandard.ZstdError as exc:  # type: ignore[attr-defined]
        raise _damaged(what, exc) from None
    _check_length(plain, plain_length, what)
    return bytes(plain)


def decompress_frames(data: bytes | bytearray | memoryview, plain_length: int, what: str) -> bytes:
    """The plain bytes of concatenated zstd frames (``ZSTD_FRAMES``), which must be
    exactly ``plain_length`` long. Decoded in bounded steps, so damaged input that
    would expand past the recorded length stops there."""
    _check_bound(data, plain_length, what)
    plain = _streamed(data, plain_length, what, across=True)
    _check_length(plain, plain_length, what)
    return plain


def plain_bytes(
    data: bytes | bytearray | memoryview, codec: int, plain_length: int, what: str
) -> bytes:
    """A stored model blob's plain bytes, by its codec byte."""
    if codec == ZSTD:
        return decompress(data, plain_length, what)
    if codec == ZSTD_FRAMES:
        return decompress_frames(data, plain_length, what)
    if codec == NONE:
        return bytes(data)
    raise IntegrityError(f"{what}: unknown codec {codec} for the model blob (known: 0, 1, 2)")
