"""CUDA kernels give the CPU's bytes. Skipped, each for its own reason, without
a device or without the CUDA kernels in the native module."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import assert_bit_equal

from mmcore import kernels
from mmcore._native import available, core
from mmcore.kernels import cuda, delta

built = available() and bool(getattr(core(), "built_with_cuda", False))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        not built, reason="CUDA kernels not built (nvcc was not found at build time)"
    ),
]

LENGTHS = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 2049, 9216, 31 * 1024 + 5, (1 << 20) + 7]


def _bytes_on(device: str, lengths: list[int], seed: int) -> list[torch.Tensor]:
    rng = random.Random(seed)
    return [torch.tensor(list(rng.randbytes(n)), dtype=torch.uint8, device=device) for n in lengths]


def test_blake3_matches_cpu() -> None:
    rng = random.Random(3)
    lengths = LENGTHS + [rng.randrange(0, 200_000) for _ in range(200)]
    on_gpu = _bytes_on("cuda", lengths, 1)
    got = kernels.blake3_tensors(on_gpu)
    assert got.is_cuda
    want = kernels.blake3_tensors([t.cpu() for t in on_gpu])
    assert torch.equal(got.cpu(), want)


def test_battery_table_hashes_match_cpu() -> None:
    ts = [torch.randn(48, 48, device="cuda") for _ in range(500)] + [
        torch.randn(48, device="cuda") for _ in range(500)
    ]
    assert torch.equal(
        cuda.blake3_segments(ts).cpu(), kernels.blake3_tensors([t.cpu() for t in ts])
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.complex64, torch.uint8])  # fmt: skip
def test_xor_planes_cross_device(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    parent = torch.randint(0, 256, (4096 * dtype.itemsize,), dtype=torch.uint8, generator=g).view(
        dtype
    )
    new = parent.clone()
    new.view(torch.uint8)[::5] ^= 3
    (enc_cpu,), changed_cpu = delta.xor_planes_encode([new], [parent])
    (enc_gpu,), changed_gpu = delta.xor_planes_encode([new.cuda()], [parent.cuda()])
    assert torch.equal(enc_gpu.cpu(), enc_cpu) and torch.equal(changed_gpu.cpu(), changed_cpu)
    (dec,) = delta.xor_planes_decode([enc_cpu.cuda()], [parent.cuda()])
    assert_bit_equal(dec.cpu(), new)
    (dec,) = delta.xor_planes_decode([enc_gpu.cpu()], [parent])
    assert_bit_equal(dec, new)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_quantized_cross_device(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    parent = torch.randn(100_000, dtype=torch.float64).to(dtype)
    new = (parent.double() + torch.randn(100_000, dtype=torch.float64) * 1e-2).to(dtype)
    new[::997] = float("nan")
    new[5] = torch.finfo(dtype).max
    (blob_cpu,), stats_cpu = delta.quantize_encode([new], [parent], 1e-3)
    (blob_gpu,), stats_gpu = delta.quantize_encode([new.cuda()], [parent.cuda()], 1e-3)
    assert torch.equal(blob_gpu.cpu(), blob_cpu)
    assert torch.equal(stats_gpu.max_delta, stats_cpu.max_delta)
    (rec_gpu,) = delta.quantize_decode([blob_cpu.cuda()], [parent.cuda()])
    (rec_cpu,) = delta.quantize_decode([blob_gpu.cpu()], [parent])
    assert_bit_equal(rec_gpu.cpu(), rec_cpu)


def test_gather_scatter_on_device() -> None:
    ts = [torch.randn(n, device="cuda") for n in (0, 1, 5, 4096, 100_000)]
    lens = [t.numel() * 4 for t in ts]
    offsets = [sum(lens[:i]) for i in range(len(ts))]
    dst = torch.empty(sum(lens), dtype=torch.uint8, device="cuda")
    cuda.gather(dst, ts, offsets)
    assert torch.equal(dst.cpu(), torch.cat([t.cpu().view(torch.uint8) for t in ts]))
    outs = [torch.empty_like(t) for t in ts]
    cuda.scatter(dst, outs, offsets)
    for o, t in zip(outs, ts):
        assert torch.equal(o, t)


@pytest.mark.parametrize("shift", [0, 1, 4])
def test_fused_hash_and_planes_match_cpu(shift: int) -> None:
    """The hashed xor-planes encode (BLAKE3's stage 0 writing the planes) gives the
    CPU's planes, changed counts and hashes, aligned or not (shift bytes off)."""
    g = torch.Generator().manual_seed(shift)
    pairs: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
        "cpu": ([], []),
        "cuda": ([], []),
    }
    for dtype in (torch.uint8, torch.float16, torch.float32, torch.float64):
        for n in (0, 1, 17, 4096, 70_001, 300_000):
            p = torch.randint(0, 256, (n * dtype.itemsize + shift,), dtype=torch.uint8, generator=g)
            q = p.clone()
            q[::7] ^= 1
            cut = shift - shift % dtype.itemsize  # element-aligned views, off 16 bytes
            for device, (new, parent) in pairs.items():  # sliced where they live
                new.append(q.to(device)[cut : cut + n * dtype.itemsize].view(dtype))
                parent.append(p.to(device)[cut : cut + n * dtype.itemsize].view(dtype))
    enc_cpu, changed_cpu, hashes_cpu = delta.xor_planes_encode_hashed(*pairs["cpu"])
    enc_gpu, changed_gpu, hashes_gpu = delta.xor_planes_encode_hashed(*pairs["cuda"])
    assert torch.equal(hashes_gpu.cpu(), hashes_cpu)
    assert torch.equal(changed_gpu.cpu(), changed_cpu)
    for a, b in zip(enc_gpu, enc_cpu):
        assert torch.equal(a.cpu(), b)


