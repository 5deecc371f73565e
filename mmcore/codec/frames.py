"""Model blobs compressed as a run of standard zstd frames, each of at most
``CHUNK`` plain bytes, concatenated (codec ``ZSTD_FRAMES``, docs/FORMAT.md).

This is what a GPU writes: nvCOMP compresses the chunks of every model blob of an
update in one batched call on the device (``RAW`` bitstreams, which are plain zstd
frames), so only compressed bytes cross to the host. Any zstd decoder reads the
result: :func:`mmcore.codec.decompress_frames` on a machine without a GPU.

:func:`compress_cpu` writes the same format with the ``zstandard`` package: the
reference the tests hold the device path to, and the benchmark's CPU peer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError

CHUNK = 1 << 16  # plain bytes per frame: nvCOMP's default chunk
ALIGN = 16  # every blob starts this aligned in the device buffer (nvCOMP's inputs)

# (buffer, spans) -> one bytes object per span: the frames of its bytes.
Compressor = Callable[[torch.Tensor, Sequence[tuple[int, int]]], list[bytes]]


def chunks(
    spans: Sequence[tuple[int, int]], size: int | None = None
) -> tuple[list[int], list[int], list[int]]:
    """(offsets, sizes, chunks per span) of the frames of each (offset, length) span
    (each checked to lie inside a buffer of ``size`` bytes, when given)."""
    offsets, sizes, counts = [], [], []
    for i, (start, length) in enumerate(spans):
        if start < 0 or length < 0 or (size is not None and start + length > size):
            raise InvalidArgumentError(
                f"span {i} (bytes {start} to {start + length}) ends past the buffer's {size} bytes"
                if size is not None and start >= 0 and length >= 0
                else f"span {i} has a negative start or length: ({start}, {length})"
            )
        n = 0
        for at in range(0, length, CHUNK):
            offsets.append(start + at)
            sizes.append(min(CHUNK, length - at))
            n += 1
        counts.append(n)
    return offsets, sizes, counts


def _split(data: bytes, sizes: Sequence[int], counts: Sequence[int]) -> list[bytes]:
    """The frames of each span, from every frame's bytes laid end to end."""
    out, at, k = [], 0, 0
    for n in counts:
        length = sum(sizes[k : k + n])
        out.append(data[at : at + length])
        at += length
        k += n
    return out


def compress_cpu(
    buf: torch.Tensor, spans: Sequence[tuple[int, int]], level: int = 3
) -> list[bytes]:
    """The format with the ``zstandard`` package (CPU bytes of ``buf``)."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level)
    from ..kernels import tensor_view

    data = tensor_view(buf)
    offsets, sizes, counts = chunks(spans, buf.numel())
    frames = [compressor.compress(data[o : o + s]) for o, s in zip(offsets, sizes)]
    return _split(b"".join(frames), [len(f) for f in frames], counts)


def nvcomp_available() -> bool:
    """nvCOMP's Python package (the ``gpu`` extra) imports; MMCORE_NVCOMP=0 turns it off."""
    if os.environ.get("MMCORE_NVCOMP", "1") == "0":
        return False
    try:
        from nvidia import nvcomp  # noqa: F401
    except Exception:  # not installed, or its libraries do not load
        return False
    return True


BATCH_CHUNKS = 4096  # chunks per nvCOMP call (256 MiB of input): bounds its output slots


def compress_nvcomp(buf: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """The format on the GPU: the chunks of every span, BATCH_CHUNKS at a time, in
    one batched nvCOMP Zstd encode each, the compressed chunks packed together on
    the device (one gather) and copied to the host. Runs on a side stream of its
    own that waits for the caller's (nvCOMP takes stream 0 for "make your own"),
    and returns once everything is on the host. nvCOMP allocates its scratch
    memory itself, outside torch's caching allocator."""
    offsets, sizes, counts = chunks(spans, buf.numel())
    if not offsets:
        return [b""] * len(spans)
    device = buf.device
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        parts = [
            _nvcomp_batch(buf, offsets[i : i + BATCH_CHUNKS], sizes[i : i + BATCH_CHUNKS], side)
            for i in range(0, len(offsets), BATCH_CHUNKS)
        ]
    data = b"".join(d for d, _ in parts)
    return _split(data, [n for _, got in parts for n in got], counts)


def _nvcomp_batch(buf: torch.Tensor, offsets: list[int], sizes: list[int],
                  stream: torch.cuda.Stream) -> tuple[bytes, list[int]]:  # fmt: skip
    """One nvCOMP call: the compressed chunks' bytes back to back, and their sizes."""
    from nvidia import nvcomp

    from ..kernels import cuda, tensor_bytes

    device = buf.device
    handle = int(stream.cuda_stream)
    codec: Any = nvcomp.Codec(
        algorithm="Zstd",
        bitstream_kind=nvcomp.BitstreamKind.RAW,  # plain zstd frames, one per entry
        uncomp_chunk_size=CHUNK,  # no entry is split: one frame each
        device_id=device.index or 0,
        cuda_stream=handle,
    )
    align = max(ALIGN, int(codec.get_required_compression_alignment()))
    bound = int(codec.get_max_comp_buffer_size(nvcomp.as_array(buf[: max(sizes)], handle)))
    stride = -(-bound // align) * align
    slots = torch.empty(stride * len(offsets), dtype=torch.uint8, device=device)
    out = nvcomp.as_arrays(
        slots, [i * stride for i in range(len(offsets))], [stride] * len(offsets), handle
    )
    done = codec.encode(nvcomp.as_arrays(buf, offsets, sizes, handle), out=out)
    got = [int(n) for n in done.buffer_sizes]  # waits for the encode
    packed = torch.empty(sum(got), dtype=torch.uint8, device=device)
    cuda.gather_addresses(packed, [slots.data_ptr() + i * stride for i in range(len(got))], got)
    return tensor_bytes(packed.cpu()), got


def for_device(device: torch.device | None) -> Compressor | None:
    """The compressor of model blobs that live on ``device``: nvCOMP on a CUDA
    device where it is installed, else None (the blobs go to the host and are
    compressed there as one frame each)."""
    if device is None or device.type != "cuda" or not nvcomp_available():
        return None
    return compress_nvcomp
