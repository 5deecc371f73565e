"""Dispatch to the CUDA kernels (built when nvcc was found; see csrc/cuda_kernels.h).

Every public function validates its arguments in Python before any native call:
each tensor a contiguous CUDA tensor, all of one call on one device, every
segment inside the buffer it is read from or written to. The launches then run
on that device (whatever the current device is) and on its current stream, and
each function ends with one synchronisation that reports a fault inside a
kernel as a :class:`~mmcore.errors.KernelError` naming the kernel, instead of
letting it surface at some later, unrelated call. Tables of segments are built
on the host from sizes the host knows and copied to the device once per call.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, NoReturn

import torch

from .._native import core
from ..errors import InvalidArgumentError, KernelError, NativeModuleError
from ._segments import call

HASH_SIZE = 32
PLANE_WIDTHS = (1, 2, 4, 8)
Q_WIDTHS = (1, 2, 4)
KIND_SIZES = {1: 2, 2: 2, 3: 4, 4: 8}  # the kinds of _segments.FLOAT_KINDS: element bytes
Args = list[torch.Tensor | int]  # a launch's arguments, but the stream
_AFTER_FAULT = (
    "The CUDA context may be unusable now: restart the process. To locate the fault, "
    "rerun under compute-sanitizer or with CUDA_LAUNCH_BLOCKING=1"
)


MIN_CAPABILITY = (8, 0)  # the build's oldest device code (sm_80, CMakeLists.txt)


def available() -> bool:
    """CUDA kernels built into the native module and a CUDA device usable by torch
    that can run them (compute capability 8.0 or newer: older GPUs have no image of
    them, and their tensors take the host path)."""
    from .._native import available as native_available

    return (
        native_available()
        and bool(getattr(core(), "built_with_cuda", False))
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= MIN_CAPABILITY
    )


# ---- validation (metadata only: nothing here touches a device or the native module) ----


def _fail(fn: str, message: str) -> NoReturn:
    raise InvalidArgumentError(f"cuda.{fn}: {message}")


def _nbytes(fn: str, name: str, ts: Sequence[torch.Tensor], n: int | None = None) -> list[int]:
    """The byte length of each entry, after checking it is a contiguous tensor
    (and, given ``n``, that there is one per segment)."""
    if n is not None and len(ts) != n:
        _fail(fn, f"{name} has {len(ts)} entries but there are {n} segments; pass one per segment")
    sizes = []
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            _fail(fn, f"segment {i}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            _fail(fn, f"segment {i}: {name}[{i}] must be contiguous (call .contiguous() on it)")
        sizes.append(t.numel() * t.element_size())
    return sizes


def _buffers(fn: str, name: str, ts: Sequence[torch.Tensor], n: int) -> list[int]:
    """Like ``_nbytes`` for byte buffers (encodings): each must also be uint8."""
    sizes = _nbytes(fn, name, ts, n)
    for i, t in enumerate(ts):
        if t.dtype != torch.uint8:
            _fail(fn, f"segment {i}: {name}[{i}] must be a uint8 tensor, got {t.dtype}")
    return sizes


def _ints(fn: str, name: str, values: Sequence[int], n: int,
          allowed: Sequence[int] | None = None) -> list[int]:  # fmt: skip
    """One non-negative int per segment (from ``allowed`` when given)."""
    if len(values) != n:
        _fail(fn, f"{name} has {len(values)} entries but there are {n} segments")
    out = []
    for i, v in enumerate(values):
        try:
            x = operator.index(v)
        except TypeError:
            _fail(fn, f"segment {i}: {name}[{i}] must be an int, got {type(v).__name__}")
        if x < 0:
            _fail(fn, f"segment {i}: {name}[{i}] is {x}; it must not be negative")
        if allowed is not None and x not in allowed:
            names = ", ".join(map(str, allowed))
            _fail(fn, f"segment {i}: {name}[{i}] is {x}; it must be one of {names}")
        out.append(x)
    return out


def _offset(fn: str, offset: int) -> int:
    try:
        x = operator.index(offset)
    except TypeError:
        _fail(fn, f"offset must be an int, got {type(offset).__name__}")
    if x < 0:
        _fail(fn, f"offset is {x}; it must not be negative")
    return x


def _same_sizes(fn: str, name: str, sizes: Sequence[int], ref: str, ref_sizes: Sequence[int],
                unit: str = "bytes") -> None:  # fmt: skip
    for i, (a, b) in enumerate(zip(sizes, ref_sizes)):
        if a != b:
            _fail(fn, f"segment {i}: {name}[{i}] has {a} {unit} but {ref}[{i}] has {b}; "
                      f"they must match (allocate {name} with torch.empty_like({ref}[i]))")  # fmt: skip


def _room(fn: str, name: str, sizes: Sequence[int], offset: int, needed: Sequence[int]) -> None:
    """Every buffer holds its segment's bytes from ``offset`` on."""
    for i, (size, need) in enumerate(zip(sizes, needed)):
        if offset + need > size:
            _fail(fn, f"segment {i}: {name}[{i}] has {size} bytes, too few for {need} bytes from "
                      f"byte {offset}; it needs at least {offset + need}")  # fmt: skip