def test_copies_at_every_misalignment_on_device() -> None:
    raw = torch.randint(0, 256, (200_000,), dtype=torch.uint8, device="cuda")
    segs = [raw[s : s + n] for s in range(16) for n in (0, 15, 17, 16_385, 40_000)][:60]
    lens = [t.numel() for t in segs]
    offsets, at = [], 0
    for i, n in enumerate(lens):
        at += i % 16
        offsets.append(at)
        at += n
    dst = torch.zeros(at, dtype=torch.uint8, device="cuda")
    cuda.gather(dst, segs, offsets)
    for s, o in zip(segs, offsets):
        assert torch.equal(dst[o : o + s.numel()], s)


def test_nvcomp_frames_decode_on_the_cpu() -> None:
    """Model blobs compressed on the device by nvCOMP (the gpu extra) are plain zstd
    frames: the CPU's zstandard decodes them, and they are about as small as the
    CPU's level 3 on the same 64 KiB chunks."""
    from mmcore import codec
    from mmcore.codec import frames

    if not frames.nvcomp_available():
        pytest.skip("nvCOMP's Python package (pip install 'mmcore-models[gpu]') is not installed")
    g = torch.Generator().manual_seed(0)
    parent = torch.randn(4_000_000, generator=g)
    new = parent.clone()
    idx = torch.randperm(new.numel(), generator=g)[: new.numel() // 100]
    new[idx] += 1e-3
    (enc,), _ = delta.xor_planes_encode([new.cuda()], [parent.cuda()])
    spans = [(0, 100), (112, 0), (128, enc.numel() - 128)]
    got = frames.compress_nvcomp(enc, spans)
    want = frames.compress_cpu(enc.cpu(), spans)
    data = enc.cpu().numpy().tobytes()
    for (start, length), z in zip(spans, got):
        assert (
            codec.plain_bytes(z, codec.ZSTD_FRAMES, length, "blob") == data[start : start + length]
        )
    assert len(got[2]) <= 1.1 * len(want[2])
