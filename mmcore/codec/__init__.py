"""Payload codecs of update versions (docs/FORMAT.md, "Update versions").

A changed model is stored as one *model blob*: the encodings of its changed
tensors, one after another, then compressed as one zstd frame (``ZSTD``) or,
when that would not be smaller than the tensors' raw bytes, the raw bytes of
the changed tensors themselves (``NONE``). Each tensor's entry says how it is
stored: unchanged (nothing), raw, xor-planes or quantized (the kernels'
self-describing encodings, mmcore.kernels.delta).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..errors import IntegrityError

# Compression of a model blob.
NONE = 0
ZSTD = 1

# How one tensor of a changed model is stored.
SAME = 0  # equal to the parent's tensor: no bytes
RAW = 1  # the tensor's bytes
XOR = 2  # xor-planes encoding against the parent's recovered tensor
QUANT = 3  # quantized encoding against the parent's recovered tensor

ZSTD_LEVEL = 3
_THREADS = 2


def _zstd() -> object:
    import zstandard

    return zstandard


def compress_many(blobs: Sequence[bytes | memoryview]) -> list[bytes]:
    """One zstd frame per blob, on a small thread pool (zstandard releases the GIL)."""
    zstandard = _zstd()
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # type: ignore[attr-defined]
    if len(blobs) < 64:
        return [compressor.compress(b) for b in blobs]
    # ZstdCompressor objects are not thread-safe: one per worker, over contiguous slices.
    parts = [blobs[i::_THREADS] for i in range(_THREADS)]

    def work(part: Sequence[bytes | memoryview]) -> list[bytes]:
        own = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # type: ignore[attr-defined]
        return [own.compress(b) for b in part]

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="mmcore-zstd") as pool:
        done = list(pool.map(work, parts))
    out: list[bytes] = [b""] * len(blobs)
    for i, part in enumerate(done):
        out[i::_THREADS] = part
    return out


_local = (
    threading.local()
)  # one decompression context per thread: making one costs more than a small frame


def decompress(frame: bytes | bytearray | memoryview, plain_length: int, what: str) -> bytes:
    """The plain bytes of one zstd frame, which must be exactly ``plain_length`` long."""
    zstandard = _zstd()
    context = getattr(_local, "decompressor", None)
    if context is None:
        context = _local.decompressor = zstandard.ZstdDecompressor()  # type: ignore[attr-defined]
    try:
        plain = context.decompress(frame, max_output_size=plain_length)
    except zstandard.ZstdError as exc:  # type: ignore[attr-defined]
        raise IntegrityError(f"{what}: the compressed payload is damaged ({exc})") from None
    if len(plain) != plain_length:
        raise IntegrityError(
            f"{what}: the payload decompresses to {len(plain)} bytes, not the {plain_length} recorded"
        )
    return bytes(plain)
