"""Dispatch to the CUDA kernels (built when nvcc was found; see csrc/cuda_kernels.h).

Tables of segments are built on the host from sizes the host knows, copied to
the device once per call, and every launch goes to the caller's current
stream. The only synchronisations are where a result must reach the host (the
quantized encoding's per-segment widths and escape counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._native import core
from ._segments import call

HASH_SIZE = 32
CHUNK = 1024


def available() -> bool:
    """CUDA kernels built into the native module and a CUDA device usable by torch."""
    from .._native import available as native_available

    return (
        native_available()
        and bool(getattr(core(), "built_with_cuda", False))
        and torch.cuda.is_available()
    )


def _stream(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _table(
    values: Sequence[int] | Sequence[float], device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """A host-built table on the device, copied asynchronously from pinned memory
    (a pageable copy would make torch wait for the stream)."""
    return torch.tensor(list(values), dtype=dtype).pin_memory().to(device, non_blocking=True)


def _prefix(counts: Sequence[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def blake3_segments(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """BLAKE3-256 of each CUDA tensor's bytes: a (n, 32) uint8 tensor on the device."""
    device = tensors[0].device
    n = len(tensors)
    lens = [t.numel() * t.element_size() for t in tensors]
    counts = [max(1, -(-length // CHUNK)) for length in lens]
    base = _prefix(counts)
    stream = _stream(device)
    ptrs = _table([t.data_ptr() for t in tensors], device)
    cur = torch.empty(base[-1] * 8, dtype=torch.int32, device=device)
    cur_base = _table(base, device)
    call("cuda_blake3_chunks", ptrs, _table(lens, device), cur_base, n, base[-1], cur, stream)
    while max(counts) > 1:  # one launch per tree level, all segments together
        nxt_counts = [(c + 1) // 2 if c > 1 else 1 for c in counts]
        nxt_base = _prefix(nxt_counts)
        nxt = torch.empty(nxt_base[-1] * 8, dtype=torch.int32, device=device)
        nxt_base_t = _table(nxt_base, device)
        call(
            "cuda_blake3_level",
            cur,
            cur_base,
            _table(counts, device),
            nxt,
            nxt_base_t,
            n,
            nxt_base[-1],
            stream,
        )
        cur, cur_base, counts = nxt, nxt_base_t, nxt_counts
    out = torch.empty((n, HASH_SIZE), dtype=torch.uint8, device=device)
    call("cuda_blake3_output", cur, cur_base, n, out, stream)
    return out


def _blocks(items: Sequence[int], per_block: int, device: torch.device) -> tuple[torch.Tensor, int]:
    base = _prefix([-(-i // per_block) for i in items])
    return _table(base, device), base[-1]


def xor_planes_encode(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], planes: Sequence[int],
                      widths: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """Writes the planes of each pair at the device addresses ``planes``; returns changed words."""
    device = new[0].device
    words = [t.numel() * t.element_size() // w for t, w in zip(new, widths)]
    block_base, blocks = _blocks(words, int(core().cuda_threads_per_block), device)
    changed = torch.zeros(len(new), dtype=torch.int64, device=device)
    call("cuda_xor_planes_encode", _table([t.data_ptr() for t in new], device),
          _table([t.data_ptr() for t in parent], device), _table(words, device),
          _table(widths, device, torch.int32), _table(planes, device), changed, block_base, len(new), blocks,
          _stream(device))  # fmt: skip
    return changed


def xor_planes_decode(planes: Sequence[int], parent: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                      widths: Sequence[int]) -> None:  # fmt: skip
    device = parent[0].device
    words = [t.numel() * t.element_size() // w for t, w in zip(parent, widths)]
    block_base, blocks = _blocks(words, int(core().cuda_threads_per_block), device)
    call("cuda_xor_planes_decode", _table(planes, device), _table([t.data_ptr() for t in parent], device),
          _table(words, device), _table(widths, device, torch.int32), _table([o.data_ptr() for o in outs], device),
          block_base, len(parent), blocks, _stream(device))  # fmt: skip


def quantize_plan(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], kinds: Sequence[int],
                  tol: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per segment (max |q|, escapes, changed, 0) and max |delta|, on the host (synchronises)."""
    device = new[0].device
    n = len(new)
    numels = [t.numel() for t in new]
    block_base, blocks = _blocks(numels, int(core().cuda_threads_per_block), device)
    stats = torch.zeros((n, 4), dtype=torch.int64, device=device)
    max_bits = torch.zeros(n, dtype=torch.int64, device=device)
    call("cuda_quantize_plan", _table([t.data_ptr() for t in new], device),
          _table([t.data_ptr() for t in parent], device), _table(numels, device),
          _table(kinds, device, torch.int32), torch.full((n,), tol, dtype=torch.float64, device=device),
          stats, max_bits, block_base, n, blocks, _stream(device))  # fmt: skip
    return stats.cpu(), max_bits.cpu().view(torch.float64)


def quantize_write(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], kinds: Sequence[int], tol: float,
                   widths: Sequence[int], q_addrs: Sequence[int]) -> list[torch.Tensor]:  # fmt: skip
    """Writes q at ``q_addrs``; returns each segment's escaped element indices (device int64)."""
    device = new[0].device
    n = len(new)
    numels = [t.numel() for t in new]
    elem_base = _prefix(numels)
    block_base, blocks = _blocks(numels, int(core().cuda_threads_per_block), device)
    flags = torch.zeros(elem_base[-1], dtype=torch.uint8, device=device)
    call("cuda_quantize_write", _table([t.data_ptr() for t in new], device),
          _table([t.data_ptr() for t in parent], device), _table(numels, device),
          _table(kinds, device, torch.int32), torch.full((n,), tol, dtype=torch.float64, device=device),
          _table(widths, device, torch.int32), _table(q_addrs, device), flags, _table(elem_base, device),
          block_base, n, blocks, _stream(device))  # fmt: skip
    return [flags[a:b].nonzero().reshape(-1) for a, b in zip(elem_base[:-1], elem_base[1:])]


def quantize_decode(parent: Sequence[torch.Tensor], kinds: Sequence[int], tols: Sequence[float],
                    widths: Sequence[int], q_addrs: Sequence[int], outs: Sequence[torch.Tensor]) -> None:  # fmt: skip
    device = parent[0].device
    n = len(parent)
    numels = [t.numel() for t in parent]
    block_base, blocks = _blocks(numels, int(core().cuda_threads_per_block), device)
    call("cuda_quantize_decode", _table([t.data_ptr() for t in parent], device), _table(numels, device),
          _table(kinds, device, torch.int32), _table(tols, device, torch.float64),
          _table(widths, device, torch.int32), _table(q_addrs, device), _table([o.data_ptr() for o in outs], device),
          block_base, n, blocks, _stream(device))  # fmt: skip


def gather(dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """Copies each device tensor's bytes into ``dst`` (uint8, same device) at ``offsets``."""
    device = dst.device
    lens = [t.numel() * t.element_size() for t in srcs]
    block_base, blocks = _blocks(lens, int(core().cuda_copy_bytes_per_block), device)
    call("cuda_gather", dst, _table([t.data_ptr() for t in srcs], device), _table(lens, device),
          _table(offsets, device), block_base, len(srcs), blocks, _stream(device))  # fmt: skip


def scatter(src: torch.Tensor, dsts: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    device = src.device
    lens = [t.numel() * t.element_size() for t in dsts]
    block_base, blocks = _blocks(lens, int(core().cuda_copy_bytes_per_block), device)
    call("cuda_scatter", src, _table([t.data_ptr() for t in dsts], device), _table(lens, device),
          _table(offsets, device), block_base, len(dsts), blocks, _stream(device))  # fmt: skip