def _in_bounds(fn: str, name: str, size: int, offsets: Sequence[int], lens: Sequence[int]) -> None:
    for i, (off, length) in enumerate(zip(offsets, lens)):
        if off + length > size:
            _fail(fn, f"segment {i}: {length} bytes at offsets[{i}] = {off} end at byte "
                      f"{off + length}, past the end of {name} ({size} bytes); "
                      f"make {name} larger or fix offsets[{i}]")  # fmt: skip


def _kinds(fn: str, name: str, ts: Sequence[torch.Tensor], kinds: Sequence[int]) -> list[int]:
    """Float kind codes, each matching its tensor's element size (the kernels
    read numel * kind size bytes)."""
    ks = _ints(fn, "kinds", kinds, len(ts), allowed=tuple(KIND_SIZES))
    for i, (t, k) in enumerate(zip(ts, ks)):
        if t.element_size() != KIND_SIZES[k]:
            _fail(fn, f"segment {i}: kinds[{i}] = {k} is for {KIND_SIZES[k]}-byte elements but "
                      f"{name}[{i}] is {t.dtype}; pass the kind of its dtype")  # fmt: skip
    return ks


def _tolerance(fn: str, tol: float) -> float:
    x = float(tol)
    if not (math.isfinite(x) and x > 0):
        _fail(fn, f"tol must be a finite number > 0, got {tol!r}")
    return x


def _device(fn: str, anchor: str, t: torch.Tensor) -> torch.device:
    if t.device.type != "cuda":
        _fail(fn, f"{anchor} is on {t.device}, not on a CUDA device; these are the CUDA kernels: "
                  "move the tensors with .cuda(), or call the dispatching functions of "
                  "mmcore.kernels, which handle CPU tensors")  # fmt: skip
    return t.device


def _one_device(fn: str, device: torch.device, anchor: str,
                **tables: Sequence[torch.Tensor]) -> None:  # fmt: skip
    """Kernels get raw addresses: a tensor elsewhere would be read through a
    pointer that means nothing (or something else) on ``device``."""
    for name, ts in tables.items():
        for i, t in enumerate(ts):
            if t.device != device:
                _fail(fn, f"segment {i}: {name}[{i}] is on {t.device} but {anchor} is on {device}; "
                          f"every tensor of one call must be on one CUDA device "
                          f"(move it with .to({str(device)!r}))")  # fmt: skip


# ---- launching -----------------------------------------------------------------------


