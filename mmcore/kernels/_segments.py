"""Shared by the delta encodings: validation of (new, parent) tables, native
calls by address, and the encodings' framing constants (docs/FORMAT.md)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from .._native import core
from ..errors import InvalidArgumentError
from . import int64_table

ENCODING_VERSION = 1
XOR_PLANES = 1
QUANTIZED = 2
XOR_HEADER = struct.Struct("<BBBBIQ")  # version, encoding, width, 0, 0, nbytes
QUANT_HEADER = struct.Struct("<BBBBIdQQ")  # version, encoding, qwidth, kind, 0, tol, numel, escapes
FLOAT_KINDS = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def plane_width(dtype: torch.dtype) -> int:
    """Bytes per plane word: the element size, or the scalar size for complex dtypes."""
    size = dtype.itemsize
    return size // 2 if dtype.is_complex else size


def check_pairs(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor]) -> torch.device | None:
    if len(new) != len(parent):
        raise InvalidArgumentError(f"got {len(new)} new tensors but {len(parent)} parents")
    device = None
    for i, (a, b) in enumerate(zip(new, parent)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise InvalidArgumentError(f"segment {i}: new and parent must be tensors")
        if a.dtype != b.dtype:
            raise InvalidArgumentError(
                f"segment {i}: dtype {a.dtype} differs from the parent's {b.dtype}"
            )
        if a.shape != b.shape:
            raise InvalidArgumentError(
                f"segment {i}: shape {tuple(a.shape)} differs from the parent's {tuple(b.shape)}"
            )
        if a.device != b.device or (device is not None and a.device != device):
            raise InvalidArgumentError(
                f"segment {i}: all tensors must be on one device, got {a.device} and {b.device}"
            )
        if not (a.is_contiguous() and b.is_contiguous()):
            raise InvalidArgumentError(
                f"segment {i}: tensors must be contiguous (call .contiguous())"
            )
        device = a.device
    return device


def check_decode(
    encoded: Sequence[torch.Tensor], parent: Sequence[torch.Tensor]
) -> torch.device | None:
    """Checks (encoding, parent) pairs before any kernel reads them: parents
    contiguous and on one device, each encoding a contiguous tensor on its
    parent's device. Kernels get raw addresses, so a CPU encoding with a CUDA
    parent (or the reverse) would hand one device a pointer into the other's memory."""
    if len(encoded) != len(parent):
        raise InvalidArgumentError(f"got {len(encoded)} encodings but {len(parent)} parents")
    device = None
    for i, (e, p) in enumerate(zip(encoded, parent)):
        if not isinstance(e, torch.Tensor) or not isinstance(p, torch.Tensor):
            raise InvalidArgumentError(f"segment {i}: encodings and parents must be tensors")
        if not p.is_contiguous():
            raise InvalidArgumentError(
                f"segment {i}: parent must be contiguous (call .contiguous())"
            )
        if device is not None and p.device != device:
            raise InvalidArgumentError(
                f"segment {i}: parent is on {p.device} but the first parent is on {device}; "
                "the parents of one call must be on one device"
            )
        device = p.device
        if e.device != p.device:
            raise InvalidArgumentError(
                f"segment {i}: the encoding is on {e.device} but its parent is on {p.device}; "
                f"an encoding is decoded where its parent is: move it with .to({str(p.device)!r})"
            )
        if not e.is_contiguous():
            raise InvalidArgumentError(
                f"segment {i}: the encoding must be contiguous (call .contiguous())"
            )
    return device


def ptrs(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return int64_table([t.data_ptr() for t in ts])


def call(name: str, *args: torch.Tensor | int) -> None:
    """Calls a native kernel, passing tensors by address. ``args`` holds every
    tensor until the call returns (an inline ``t.data_ptr()`` of a temporary
    would free the memory before the kernel reads it)."""
    addresses = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    getattr(core(), name)(*addresses)
    del args


def i32(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def f64(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def native_cpu(device: torch.device | None) -> bool:
    return device is None or device.type == "cpu"


def native_cuda(device: torch.device | None) -> bool:
    from . import cuda  # imported here: cuda.py uses call() from this module

    return device is not None and device.type == "cuda" and cuda.available()


def header_bytes(data: bytes, device: torch.device | None) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device or "cpu")


def framed_buffers(
    headers: Sequence[bytes], sizes: Sequence[int], *, zeroed: bool = False
) -> list[torch.Tensor]:
    """One CPU allocation for every encoding of a call, each a view that starts
    with its header (all headers written by one native gather)."""
    from . import gather

    n = len(headers)
    starts = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
    total = int(starts[-1])
    buf = torch.zeros(total, dtype=torch.uint8) if zeroed else torch.empty(total, dtype=torch.uint8)
    heads = torch.frombuffer(bytearray(b"".join(headers)), dtype=torch.uint8)
    head_size = len(headers[0])
    head_ptrs = torch.arange(n, dtype=torch.int64).mul_(head_size).add_(heads.data_ptr())
    gather(buf, head_ptrs, torch.full((n,), head_size, dtype=torch.int64), starts[:-1].contiguous())
    return list(torch.split(buf, list(sizes)))


def gather_headers(encoded: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """The first ``size`` bytes of every contiguous encoding of at least ``size`` bytes,
    as (n, size) uint8 on the CPU: one native gather where they are on the CPU; one
    launch and one copy back where they are all on one CUDA device the kernels run on
    (not a copy back per encoding)."""
    from . import cuda, gather

    n = len(encoded)
    devices = {e.device for e in encoded}
    if len(devices) == 1 and native_cuda(next(iter(devices))):
        buf = torch.empty(n * size, dtype=torch.uint8, device=devices.pop())
        cuda.gather_addresses(buf, [e.data_ptr() for e in encoded], [size] * n)  # back to back
        return buf.view(n, size).cpu()
    heads = torch.empty((n, size), dtype=torch.uint8)
    lens = torch.full((n,), size, dtype=torch.int64)
    gather(
        heads,
        int64_table([e.data_ptr() for e in encoded]),
        lens,
        torch.arange(n, dtype=torch.int64) * size,
    )
    return heads


def outputs_like(parent: Sequence[torch.Tensor], device: torch.device | None) -> list[torch.Tensor]:
    """Empty tensors shaped like ``parent``: on the CPU, views of one allocation
    (one allocator call per decode instead of one per segment)."""
    if not native_cpu(device) or len(parent) < 2:
        return [torch.empty_like(p) for p in parent]
    sizes = [p.numel() * p.element_size() for p in parent]
    align = 16  # every view starts aligned for its dtype
    padded = [-(-n // align) * align for n in sizes]
    buf = torch.empty(sum(padded), dtype=torch.uint8)
    outs, at = [], 0
    for p, n, step in zip(parent, sizes, padded):
        part = buf[at : at + n]
        outs.append((part.view(p.dtype) if n else torch.empty(0, dtype=p.dtype)).view(p.shape))
        at += step
    return outs
