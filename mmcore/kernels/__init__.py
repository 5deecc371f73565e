"""Kernel dispatch: validates in Python, then calls the native module.

Native entry points take raw addresses; the helpers here build the address
tables from tensors so the rest of mmcore never handles pointers directly.
``reference`` holds the pure implementations the tests use as oracles.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import torch

from .._native import core
from ..errors import InvalidArgumentError

HASH_SIZE = 32


def int64_table(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """An int64 tensor of ``values``: from a list through an ``array.array`` (a
    quarter of the time ``torch.tensor`` takes per element: tables of 800,000
    addresses are built per save)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.int64).contiguous()
    packed = array.array("q", values)
    if not packed:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(packed, dtype=torch.int64)  # (holds ``packed``)


def _check_cpu_bytes(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu":
        raise InvalidArgumentError(f"{what} must be on the CPU, got device {t.device}")
    if not t.is_contiguous():
        raise InvalidArgumentError(f"{what} must be contiguous")


def blake3_segments(
    ptrs: torch.Tensor, lens: torch.Tensor, *, out: torch.Tensor | None = None, threads: int = 0
) -> torch.Tensor:
    """BLAKE3-256 of each (address, length) segment; returns a (n, 32) uint8 tensor.

    The caller keeps the memory behind every address alive for the call.
    """
    if ptrs.dtype != torch.int64 or lens.dtype != torch.int64 or ptrs.shape != lens.shape:
        raise InvalidArgumentError("ptrs and lens must be int64 tensors of one shape")
    _check_cpu_bytes(ptrs, "ptrs")
    _check_cpu_bytes(lens, "lens")
    n = ptrs.numel()
    if out is None:
        out = torch.empty((n, HASH_SIZE), dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.numel() != n * HASH_SIZE or not out.is_contiguous():
        raise InvalidArgumentError(
            f"out must be a contiguous uint8 tensor of {n * HASH_SIZE} bytes"
        )
    if n:
        core().blake3_segments(ptrs.data_ptr(), lens.data_ptr(), n, out.data_ptr(), threads)
    return out


def blake3_tensors(tensors: Sequence[torch.Tensor], *, threads: int = 0) -> torch.Tensor:
    """BLAKE3-256 of the raw bytes of each tensor, as a (n, 32) uint8 tensor.

    CUDA tensors (all on one device, contiguous) are hashed on that device when
    the CUDA kernels are built, and the result stays there; anything else is
    hashed on the CPU. Both give the same bytes.
    """
    if tensors and all(t.is_cuda and t.is_contiguous() for t in tensors):
        from . import cuda

        if cuda.available() and len({t.device for t in tensors}) == 1:
            return cuda.blake3_segments(tensors)
    keep = [t.detach().to("cpu").contiguous() for t in tensors]
    ptrs = int64_table([t.data_ptr() for t in keep])
    lens = int64_table([t.numel() * t.element_size() for t in keep])
    return blake3_segments(ptrs, lens, threads=threads)


def bytes_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A uint8 CPU tensor holding a copy of ``data``."""
    out = torch.empty(len(data), dtype=torch.uint8)
    if len(data):
        out.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return out


def blake3_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3-256 of a bytes-like object (used for small metadata records)."""
    return hash_rows_to_bytes(blake3_tensors([bytes_tensor(data)]))[0]


def hash_rows_to_bytes(hashes: torch.Tensor) -> list[bytes]:
    """Splits a (n, 32) hash tensor into n bytes objects."""
    flat = tensor_bytes(hashes)
    return [flat[i : i + HASH_SIZE] for i in range(0, len(flat), HASH_SIZE)]


def _check_copy_tables(
    buf: torch.Tensor, name: str, ptrs: torch.Tensor, lens: torch.Tensor, offsets: torch.Tensor
) -> int:
    """Validates a gather/scatter table against the contiguous buffer; returns its length."""
    _check_cpu_bytes(buf, name)
    n = ptrs.numel()
    if not (ptrs.dtype == lens.dtype == offsets.dtype == torch.int64):
        raise InvalidArgumentError("ptrs, lens and offsets must be int64 tensors")
    if not (lens.numel() == offsets.numel() == n):
        raise InvalidArgumentError("ptrs, lens and offsets must have the same length")
    if n and (int(offsets.min()) < 0 or int(lens.min()) < 0):
        raise InvalidArgumentError("offsets and lens must not be negative")
    if n and int((offsets + lens).max()) > buf.numel() * buf.element_size():
        raise InvalidArgumentError(f"a segment would end past the end of {name}")
    return n


def gather(
    dst: torch.Tensor,
    ptrs: torch.Tensor,
    lens: torch.Tensor,
    offsets: torch.Tensor,
    *,
    threads: int = 0,
) -> None:
    """Copies segment i (address ptrs[i], lens[i] bytes) to dst at byte offsets[i]."""
    n = _check_copy_tables(dst, "dst", ptrs, lens, offsets)
    if n:
        core().gather(
            dst.data_ptr(), ptrs.data_ptr(), lens.data_ptr(), offsets.data_ptr(), n, threads
        )


def gather_tensors(dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """Copies each contiguous tensor's bytes into ``dst`` (uint8) at ``offsets``, where
    ``dst`` is: one launch of the CUDA gather for a CUDA ``dst``, else the CPU's."""
    if dst.is_cuda:
        from . import cuda

        cuda.gather(dst, srcs, offsets)
        return
    gather(dst, int64_table([t.data_ptr() for t in srcs]),
           int64_table([t.numel() * t.element_size() for t in srcs]), int64_table(list(offsets)))  # fmt: skip


def scatter(
    src: torch.Tensor,
    ptrs: torch.Tensor,
    lens: torch.Tensor,
    offsets: torch.Tensor,
    *,
    threads: int = 0,
) -> None:
    """Copies src bytes at offsets[i] (lens[i] bytes) to address ptrs[i]."""
    n = _check_copy_tables(src, "src", ptrs, lens, offsets)
    if n:
        core().scatter(
            src.data_ptr(), ptrs.data_ptr(), lens.data_ptr(), offsets.data_ptr(), n, threads
        )


def tensor_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a memoryview of its memory, no copy. The
    view does not keep the tensor alive: the caller holds the tensor while it is used."""
    import ctypes

    if t.device.type != "cpu":  # a device address must never reach ctypes
        raise InvalidArgumentError(f"tensor_view needs a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise InvalidArgumentError("tensor_view needs a contiguous tensor")
    nbytes = t.numel() * t.element_size()
    if not nbytes:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def buffer_address(data: bytes | bytearray | memoryview) -> int:
    """The address of ``data``'s first byte, no copy (0 when empty). The caller keeps
    ``data`` alive, and unchanged, while the address is used."""
    return core().buffer_address(data) if memoryview(data).nbytes else 0


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a CPU tensor as one bytes object (one copy)."""
    import ctypes

    if t.device.type != "cpu":  # a device address must never reach ctypes
        raise InvalidArgumentError(f"tensor_bytes needs a CPU tensor, got one on {t.device}")
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""


def compress_planes(t: torch.Tensor, *, threads: int = 0, block_log2: int = 16) -> torch.Tensor:
    """A CPU tensor's bytes coded losslessly as byte planes (docs/FORMAT.md, "Byte
    planes"): per block of ``2**block_log2`` elements (16 to 20), the sign bit rotated to
    the lowest bit and each byte position a plane, stored raw, Huffman- or rANS-coded
    where smaller. Returns a uint8 tensor; ``decompress_planes`` gives the bytes back,
    bit for bit."""
    if t.device.type != "cpu":
        raise InvalidArgumentError(f"compress_planes needs a CPU tensor, got one on {t.device}")
    t = t.contiguous()
    width, nbytes = t.element_size(), t.numel() * t.element_size()
    if width not in (1, 2, 4, 8):
        width = 1  # (bytes of sub-byte dtypes: one plane)
    if isinstance(block_log2, bool) or block_log2 not in range(16, 21):
        raise InvalidArgumentError(f"block_log2 must be an int from 16 to 20, got {block_log2!r}")
    out = torch.empty(core().planes_bound(nbytes, width, block_log2), dtype=torch.uint8)
    used = core().planes_encode(t.data_ptr(), nbytes, width, out.data_ptr(), out.numel(), threads,
                                block_log2)  # fmt: skip
    return out[:used]


def decompress_planes(blob: torch.Tensor, out: torch.Tensor, *, threads: int = 0) -> torch.Tensor:
    """Decodes ``compress_planes``'s ``blob`` into ``out`` (a contiguous CPU tensor of
    exactly the bytes it holds) and returns ``out``; IntegrityError for a damaged blob."""
    from ..errors import IntegrityError

    _check_cpu_bytes(blob, "blob")
    if out.device.type != "cpu" or not out.is_contiguous():
        raise InvalidArgumentError("decompress_planes needs a contiguous CPU tensor to fill")
    nbytes = out.numel() * out.element_size()
    try:
        core().planes_decode(blob.data_ptr(), blob.numel(), out.data_ptr(), nbytes, threads)
    except ValueError as exc:
        raise IntegrityError(f"{exc}: the stored bytes are corrupted") from None
    return out
