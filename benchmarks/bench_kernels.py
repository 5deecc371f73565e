"""GB/s of mmcore's kernels on the CPU and, when present, the GPU.

Two workloads: one large tensor (256 MB by default) and the battery table
(10,000 FFNNs = 80,000 tensors, 201.6 MB). Each rate is input bytes per second
(median of --repeat runs), with the fraction of a plain copy's rate on the
same device measured in the same run. Results are checked against the CPU path.

    python benchmarks/bench_kernels.py [--mb 256] [--cells 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: the repository root makes `benchmarks` importable,
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (which drops the root again where mmcore/ is unbuilt)

import torch

from benchmarks.harness.battery import battery_set_fast
from benchmarks.harness.measure import machine_name
from mmcore import kernels
from mmcore._native import core
from mmcore.kernels import cuda, delta


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], Any], device: str, repeat: int) -> float:
    fn()  # warm up (allocations, caches, first launches)
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _xor_kernels(
    new: list[torch.Tensor], parent: list[torch.Tensor]
) -> tuple[Callable[..., Any], Callable[[], Any], Callable[[], Any], Callable[[], Any]]:
    native = core()
    nbytes = [t.numel() * t.element_size() for t in new]
    outs = [torch.empty(nb, dtype=torch.uint8) for nb in nbytes]
    dec = [torch.empty_like(t) for t in new]
    tables = [kernels.int64_table([t.data_ptr() for t in ts]) for ts in (new, parent, outs, dec)]
    sizes = kernels.int64_table(nbytes)
    widths = torch.tensor([delta.plane_width(t.dtype) for t in new], dtype=torch.int32)
    changed = torch.zeros(len(new), dtype=torch.int64)
    a, b, o, d = (t.data_ptr() for t in tables)

    def encode(threads: int = 0) -> None:
        native.xor_planes_encode(
            a, b, sizes.data_ptr(), widths.data_ptr(), o, changed.data_ptr(), len(new), threads
        )

    def decode() -> None:
        native.xor_planes_decode(o, b, sizes.data_ptr(), widths.data_ptr(), d, len(new))

    hashes = torch.empty((len(new), 32), dtype=torch.uint8)

    def fused() -> None:
        native.xor_planes_encode_hashed(
            a,
            b,
            sizes.data_ptr(),
            widths.data_ptr(),
            o,
            changed.data_ptr(),
            hashes.data_ptr(),
            len(new),
        )

    def separate() -> None:
        native.blake3_segments(a, sizes.data_ptr(), len(new), hashes.data_ptr())
        encode()

    encode.keep = (tables, outs, dec)  # type: ignore[attr-defined]
    return encode, decode, fused, separate


def _blake3_package(new: list[torch.Tensor]) -> Callable[[], Any] | None:
    """The official implementation's Python bindings on the same bytes, for scale."""
    try:
        import blake3
    except ImportError:
        return None
    import ctypes

    views = [
        memoryview(
            (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
        ).cast("B")
        for t in new
    ]
    return lambda: [blake3.blake3(v, max_threads=1).digest() for v in views]


def workloads(
    mb: int, cells: int, device: str
) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(mb * (1 << 20) // 4, generator=g)
    big_new = big.clone()
    idx = torch.randperm(big.numel(), generator=g)[: big.numel() // 100]
    big_new[idx] += torch.randn(idx.numel(), generator=g) * 1e-3  # 1% of the elements changed
    table = [t.contiguous() for sd in battery_set_fast(cells).values() for t in sd.values()]
    table_new = [t + 1e-4 for t in table]
    out = {
        f"one tensor {mb} MB": ([big], [big_new]),
        f"battery table {len(table):,} tensors": (table, table_new),
    }
    return {k: ([t.to(device) for t in a], [t.to(device) for t in b]) for k, (a, b) in out.items()}


def _run_workload(
    device: str, name: str, parent: list[torch.Tensor], new: list[torch.Tensor], repeat: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    nbytes = sum(t.numel() * t.element_size() for t in new)
    flat = torch.cat([t.reshape(-1) for t in new])
    flat_dst = torch.empty_like(flat)
    copy_s = median_seconds(lambda: flat_dst.copy_(flat), device, repeat)
    copy_rate = nbytes / copy_s
    cases: dict[str, Callable[[], Any]] = {}
    if device == "cpu":  # address tables built once, as the save path does
        ptrs = kernels.int64_table([t.data_ptr() for t in new])
        lens = kernels.int64_table([t.numel() * t.element_size() for t in new])
        for threads in (1, 2):
            label = f"blake3 ({threads} thread{'s' if threads > 1 else ''})"
            cases[label] = functools.partial(kernels.blake3_segments, ptrs, lens, threads=threads)
        reference_hash = _blake3_package(new)
        if reference_hash is not None:
            cases["blake3 package, 1 thread (reference)"] = reference_hash
    else:
        cases.update(_gpu_cases(new, parent))
    enc, _ = delta.xor_planes_encode(new, parent)
    qenc, _ = delta.quantize_encode(new, parent, 1e-3)
    if device == "cpu":  # the kernels alone: tables and outputs prepared once
        encode, decode, fused, separate = _xor_kernels(new, parent)
        cases["xor-planes encode (kernel)"] = encode
        cases["xor-planes encode (kernel, 1 thread)"] = lambda: encode(1)
        cases["xor-planes decode (kernel)"] = decode
        cases["blake3 + xor-planes, fused (kernel)"] = fused
        cases["blake3 + xor-planes, two passes (kernel)"] = separate
    cases["xor-planes encode (API)"] = lambda: delta.xor_planes_encode(new, parent)
    if device == "cpu":  # what a save calls: its address tables exist, nothing per tensor
        from mmcore.kernels.xor_planes import xor_planes_encode_table

        tables = (ptrs, kernels.int64_table([t.data_ptr() for t in parent]), lens,
                  kernels.int64_table([delta.plane_width(t.dtype) for t in new]))  # fmt: skip
        staging = torch.empty(nbytes + 16 * len(new), dtype=torch.uint8)  # reused, as a save does
        cases["xor-planes encode (table API)"] = lambda: xor_planes_encode_table(
            *tables, out=staging
        )
        cases["blake3 + xor-planes (table API)"] = lambda: xor_planes_encode_table(
            *tables, hashed=True, out=staging
        )
    cases["xor-planes decode (API)"] = lambda: delta.xor_planes_decode(enc, parent)
    cases["quantized encode (tol 1e-3)"] = lambda: delta.quantize_encode(new, parent, 1e-3)
    cases["quantized decode"] = lambda: delta.quantize_decode(qenc, parent)
    if device == "cpu":
        offsets = torch.cumsum(lens, 0) - lens
        dst = torch.empty(nbytes, dtype=torch.uint8)
        cases["gather"] = lambda: kernels.gather(dst, ptrs, lens, offsets)
    else:
        lens_l = [t.numel() * t.element_size() for t in new]
        offs = [sum(lens_l[:i]) for i in range(len(lens_l))]
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        cases["gather"] = lambda: cuda.gather(dst, new, offs)
        back = [torch.empty_like(t) for t in new]
        cases["scatter"] = lambda: cuda.scatter(dst, back, offs)
    for kernel, fn in cases.items():
        seconds = median_seconds(fn, device, repeat)
        print(f"  {device} {name}: {kernel}: {seconds * 1e3:.2f} ms", file=sys.stderr, flush=True)
        rows.append({"device": device, "workload": name, "kernel": kernel, "seconds": seconds,
                     "gb_per_s": nbytes / seconds / 1e9, "of_copy": nbytes / seconds / copy_rate})  # fmt: skip
    rows.append({"device": device, "workload": name, "kernel": "plain copy (reference)", "seconds": copy_s,
                 "gb_per_s": copy_rate / 1e9, "of_copy": 1.0})  # fmt: skip
    if device == "cuda":
        rows += _compression_rows(name, enc, nbytes, repeat)
    q_bytes = sum(b.numel() for b in qenc)
    nonzero = sum(int((e[delta.XOR_HEADER.size :] != 0).sum()) for e in enc)
    rows.append({"device": device, "workload": name, "kernel": "sizes", "quantized_bytes_fraction": q_bytes / nbytes,
                 "xor_nonzero_fraction": nonzero / nbytes})  # fmt: skip
    return rows


def _gpu_cases(new: list[torch.Tensor], parent: list[torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """BLAKE3 on the GPU three ways: the whole call, its tables alone (the plan built
    on the host and copied over), and the launches alone on tables built once (the
    device time the issue's bar is about); and the fused hash + xor-planes."""
    lens = [t.numel() * t.element_size() for t in new]
    device = new[0].device
    stream = int(torch.cuda.current_stream(device).cuda_stream)
    built = cuda.hash_tables(new, lens, device)
    return {
        "blake3": lambda: kernels.blake3_tensors(new),
        "blake3 (tables only)": lambda: cuda.hash_tables(new, lens, device),
        "blake3 (launches on built tables)": lambda: cuda.hash_launches(built, stream),
        "blake3 + xor-planes, fused": lambda: delta.xor_planes_encode_hashed(new, parent),
    }


def _compression_rows(
    name: str, enc: list[torch.Tensor], nbytes: int, repeat: int
) -> list[dict[str, Any]]:
    """Entropy coding of the xor-planes encodings (framed, as an update stores them):
    nvCOMP's Zstd on the GPU (64 KiB frames, mmcore.codec.frames), the CPU's
    zstandard on the same bytes (level 3 as 64 KiB frames, and mmcore's level 1 as one
    frame), and ZipNN's GPU package when it is installed. Rates are of the encodings'
    bytes; sizes are fractions of them."""
    import zstandard

    from mmcore.codec import ZSTD_LEVEL, frames

    rows: list[dict[str, Any]] = []
    flat = torch.cat([e.reshape(-1) for e in enc])
    spans, at = [], 0
    for e in enc:  # each encoding its own blob, 16-byte aligned as the save lays them out
        spans.append((at, e.numel()))
        at += -(-e.numel() // frames.ALIGN) * frames.ALIGN
    buf = torch.zeros(at, dtype=torch.uint8, device=flat.device)
    kernels.gather_tensors(buf, enc, [s for s, _ in spans])
    size = sum(n for _, n in spans)
    host = buf.cpu()

    def row(kernel: str, seconds: float | None, out_bytes: int | None, device: str) -> None:
        rows.append({"device": device, "workload": name, "kernel": kernel, "seconds": seconds,
                     "gb_per_s": size / seconds / 1e9 if seconds else None,
                     "of_input": out_bytes / size if out_bytes is not None else None})  # fmt: skip

    if frames.nvcomp_available():
        got = frames.compress_nvcomp(buf, spans)
        row("nvCOMP Zstd, 64 KiB frames (GPU)",
            median_seconds(lambda: frames.compress_nvcomp(buf, spans), "cuda", repeat),
            sum(len(z) for z in got), "cuda")  # fmt: skip
    else:
        row("nvCOMP Zstd (not installed: pip install 'mmcore-models[gpu]')", None, None, "cuda")
    cpu3 = frames.compress_cpu(host, spans, level=3)
    row("zstandard level 3, 64 KiB frames (CPU, 1 thread)",
        median_seconds(lambda: frames.compress_cpu(host, spans, level=3), "cpu", 1),
        sum(len(z) for z in cpu3), "cpu")  # fmt: skip
    one = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    views = [kernels.tensor_view(host[a : a + n]) for a, n in spans]
    row(f"zstandard level {ZSTD_LEVEL}, one frame per blob (CPU, 1 thread)",
        median_seconds(lambda: [one.compress(v) for v in views], "cpu", 1),
        sum(len(one.compress(v)) for v in views), "cpu")  # fmt: skip
    try:
        import cuzipnn  # noqa: F401  # ZipNN's GPU package, carried where it can be
    except ImportError:
        row("cuzipnn (not installed: no wheel reached this machine)", None, None, "cuda")
    else:
        row("cuzipnn (installed: not wired in yet)", None, None, "cuda")
    return rows


def run(device: str, mb: int, cells: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    for name, (parent, new) in workloads(mb, cells, device).items():
        rows += _run_workload(device, name, parent, new, repeat)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'device':<6} {'workload':<32} {'kernel':<30} {'GB/s':>8} {'of copy':>8}")
    for r in rows:
        if r["kernel"] == "sizes":
            q, x = r["quantized_bytes_fraction"], r["xor_nonzero_fraction"]
            sizes = f"quantized {q:.3f}x, xor-planes non-zero {x:.3f}x"
            print(f"{r['device']:<6} {r['workload']:<32} encoded sizes of the input: {sizes}")
            continue
        if "of_input" in r:  # entropy coding: rate of the encodings and compressed fraction
            rate = "-" if r["gb_per_s"] is None else f"{r['gb_per_s']:.2f}"
            frac = "" if r["of_input"] is None else f"  -> {r['of_input']:.4f}x of the encodings"
            print(f"{r['device']:<6} {r['workload']:<32} {r['kernel']:<30} {rate:>8}{frac}")
            continue
        print(
            f"{r['device']:<6} {r['workload']:<32} {r['kernel']:<30} {r['gb_per_s']:>8.2f} {r['of_copy']:>7.0%}"
        )


def print_bars(rows: list[dict[str, Any]]) -> None:
    """Issue 7's CPU bars: whole-table work at the single-tensor kernels' rates."""
    rate = {(r["workload"].split()[0], r["kernel"]): r["gb_per_s"] for r in rows
            if r["device"] == "cpu" and "gb_per_s" in r}  # fmt: skip
    bars = [
        ("blake3 over the table, 2 threads", ("battery", "blake3 (2 threads)"), ("one", "blake3 (2 threads)"), 0.7),
        ("blake3 over the table, 1 thread", ("battery", "blake3 (1 thread)"), ("one", "blake3 (1 thread)"), 0.7),
        ("xor-planes encode over the table (table API)", ("battery", "xor-planes encode (table API)"),
         ("one", "xor-planes encode (kernel)"), 0.5),
    ]  # fmt: skip
    for label, table, single, bar in bars:
        if table in rate and single in rate:
            ratio = rate[table] / rate[single]
            verdict = "ok" if ratio >= bar else "MISSED"
            print(f"  [{verdict}] {label} >= {bar}x the single-tensor kernel: {ratio:.2f}x")


def print_gpu_bars(rows: list[dict[str, Any]]) -> None:
    """Issue 12's bars, from the GPU rows of this run (one tensor: the --mb workload)."""
    rate = {
        (r["workload"].split()[0], r["kernel"]): r
        for r in rows
        if r["device"] == "cuda" and r.get("gb_per_s")
    }
    if not rate:
        return
    copy = {w: r["gb_per_s"] for (w, k), r in rate.items() if k == "plain copy (reference)"}
    print(f"GPU bars (copy rate of this run: {copy.get('one', 0):.0f} GB/s one tensor, "
          f"{copy.get('battery', 0):.0f} GB/s table)")  # fmt: skip

    def bar(label: str, ok: bool, got: str) -> None:
        print(f"  [{'ok' if ok else 'MISSED'}] {label}: {got}")

    def gbs(workload: str, kernel: str) -> float | None:
        r = rate.get((workload, kernel))
        return r["gb_per_s"] if r else None

    for workload, kernel, floor in (("one", "blake3 (launches on built tables)", 600.0),
                                    ("battery", "blake3 (launches on built tables)", 200.0)):  # fmt: skip
        got = gbs(workload, kernel)
        if got is not None:
            bar(
                f"BLAKE3 ({workload}) >= {floor:.0f} GB/s of device time",
                got >= floor,
                f"{got:.0f} GB/s",
            )
    shares = {"xor-planes encode (API)": 0.6, "xor-planes decode (API)": 0.6, "gather": 0.6, "scatter": 0.6,
              "quantized encode (tol 1e-3)": 0.4, "quantized decode": 0.4}  # fmt: skip
    for kernel, frac in shares.items():
        r = rate.get(("one", kernel))
        if r is not None:
            bar(f"{kernel} >= {frac:.0%} of copy", r["of_copy"] >= frac, f"{r['of_copy']:.0%}")
    fused, alone = gbs("one", "blake3 + xor-planes, fused"), gbs("one", "blake3")
    if fused and alone:
        bar(
            "fused hash + xor-planes >= 0.8x hashing alone",
            fused >= 0.8 * alone,
            f"{fused / alone:.2f}x",
        )
    comp = {r["kernel"]: r for r in rows if r["workload"].startswith("one") and "of_input" in r}
    gpu = next((r for k, r in comp.items() if k.startswith("nvCOMP") and r["gb_per_s"]), None)
    cpu3 = next((r for k, r in comp.items() if k.startswith("zstandard level 3")), None)
    if gpu and cpu3:
        bar("nvCOMP >= 50 GB/s of input", gpu["gb_per_s"] >= 50, f"{gpu['gb_per_s']:.0f} GB/s")
        ratio = gpu["of_input"] / cpu3["of_input"]
        bar("nvCOMP size within 10% of zstd level 3", ratio <= 1.1, f"{ratio:.3f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mb", type=int, default=256, help="size of the single large tensor")
    p.add_argument(
        "--cells", type=int, default=10_000, help="battery cells in the table (8 tensors each)"
    )
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--devices", default="auto", help="cpu, cuda, or auto (cpu, plus cuda when usable)"
    )
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    devices = (
        ["cpu"] + (["cuda"] if cuda.available() else [])
        if args.devices == "auto"
        else args.devices.split(",")
    )
    print(
        f"machine: {machine_name()}; torch {torch.__version__}; CPU BLAKE3 ISA: {core().blake3_isa()}"
    )
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name()}")
    rows = []
    for device in devices:
        print(f"running {device} ...", file=sys.stderr, flush=True)
        rows += run(device, args.mb, args.cells, args.repeat)
    print_table(rows)
    print_bars(rows)
    print_gpu_bars(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_name(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
