"""The CUDA entry points check what they are given before any native call, run
on the tensors' device, and report a kernel fault as a KernelError that names
the kernel.

The validation tests run everywhere, with or without a GPU or CUDA kernels: the
native module is swapped for one that fails the test when touched, so an error
raised there proves the check came first. The device tests are gated like
tests/test_gpu_kernels.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import assert_bit_equal

from mmcore import kernels
from mmcore._native import available, core
from mmcore.errors import InvalidArgumentError, KernelError, MMCoreError, NativeModuleError
from mmcore.kernels import _segments, cuda, delta

U8 = torch.uint8


def _untouchable() -> Any:
    raise AssertionError("the native module was reached before validation finished")


@pytest.fixture
def no_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "core", _untouchable)
    monkeypatch.setattr(_segments, "core", _untouchable)


def _raises(message: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, MMCoreError) and isinstance(info.value, ValueError)


def _u8(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=U8)


F4 = [torch.zeros(4)]  # one 16-byte segment
F8 = [torch.zeros(8)]  # one 32-byte segment
SRCS = [torch.zeros(2), torch.zeros(4)]  # 8 and 16 bytes
XOR_AT, Q_AT = 16, 32  # where the planes / the q values start in an encoding

# (call, message): every call is refused before the native module is reached.
REFUSED = {
    "gather dst on cpu": (
        lambda: cuda.gather(_u8(20), SRCS, [0, 4]),
        r"^cuda\.gather: dst is on cpu, not on a CUDA device; .*move the tensors with \.cuda\(\)",
    ),
    "gather dst not uint8": (
        lambda: cuda.gather(torch.empty(5), SRCS, [0, 8]),
        r"^cuda\.gather: dst must be a contiguous uint8 tensor",
    ),
    "gather dst strided": (
        lambda: cuda.gather(_u8(40)[::2], SRCS, [0, 8]),
        r"^cuda\.gather: dst must be a contiguous uint8 tensor",
    ),
    "gather negative offset": (
        lambda: cuda.gather(_u8(20), SRCS, [0, -4]),
        r"^cuda\.gather: segment 1: offsets\[1\] is -4; it must not be negative",
    ),
    "gather float offset": (
        lambda: cuda.gather(_u8(20), SRCS, [0, 4.0]),
        r"^cuda\.gather: segment 1: offsets\[1\] must be an int, got float",
    ),
    "gather offsets count": (
        lambda: cuda.gather(_u8(20), SRCS, [0]),
        r"^cuda\.gather: offsets has 1 entries but there are 2 segments",
    ),
    "gather past the end": (
        lambda: cuda.gather(_u8(20), SRCS, [0, 8]),
        r"^cuda\.gather: segment 1: 16 bytes at offsets\[1\] = 8 end at byte 24, past the end of "
        r"dst \(20 bytes\); make dst larger or fix offsets\[1\]",
    ),
    "gather strided source": (
        lambda: cuda.gather(_u8(20), [torch.zeros(2, 2).t()], [0]),
        r"^cuda\.gather: segment 0: srcs\[0\] must be contiguous \(call \.contiguous\(\) on it\)",
    ),
    "gather source not a tensor": (
        lambda: cuda.gather(_u8(20), [SRCS[0], b"abcd"], [0, 8]),
        r"^cuda\.gather: segment 1: srcs\[1\] must be a torch\.Tensor, got bytes",
    ),
    "scatter past the end": (
        lambda: cuda.scatter(_u8(20), SRCS, [0, 5]),
        r"^cuda\.scatter: segment 1: 16 bytes at offsets\[1\] = 5 end at byte 21, past the end of src",
    ),
    "scatter src on cpu": (
        lambda: cuda.scatter(_u8(20), SRCS, [0, 4]),
        r"^cuda\.scatter: src is on cpu, not on a CUDA device",
    ),
    "blake3 on cpu": (
        lambda: cuda.blake3_segments(F4),
        r"^cuda\.blake3_segments: tensors\[0\] is on cpu, not on a CUDA device",
    ),
    "blake3 not a tensor": (
        lambda: cuda.blake3_segments([F4[0], [1.0]]),
        r"^cuda\.blake3_segments: segment 1: tensors\[1\] must be a torch\.Tensor, got list",
    ),
    "xor encode outs too small": (
        lambda: cuda.xor_planes_encode(F4, F4, [_u8(20)], [4], offset=XOR_AT),
        r"^cuda\.xor_planes_encode: segment 0: outs\[0\] has 20 bytes, too few for 16 bytes from "
        r"byte 16; it needs at least 32",
    ),
    "xor encode pair sizes": (
        lambda: cuda.xor_planes_encode(F4, [torch.ones(2)], [_u8(32)], [4], offset=XOR_AT),
        r"^cuda\.xor_planes_encode: segment 0: parent\[0\] has 8 bytes but new\[0\] has 16",
    ),
    "xor encode width": (
        lambda: cuda.xor_planes_encode(F4, F4, [_u8(32)], [3], offset=XOR_AT),
        r"^cuda\.xor_planes_encode: segment 0: widths\[0\] is 3; it must be one of 1, 2, 4, 8",
    ),
    "xor encode negative offset": (
        lambda: cuda.xor_planes_encode(F4, F4, [_u8(32)], [4], offset=-1),
        r"^cuda\.xor_planes_encode: offset is -1; it must not be negative",
    ),
    "xor encode outs not uint8": (
        lambda: cuda.xor_planes_encode(F4, F4, [torch.empty(8)], [4], offset=XOR_AT),
        r"^cuda\.xor_planes_encode: segment 0: outs\[0\] must be a uint8 tensor, got torch\.float32",
    ),
    "xor encode on cpu": (
        lambda: cuda.xor_planes_encode(F4, F4, [_u8(32)], [4], offset=XOR_AT),
        r"^cuda\.xor_planes_encode: new\[0\] is on cpu, not on a CUDA device",
    ),
    "xor decode encoding too small": (
        lambda: cuda.xor_planes_decode([_u8(31)], F4, [torch.empty(4)], [4], offset=XOR_AT),
        r"^cuda\.xor_planes_decode: segment 0: encoded\[0\] has 31 bytes, too few for 16 bytes "
        r"from byte 16; it needs at least 32",
    ),
    "xor decode outs size": (
        lambda: cuda.xor_planes_decode([_u8(32)], F4, [torch.empty(8)], [4], offset=XOR_AT),
        r"^cuda\.xor_planes_decode: segment 0: outs\[0\] has 32 bytes but parent\[0\] has 16; "
        r"they must match",
    ),
    "xor decode encodings count": (
        lambda: cuda.xor_planes_decode([_u8(32)] * 2, F4, [torch.empty(4)], [4], offset=XOR_AT),
        r"^cuda\.xor_planes_decode: encoded has 2 entries but there are 1 segments",
    ),
    "xor decode on cpu": (
        lambda: cuda.xor_planes_decode([_u8(32)], F4, [torch.empty(4)], [4], offset=XOR_AT),
        r"^cuda\.xor_planes_decode: parent\[0\] is on cpu, not on a CUDA device",
    ),
    "quantize kind of another size": (
        lambda: cuda.quantize_plan(F8, F8, [4], 1e-3),
        r"^cuda\.quantize_plan: segment 0: kinds\[0\] = 4 is for 8-byte elements but new\[0\] is "
        r"torch\.float32",
    ),
    "quantize unknown kind": (
        lambda: cuda.quantize_plan(F8, F8, [9], 1e-3),
        r"^cuda\.quantize_plan: segment 0: kinds\[0\] is 9; it must be one of 1, 2, 3, 4",
    ),
    "quantize tolerance": (
        lambda: cuda.quantize_plan(F8, F8, [3], float("nan")),
        r"^cuda\.quantize_plan: tol must be a finite number > 0, got nan",
    ),
    "quantize plan on cpu": (
        lambda: cuda.quantize_plan(F8, F8, [3], 1e-3),
        r"^cuda\.quantize_plan: new\[0\] is on cpu, not on a CUDA device",
    ),
    "quantize write width": (
        lambda: cuda.quantize_write(F8, F8, [3], 1e-3, [8], [_u8(80)], offset=Q_AT),
        r"^cuda\.quantize_write: segment 0: widths\[0\] is 8; it must be one of 1, 2, 4",
    ),
    "quantize write outs too small": (
        lambda: cuda.quantize_write(F8, F8, [3], 1e-3, [2], [_u8(40)], offset=Q_AT),
        r"^cuda\.quantize_write: segment 0: outs\[0\] has 40 bytes, too few for 16 bytes from "
        r"byte 32; it needs at least 48",
    ),
    "quantize decode encoding too small": (
        lambda: cuda.quantize_decode(
            F8, [3], [1e-3], [1], [_u8(39)], [torch.empty(8)], offset=Q_AT
        ),
        r"^cuda\.quantize_decode: segment 0: encoded\[0\] has 39 bytes, too few for 8 bytes",
    ),
    "quantize decode tols count": (
        lambda: cuda.quantize_decode(
            F8, [3], [1e-3] * 2, [1], [_u8(40)], [torch.empty(8)], offset=Q_AT
        ),
        r"^cuda\.quantize_decode: tols has 2 entries but there are 1 segments",
    ),
    "quantize decode on cpu": (
        lambda: cuda.quantize_decode(
            F8, [3], [1e-3], [1], [_u8(40)], [torch.empty(8)], offset=Q_AT
        ),
        r"^cuda\.quantize_decode: parent\[0\] is on cpu, not on a CUDA device",
    ),
}


@pytest.mark.usefixtures("no_native")
@pytest.mark.parametrize(("call", "message"), list(REFUSED.values()), ids=list(REFUSED))
def test_refused_before_any_native_call(call: Callable[[], object], message: str) -> None:
    _raises(message, call)


@pytest.mark.usefixtures("no_native")
def test_empty_tables_return_without_a_launch() -> None:
    assert cuda.blake3_segments([]).shape == (0, 32)
    assert cuda.xor_planes_encode([], [], [], [], offset=16).shape == (0,)
    cuda.xor_planes_decode([], [], [], [], offset=16)
    stats, max_delta = cuda.quantize_plan([], [], [], 1e-3)
    assert stats.shape == (0, 4) and max_delta.shape == (0,)
    assert cuda.quantize_write([], [], [], 1e-3, [], [], offset=32) == []
    cuda.quantize_decode([], [], [], [], [], [], offset=32)


# ---- decodes refuse encodings that are not where their parent is ----------------------------


def test_decodes_refuse_encodings_on_another_device() -> None:
    """The meta device stands in for a GPU: the same check guards CPU and CUDA."""
    parent, new = torch.zeros(16), torch.ones(16)
    (xor,), _ = delta.xor_planes_encode([new], [parent])
    (quant,), _ = delta.quantize_encode([new], [parent], 1e-3)
    on_meta = parent.to("meta")
    for decode, enc in ((delta.xor_planes_decode, xor), (delta.quantize_decode, quant)):
        _raises(
            r"segment 0: the encoding is on cpu but its parent is on meta; .* "
            r"move it with \.to\('meta'\)",
            decode,
            [enc],
            [on_meta],
        )
        _raises(
            r"segment 0: the encoding is on meta but its parent is on cpu; .* "
            r"move it with \.to\('cpu'\)",
            decode,
            [enc.to("meta")],
            [parent],
        )
        _raises(
            r"segment 1: parent is on meta but the first parent is on cpu",
            decode,
            [enc, enc],
            [parent, on_meta],
        )
        strided = torch.zeros(2 * enc.numel(), dtype=U8)[::2]
        strided.copy_(enc)
        _raises(r"segment 0: the encoding must be contiguous", decode, [strided], [parent])
        _raises(r"segment 0: parent must be contiguous", decode, [enc], [torch.zeros(32)[::2]])
        got = decode([enc], [parent])[0]  # the CPU path itself is unchanged
        assert float((got - new).abs().max()) <= 1e-3


# ---- kernel errors ---------------------------------------------------------------------------


def test_stream_failure_becomes_kernel_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fault(stream: int) -> None:
        raise RuntimeError("an illegal memory access was encountered (cudaErrorIllegalAddress)")

    monkeypatch.setattr(cuda, "core", lambda: SimpleNamespace(cuda_stream_check=fault))
    want = (
        r"^mmcore CUDA kernel xor_planes_decode failed: an illegal memory access was encountered "
        r"\(cudaErrorIllegalAddress\)\. .*restart the process"
    )
    with pytest.raises(KernelError, match=want):
        cuda.check_stream("xor_planes_decode", 0)
    monkeypatch.setattr(cuda, "core", lambda: SimpleNamespace(cuda_stream_check=lambda s: None))
    cuda.check_stream("xor_planes_decode", 0)


def test_launch_failure_becomes_kernel_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str, *args: object) -> None:
        raise RuntimeError(f"mmcore CUDA kernel {name[5:]} failed to launch: invalid argument")

    monkeypatch.setattr(cuda, "call", refuse)
    want = r"^mmcore CUDA kernel gather failed to launch: invalid argument"
    with pytest.raises(KernelError, match=want) as info:
        cuda._launch("gather", 1, 2)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, MMCoreError)


def test_missing_cuda_kernels_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "core", lambda: SimpleNamespace(built_with_cuda=False))

    def launch() -> None:
        with cuda._launching("gather", torch.device("cuda", 0)):
            pass

    with pytest.raises(NativeModuleError, match=r"cuda\.gather: this build of mmcore has no CUDA"):
        launch()


# ---- on a GPU ---------------------------------------------------------------------------------

built = available() and bool(getattr(core(), "built_with_cuda", False))
gpu = pytest.mark.gpu
needs_device = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_kernels = pytest.mark.skipif(
    not built, reason="CUDA kernels not built (nvcc was not found at build time)"
)
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@gpu
@needs_device
@needs_kernels
def test_decode_refuses_mixed_devices_on_gpu() -> None:
    parent, new = torch.randn(1000), torch.randn(1000)
    (xor,), _ = delta.xor_planes_encode([new], [parent])
    (quant,), _ = delta.quantize_encode([new], [parent], 1e-3)
    for decode, enc in ((delta.xor_planes_decode, xor), (delta.quantize_decode, quant)):
        _raises(
            r"segment 0: the encoding is on cpu but its parent is on cuda:0",
            decode,
            [enc],
            [parent.cuda()],
        )
        _raises(
            r"segment 0: the encoding is on cuda:0 but its parent is on cpu",
            decode,
            [enc.cuda()],
            [parent],
        )
        assert_bit_equal(decode([enc.cuda()], [parent.cuda()])[0].cpu(), decode([enc], [parent])[0])
    _raises(
        r"cuda\.xor_planes_decode: segment 0: encoded\[0\] is on cpu but parent\[0\] is on cuda:0",
        cuda.xor_planes_decode,
        [xor],
        [parent.cuda()],
        [torch.empty(1000, device="cuda")],
        [4],
        offset=delta.XOR_HEADER.size,
    )
    _raises(
        r"cuda\.quantize_decode: segment 0: outs\[0\] is on cpu but parent\[0\] is on cuda:0",
        cuda.quantize_decode,
        [parent.cuda()],
        [3],
        [1e-3],
        [1],
        [quant.cuda()],
        [torch.empty(1000)],
        offset=delta.QUANT_HEADER.size,
    )


@gpu
@needs_device
@needs_kernels
def test_gather_checks_devices_and_bounds_on_gpu() -> None:
    dst = torch.zeros(64, dtype=U8, device="cuda")
    srcs = [torch.ones(4, device="cuda"), torch.ones(4)]
    _raises(
        r"cuda\.gather: segment 1: srcs\[1\] is on cpu but dst is on cuda:0",
        cuda.gather,
        dst,
        srcs,
        [0, 16],
    )
    _raises(
        r"segment 0: 16 bytes at offsets\[0\] = 50 end at byte 66, past the end of dst",
        cuda.gather,
        dst,
        srcs[:1],
        [50],
    )
    cuda.gather(dst, [], [])
    cuda.scatter(dst, [], [])
    assert int(dst.sum()) == 0


@gpu
@needs_device
@needs_kernels
def test_launches_follow_the_current_stream() -> None:
    ts = [torch.randn(n, device="cuda") for n in (1, 300, 70_000)]
    offsets = [0, 4, 1204]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dst = torch.empty(1204 + 280_000, dtype=U8, device="cuda")
        cuda.gather(dst, ts, offsets)
        hashes = cuda.blake3_segments(ts)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(dst.cpu(), torch.cat([t.cpu().view(U8) for t in ts]))
    assert torch.equal(hashes.cpu(), kernels.blake3_tensors([t.cpu() for t in ts]))


@gpu
@needs_two
@needs_device
@needs_kernels
def test_tensors_on_a_device_that_is_not_current() -> None:
    g = torch.Generator().manual_seed(0)
    parent = [torch.randn(n, generator=g) for n in (5, 4096, 100_000)]
    new = [p + torch.randn(p.shape, generator=g) * 1e-2 for p in parent]
    want_xor, _ = delta.xor_planes_encode(new, parent)
    want_q, _ = delta.quantize_encode(new, parent, 1e-3)
    on1 = torch.device("cuda", 1)
    with torch.cuda.device(0):
        new1, parent1 = [t.to(on1) for t in new], [t.to(on1) for t in parent]
        xor, _ = delta.xor_planes_encode(new1, parent1)
        quant, _ = delta.quantize_encode(new1, parent1, 1e-3)
        decoded = delta.xor_planes_decode(xor, parent1)
        hashes = kernels.blake3_tensors(new1)
        assert torch.cuda.current_device() == 0
    for a, b in zip(xor + quant, want_xor + want_q):
        assert a.device == on1 and torch.equal(a.cpu(), b)
    for d, t in zip(decoded, new):
        assert_bit_equal(d.cpu(), t)
    assert torch.equal(hashes.cpu(), kernels.blake3_tensors(new))


@gpu
@needs_device
@needs_kernels
def test_stream_check_passes_on_a_clean_stream() -> None:
    assert core().cuda_stream_check(torch.cuda.current_stream().cuda_stream) is None


FAULT = """
import os
import sys

import torch
from mmcore.errors import KernelError
from mmcore.kernels import cuda

dev = torch.device("cuda", 0)
dst = torch.empty(4096, dtype=torch.uint8, device=dev)
try:
    with cuda._launching("gather", dev) as stream:  # a source address no device maps
        cuda._launch("gather", dst, cuda._table([8], dev), cuda._table([4096], dev),
                     cuda._table([0], dev), cuda._table([0, 1], dev), 1, 1, stream)
except KernelError as exc:
    print("KernelError:", exc)
sys.stdout.flush()
os._exit(0)  # skip teardown: the context is unusable after the fault
"""


@gpu
@needs_device
@needs_kernels
def test_kernel_fault_surfaces_at_its_own_call(tmp_path: Path) -> None:
    """In a child process: a fault leaves the CUDA context unusable."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FAULT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "KernelError: mmcore CUDA kernel gather failed: " in done.stdout
    assert "(cudaError" in done.stdout and "restart the process" in done.stdout
