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


def compress_nvcomp(buf: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """The format on the GPU: every chunk of every span in one batched nvCOMP Zstd
    encode on ``buf``'s device and current stream, the compressed chunks packed
    together there (one gather), then one copy of them to the host."""
    from nvidia import nvcomp

    from ..kernels import cuda

    offsets, sizes, counts = chunks(spans, buf.numel())
    if not offsets:
        return [b""] * len(spans)
    device = buf.device
    stream = torch.cuda.current_stream(device)
    handle = int(stream.cuda_stream)
    codec: Any = nvcomp.Codec(
        algorithm="Zstd",
        bitstream_kind=nvcomp.BitstreamKind.RAW,
        device_id=device.index or 0,
        cuda_stream=handle,
    )
    align = max(ALIGN, int(codec.get_required_compression_alignment()))
    bound = int(codec.get_max_comp_buffer_size(nvcomp.as_array(buf[: min(CHUNK, buf.numel())])))
    stride = -(-bound // align) * align
    slots = torch.empty(stride * len(offsets), dtype=torch.uint8, device=device)
    out = nvcomp.as_arrays(
        slots, [i * stride for i in range(len(offsets))], [stride] * len(offsets), handle
    )
    done = codec.encode(nvcomp.as_arrays(buf, offsets, sizes, handle), out=out)
    got = [int(n) for n in done.buffer_sizes]  # waits for the encode
    packed = torch.empty(sum(got), dtype=torch.uint8, device=device)
    cuda.gather_addresses(packed, [slots.data_ptr() + i * stride for i in range(len(got))], got)
    from ..kernels import tensor_bytes

    return _split(tensor_bytes(packed.cpu()), got, counts)


def for_device(device: torch.device | None) -> Compressor | None:
    """The compressor of model blobs that live on ``device``: nvCOMP on a CUDA
    device where it is installed, else None (the blobs go to the host and are
    compressed there as one frame each)."""
    if device is None or device.type != "cuda" or not nvcomp_available():
        return None
    return compress_nvcomp