@contextmanager
def _launching(stage: str, device: torch.device) -> Iterator[int]:
    """Runs one stage's launches on ``device`` and its current stream (yielded),
    then synchronises once and reports a fault in any of them as a KernelError."""
    mod = core()
    if not getattr(mod, "built_with_cuda", False):
        raise NativeModuleError(
            f"cuda.{stage}: this build of mmcore has no CUDA kernels (nvcc was not found when it "
            "was built); reinstall from source with nvcc on PATH or MMCORE_CUDA=ON"
        )
    with torch.cuda.device(device):
        stream = int(torch.cuda.current_stream(device).cuda_stream)
        yield stream
        check_stream(stage, stream)


def check_stream(stage: str, stream: int) -> None:
    """Waits for ``stream``; a CUDA error on it becomes a KernelError naming ``stage``."""
    try:
        core().cuda_stream_check(stream)
    except RuntimeError as exc:
        raise KernelError(f"mmcore CUDA kernel {stage} failed: {exc}. {_AFTER_FAULT}") from exc


def _launch(kernel: str, *args: torch.Tensor | int) -> None:
    try:
        call(f"cuda_{kernel}", *args)
    except RuntimeError as exc:  # check_launch in bindings.cpp; its message names the kernel
        raise KernelError(f"{exc}. {_AFTER_FAULT}") from exc


def _table(
    values: Sequence[int] | Sequence[float], device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """A host-built table on the device, copied asynchronously from pinned memory
    (a pageable copy would make torch wait for the stream). On the CPU (the
    emulation in the tests), the host table itself."""
    host = torch.tensor(list(values), dtype=dtype)
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


def _prefix(counts: Sequence[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def _tiles(counts: Sequence[int], device: torch.device) -> Args:
    """The tile table of a launch (cuda_kernels.h, Tiles): each segment's first
    tile, each tile's segment (expanded on the device), the number of tiles."""
    base = _prefix(counts)
    segment = torch.repeat_interleave(
        torch.arange(len(counts), dtype=torch.int32, device=device),
        _table(counts, device),
        output_size=base[-1],
    )
    return [_table(base, device), segment, base[-1]]


def _unit_tiles(units: Sequence[int], device: torch.device) -> Args:
    per_tile = int(core().tile_threads)
    return _tiles([-(-u // per_tile) for u in units], device)


def _addresses(ts: Sequence[torch.Tensor], device: torch.device, offset: int = 0) -> torch.Tensor:
    return _table([t.data_ptr() + offset for t in ts], device)


# ---- kernels ---------------------------------------------------------------------------


def blake3_segments(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """BLAKE3-256 of each CUDA tensor's bytes: a (n, 32) uint8 tensor on their device.

    An empty table gives an empty (0, 32) tensor on the CPU (there is no device to name).
    """
    fn = "blake3_segments"
    lens = _nbytes(fn, "tensors", tensors)
    if not tensors:
        return torch.empty((0, HASH_SIZE), dtype=torch.uint8)
    device = _device(fn, "tensors[0]", tensors[0])
    _one_device(fn, device, "tensors[0]", tensors=tensors)
    with _launching(fn, device) as stream:
        out = _hash_stages(tensors, lens, device, stream)
    return out


def blake3_addresses(addresses: torch.Tensor, lens: torch.Tensor,
                     device: torch.device) -> torch.Tensor:  # fmt: skip
    """BLAKE3-256 of device memory given as tables of addresses and byte lengths (int64
    CPU tensors; memory the caller holds on ``device``): a (n, 32) uint8 tensor there."""
    n = addresses.numel()
    if not n:
        return torch.empty((0, HASH_SIZE), dtype=torch.uint8, device=device)
    plan, stages, nodes = blake3_plan(lens.tolist())
    tables = torch.frombuffer(bytearray(plan), dtype=torch.uint8)
    with _launching("blake3_addresses", device) as stream:
        built = HashTables(stages, tables.pin_memory().to(device, non_blocking=True),
                           addresses.pin_memory().to(device, non_blocking=True),
                           lens.pin_memory().to(device, non_blocking=True),
                           torch.empty(nodes * 8, dtype=torch.int32, device=device),
                           torch.empty((n, HASH_SIZE), dtype=torch.uint8, device=device))  # fmt: skip
        out = hash_launches(built, stream)
    return out


def xor_planes_encode_hashed(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor],
                             outs: Sequence[torch.Tensor], widths: Sequence[int], *,
                             offset: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """xor_planes_encode and BLAKE3 of each new tensor in one read of it: returns
    (changed words, hashes), both on the device."""
    fn = "xor_planes_encode_hashed"
    nbytes, ws, at = _check_xor_encode(fn, new, parent, outs, widths, offset)
    n = len(new)
    if not n:
        return torch.zeros(0, dtype=torch.int64), torch.empty((0, HASH_SIZE), dtype=torch.uint8)
    device = _device(fn, "new[0]", new[0])
    _one_device(fn, device, "new[0]", new=new, parent=parent, outs=outs)
    with _launching(fn, device) as stream:
        changed = torch.zeros(n, dtype=torch.int64, device=device)
        words = [b // w for b, w in zip(nbytes, ws)]
        fused = [_addresses(parent, device), _addresses(outs, device, at), _table(words, device),
                 _table(ws, device, torch.int32), changed]  # fmt: skip
        hashes = _hash_stages(new, nbytes, device, stream, fused)
    return changed, hashes


def _hash_stages(tensors: Sequence[torch.Tensor], lens: list[int], device: torch.device, stream: int,
                 fused: Sequence[torch.Tensor] = ()) -> torch.Tensor:  # fmt: skip
    """Enqueues the plan's stages on ``stream``. The tables it builds are freed when
    it returns, safely: torch's caching allocator hands their memory only to later
    work on the same stream."""
    return hash_launches(hash_tables(tensors, lens, device), stream, fused)


class HashTables(NamedTuple):
    """What a BLAKE3 call builds before its launches (the benchmark times it apart)."""

    stages: list[tuple[int, int, int, int, int]]  # the plan's, as blake3_plan gives them
    tables: torch.Tensor  # the plan's tables, on the device
    ptrs: torch.Tensor  # the segments' addresses and lengths, there
    lens: torch.Tensor
    nodes: torch.Tensor  # scratch: every stage's nodes
    out: torch.Tensor  # (n, 32) hashes


def hash_tables(
    tensors: Sequence[torch.Tensor], lens: list[int], device: torch.device
) -> HashTables:
    plan, stages, nodes = blake3_plan(lens)
    tables = torch.frombuffer(bytearray(plan), dtype=torch.uint8)
    tables = tables.pin_memory().to(device, non_blocking=True)
    return HashTables(stages, tables, _addresses(tensors, device), _table(lens, device),
                      torch.empty(nodes * 8, dtype=torch.int32, device=device),
                      torch.empty((len(tensors), HASH_SIZE), dtype=torch.uint8, device=device))  # fmt: skip


def hash_launches(
    built: HashTables, stream: int, fused: Sequence[torch.Tensor] = ()
) -> torch.Tensor:
    """The launches of a BLAKE3 call on tables ``hash_tables`` built; its output."""
    run_blake3_plan(
        lambda *args: _launch("blake3_stage", *args, stream),
        built.stages, built.tables.data_ptr(), built.ptrs.data_ptr(), built.lens.data_ptr(),
        built.nodes.data_ptr(), built.out.data_ptr(), [t.data_ptr() for t in fused] or (0, 0, 0, 0, 0),
    )  # fmt: skip
    return built.out


def run_blake3_plan(launch: Callable[..., None], stages: Sequence[tuple[int, int, int, int, int]],
                    tables: int, ptrs: int, lens: int, nodes: int, out: int,
                    fused: Sequence[int] = (0, 0, 0, 0, 0)) -> None:  # fmt: skip
    """Launches each stage of a plan whose tables lie at address ``tables``:
    stage 0 reads the segments (and, given ``fused`` addresses of parents,
    outputs, words, widths and changed counts, writes their xor-planes), each
    later one the nodes of the one before (``launch`` is the CUDA launcher, or
    the CPU emulation in the tests)."""
    leaves = 0
    for k, (tasks_at, ctas_at, _, ctas, node_base) in enumerate(stages):
        here = nodes + node_base * HASH_SIZE
        xor_args = fused if k == 0 else (0, 0, 0, 0, 0)
        launch(k == 0, ptrs, lens, leaves, tables + tasks_at, tables + ctas_at, ctas, here, out,
               *xor_args)  # fmt: skip
        leaves = here


def blake3_plan(lens: Sequence[int]) -> tuple[bytes, list[tuple[int, int, int, int, int]], int]:
    """The launch plan of the GPU BLAKE3 for segments of these byte lengths:
    (tables, stages, nodes), built natively (see csrc/blake3_tree.h)."""
    table = torch.tensor(list(lens), dtype=torch.int64)
    plan, stages, nodes = core().blake3_tree_plan(table.data_ptr(), len(table))
    return plan, list(stages), int(nodes)


def _check_xor_encode(fn: str, new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor],
                      outs: Sequence[torch.Tensor], widths: Sequence[int],
                      offset: int) -> tuple[list[int], list[int], int]:  # fmt: skip
    """The checks of an xor-planes encode's table (devices apart): each pair's byte
    length, the plane widths and the offset in the outputs."""
    nbytes = _nbytes(fn, "new", new)
    n = len(new)
    _same_sizes(fn, "parent", _nbytes(fn, "parent", parent, n), "new", nbytes)
    ws = _ints(fn, "widths", widths, n, allowed=PLANE_WIDTHS)
    at = _offset(fn, offset)
    _room(fn, "outs", _buffers(fn, "outs", outs, n), at, nbytes)
    return nbytes, ws, at


def xor_planes_encode(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                      widths: Sequence[int], *, offset: int) -> torch.Tensor:  # fmt: skip
    """Writes the planes of pair i into the uint8 buffer ``outs[i]`` from byte
    ``offset`` on; returns each pair's count of changed words (int64, on the device)."""
    fn = "xor_planes_encode"
    _, ws, at = _check_xor_encode(fn, new, parent, outs, widths, offset)
    if not new:
        return torch.zeros(0, dtype=torch.int64)
    device = _device(fn, "new[0]", new[0])
    _one_device(fn, device, "new[0]", new=new, parent=parent, outs=outs)
    with _launching(fn, device) as stream:
        args, changed = xor_encode_args(new, parent, outs, ws, at, device)
        _launch(fn, *args, stream)
    return changed


def xor_encode_args(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                    widths: Sequence[int], at: int, device: torch.device) -> tuple[Args, torch.Tensor]:  # fmt: skip
    """The launch's arguments (but the stream) after validation, and the
    changed counts it fills; on the CPU, those the emulation takes."""
    words = [t.numel() * t.element_size() // w for t, w in zip(new, widths)]
    changed = torch.zeros(len(new), dtype=torch.int64, device=device)
    args = [_addresses(new, device), _addresses(parent, device), _table(words, device),
            _table(widths, device, torch.int32), _addresses(outs, device, at), changed,
            *_unit_tiles([-(-m // int(core().unit_words)) for m in words], device)]  # fmt: skip
    return args, changed


def xor_planes_decode(encoded: Sequence[torch.Tensor], parent: Sequence[torch.Tensor],
                      outs: Sequence[torch.Tensor], widths: Sequence[int], *, offset: int) -> None:  # fmt: skip
    """Writes parent XOR the planes found in ``encoded[i]`` from byte ``offset`` on into ``outs[i]``."""
    fn = "xor_planes_decode"
    nbytes = _nbytes(fn, "parent", parent)
    n = len(parent)
    ws = _ints(fn, "widths", widths, n, allowed=PLANE_WIDTHS)
    at = _offset(fn, offset)
    _room(fn, "encoded", _buffers(fn, "encoded", encoded, n), at, nbytes)
    _same_sizes(fn, "outs", _nbytes(fn, "outs", outs, n), "parent", nbytes)
    if not n:
        return
    device = _device(fn, "parent[0]", parent[0])
    _one_device(fn, device, "parent[0]", parent=parent, encoded=encoded, outs=outs)
    with _launching(fn, device) as stream:
        _launch(fn, *xor_decode_args(encoded, parent, outs, ws, at, device), stream)


def xor_decode_args(encoded: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                    widths: Sequence[int], at: int, device: torch.device) -> Args:  # fmt: skip
    words = [t.numel() * t.element_size() // w for t, w in zip(parent, widths)]
    return [_addresses(encoded, device, at), _addresses(parent, device), _table(words, device),
            _table(widths, device, torch.int32), _addresses(outs, device),
            *_unit_tiles([-(-m // int(core().unit_words)) for m in words], device)]  # fmt: skip


def _quant_tiles(ts: Sequence[torch.Tensor], device: torch.device) -> Args:
    unit = int(core().quant_unit_bytes)
    return _unit_tiles([-(-(t.numel() * t.element_size()) // unit) for t in ts], device)


def _check_quant_pairs(fn: str, new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor],
                       kinds: Sequence[int]) -> tuple[list[int], list[int]]:  # fmt: skip
    """(numels, kinds) of (new, parent) pairs of one float dtype each."""
    nbytes = _nbytes(fn, "new", new)
    _same_sizes(fn, "parent", _nbytes(fn, "parent", parent, len(new)), "new", nbytes)
    ks = _kinds(fn, "new", new, kinds)
    _kinds(fn, "parent", parent, ks)
    return [t.numel() for t in new], ks


def quantize_plan(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], kinds: Sequence[int],
                  tol: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per segment (max |q|, escapes, changed, 0) and max |delta|, on the host (synchronises)."""
    fn = "quantize_plan"
    _, ks = _check_quant_pairs(fn, new, parent, kinds)
    tol = _tolerance(fn, tol)
    n = len(new)
    if not n:
        return torch.zeros((0, 4), dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    device = _device(fn, "new[0]", new[0])
    _one_device(fn, device, "new[0]", new=new, parent=parent)
    with _launching(fn, device) as stream:
        args, stats, max_bits = quantize_plan_args(new, parent, ks, tol, device)
        _launch(fn, *args, stream)
    return stats.cpu(), max_bits.cpu().view(torch.float64)


def quantize_plan_args(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], kinds: Sequence[int],
                       tol: float, device: torch.device) -> tuple[Args, torch.Tensor, torch.Tensor]:  # fmt: skip
    n = len(new)
    stats = torch.zeros((n, 4), dtype=torch.int64, device=device)
    max_bits = torch.zeros(n, dtype=torch.int64, device=device)
    args = [_addresses(new, device), _addresses(parent, device), _table([t.numel() for t in new], device),
            _table(kinds, device, torch.int32), torch.full((n,), tol, dtype=torch.float64, device=device),
            stats, max_bits, *_quant_tiles(new, device)]  # fmt: skip
    return args, stats, max_bits


def quantize_write(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], kinds: Sequence[int],
                   tol: float, widths: Sequence[int], outs: Sequence[torch.Tensor], *,
                   offset: int) -> list[torch.Tensor]:  # fmt: skip
    """Writes the q values of pair i into the uint8 buffer ``outs[i]`` from byte
    ``offset`` on; returns each segment's escaped element indices (device int64)."""
    fn = "quantize_write"
    numels, ks = _check_quant_pairs(fn, new, parent, kinds)
    tol = _tolerance(fn, tol)
    n = len(new)
    ws = _ints(fn, "widths", widths, n, allowed=Q_WIDTHS)
    at = _offset(fn, offset)
    _room(fn, "outs", _buffers(fn, "outs", outs, n), at, [m * w for m, w in zip(numels, ws)])
    if not n:
        return []
    device = _device(fn, "new[0]", new[0])
    _one_device(fn, device, "new[0]", new=new, parent=parent, outs=outs)
    with _launching(fn, device) as stream:
        args, flags, flag_base = quantize_write_args(new, parent, ks, tol, ws, outs, at, device)
        _launch(fn, *args, stream)
    return escapes_of(flags, flag_base, numels)


def quantize_write_args(new: Sequence[torch.Tensor], parent: Sequence[torch.Tensor], kinds: Sequence[int],
                        tol: float, widths: Sequence[int], outs: Sequence[torch.Tensor], at: int,
                        device: torch.device) -> tuple[Args, torch.Tensor, list[int]]:  # fmt: skip
    """Arguments, the flag buffer and each segment's first flag (16-byte aligned,
    so each thread's flags go out in one store)."""
    n = len(new)
    flag_base = _prefix([-(-t.numel() // 16) * 16 for t in new])
    flags = torch.zeros(flag_base[-1], dtype=torch.uint8, device=device)
    args = [_addresses(new, device), _addresses(parent, device), _table([t.numel() for t in new], device),
            _table(kinds, device, torch.int32), torch.full((n,), tol, dtype=torch.float64, device=device),
            _table(widths, device, torch.int32), _addresses(outs, device, at), flags,
            _table(flag_base, device), *_quant_tiles(new, device)]  # fmt: skip
    return args, flags, flag_base


def escapes_of(
    flags: torch.Tensor, flag_base: Sequence[int], numels: Sequence[int]
) -> list[torch.Tensor]:
    """Each segment's escaped element indices, from the flags of every segment
    at once: one scan (nonzero) over the whole buffer, then views per segment."""
    found = flags.nonzero().reshape(-1)
    bases = torch.tensor(flag_base, dtype=torch.int64, device=flags.device)
    segment = torch.searchsorted(bases, found, right=True) - 1
    local = found - bases[segment]
    counts = torch.bincount(segment, minlength=len(numels)).tolist()
    return list(torch.split(local, counts))


def quantize_decode(parent: Sequence[torch.Tensor], kinds: Sequence[int], tols: Sequence[float],
                    widths: Sequence[int], encoded: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], *,
                    offset: int) -> None:  # fmt: skip
    """Writes parent + q * 2 * tol into ``outs[i]``, q read from ``encoded[i]``
    from byte ``offset`` on; the caller writes the escapes over the result."""
    fn = "quantize_decode"
    nbytes = _nbytes(fn, "parent", parent)
    n = len(parent)
    numels = [t.numel() for t in parent]
    ks = _kinds(fn, "parent", parent, kinds)
    if len(tols) != n:
        _fail(fn, f"tols has {len(tols)} entries but there are {n} segments")
    ws = _ints(fn, "widths", widths, n, allowed=Q_WIDTHS)
    at = _offset(fn, offset)
    _room(
        fn, "encoded", _buffers(fn, "encoded", encoded, n), at, [m * w for m, w in zip(numels, ws)]
    )
    _same_sizes(fn, "outs", _nbytes(fn, "outs", outs, n), "parent", nbytes)
    if not n:
        return
    device = _device(fn, "parent[0]", parent[0])
    _one_device(fn, device, "parent[0]", parent=parent, encoded=encoded, outs=outs)
    with _launching(fn, device) as stream:
        _launch(fn, *quantize_decode_args(parent, ks, tols, ws, encoded, outs, at, device), stream)


def quantize_decode_args(parent: Sequence[torch.Tensor], kinds: Sequence[int], tols: Sequence[float],
                         widths: Sequence[int], encoded: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                         at: int, device: torch.device) -> Args:  # fmt: skip
    return [_addresses(parent, device), _table([t.numel() for t in parent], device),
            _table(kinds, device, torch.int32), _table([float(t) for t in tols], device, torch.float64),
            _table(widths, device, torch.int32), _addresses(encoded, device, at), _addresses(outs, device),
            *_quant_tiles(parent, device)]  # fmt: skip


def _copy_table(fn: str, buf: torch.Tensor, name: str, segments: Sequence[torch.Tensor], seg_name: str,
                offsets: Sequence[int]) -> tuple[torch.device, list[int], list[int]]:  # fmt: skip
    """Checks a gather/scatter table against its contiguous uint8 buffer; returns
    the device, the segments' byte lengths and the offsets."""
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or not buf.is_contiguous():
        _fail(
            fn,
            f"{name} must be a contiguous uint8 tensor (use torch.empty(nbytes, dtype=torch.uint8))",
        )
    lens = _nbytes(fn, seg_name, segments)
    offs = _ints(fn, "offsets", offsets, len(lens))
    _in_bounds(fn, name, buf.numel(), offs, lens)
    device = _device(fn, name, buf)
    _one_device(fn, device, name, **{seg_name: segments})
    return device, lens, offs


def gather(dst: torch.Tensor, srcs: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """Copies each device tensor's bytes into ``dst`` (uint8, same device) at ``offsets``."""
    _copy("gather", dst, "dst", srcs, "srcs", offsets)


def scatter(src: torch.Tensor, dsts: Sequence[torch.Tensor], offsets: Sequence[int]) -> None:
    """Copies the bytes of ``src`` (uint8) at ``offsets`` into each device tensor."""
    _copy("scatter", src, "src", dsts, "dsts", offsets)


def _copy(fn: str, buf: torch.Tensor, name: str, segments: Sequence[torch.Tensor], seg_name: str,
          offsets: Sequence[int]) -> None:  # fmt: skip
    device, _, offs = _copy_table(fn, buf, name, segments, seg_name, offsets)
    if not segments:
        return
    with _launching(fn, device) as stream:
        _launch(fn, *copy_args(buf, segments, offs, device), stream)


def copy_args(buf: torch.Tensor, segments: Sequence[torch.Tensor], offsets: Sequence[int],
              device: torch.device) -> Args:  # fmt: skip
    lens = [t.numel() * t.element_size() for t in segments]
    return _copy_args(buf, [t.data_ptr() for t in segments], lens, offsets, device)


def _copy_args(buf: torch.Tensor, addresses: Sequence[int], lens: Sequence[int], offsets: Sequence[int],
               device: torch.device) -> Args:  # fmt: skip
    tile = int(core().copy_tile_bytes)
    return [buf, _table(addresses, device), _table(lens, device), _table(offsets, device),
            *_tiles([-(-n // tile) for n in lens], device)]  # fmt: skip


def gather_addresses(dst: torch.Tensor, addresses: Sequence[int], lens: Sequence[int]) -> None:
    """Packs device memory the caller holds (``lens[i]`` bytes at ``addresses[i]``,
    memory torch does not see as tensors, such as nvCOMP's outputs in one of
    its buffers) into ``dst`` back to back."""
    fn = "gather_addresses"
    lens = _ints(fn, "lens", lens, len(addresses))
    offsets = _prefix(lens)
    _copy_table(fn, dst, "dst", [], "srcs", [])
    if offsets[-1] > dst.numel():
        _fail(fn, f"the pieces hold {offsets[-1]} bytes but dst has {dst.numel()}")
    if not addresses:
        return
    with _launching("gather", dst.device) as stream:
        _launch("gather", *_copy_args(dst, addresses, lens, offsets[:-1], dst.device), stream)
