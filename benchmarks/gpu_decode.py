"""Coded (``compress=True``) stores on a GPU: the device byte-plane decoder against the
host's, and ``load`` of a compressed set against an uncompressed one, in one process.

Part 1, the decoder: a tensor of trained-like weights (normal, std 0.05: exponents as
a trained model's) in float32 and cast to bfloat16, coded by ``kernels.compress_planes``;
decoded on the host on every core, on the host then copied to the device, and on the
device (its coded bytes copied there, then ``codec.device.decode_planes``), on the
device from coded bytes already there ("kernel": the launches and the block table's
copy), and the raw bytes copied to the device beside them (pageable memory, as
``load`` copies). GB/s of decoded bytes, medians.

Part 2, ``load``: the harness's 10,000 trained battery cells saved plain and with
``compress=True``; ``load`` of each (hashes checked) onto the CPU (issue 23's bar:
coded at most 1.5x plain) and onto the GPU, the coded one both decoded on the device
(the default where the kernels run) and on the host then copied (the device decoder
switched off). Each result compared bit for bit with the set saved. The CPU loads run
again with no decode buffer lent twice (each coded load then writes into fresh pages,
as a process's first does), and each one's first load is shown. Then the CPU load of
the coded set in pieces: its decode and hash alone, its views alone, and both at once.
With ``--vision ARCH``, part 2 again for fine-tunes of the harness's network (float32
weights between int64 counters: a coded group of several streams).

    python benchmarks/gpu_decode.py [--mb 256] [--cells 10000] [--repeat 5]
        [--vision resnet50 [--finetunes 10]] [--json FILE]

Without a CUDA device the device columns are left out (the CPU ones still run).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401

import torch

import mmcore
from benchmarks.harness.measure import assert_same_models, machine_name
from mmcore import kernels
from mmcore.codec import device as device_codec
from mmcore.codec import records
from mmcore.examples import battery


def _median(fn: Callable[[], Any], repeat: int, sync: bool) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decoder(mb: int, repeat: int, gpu: bool) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(mb * (1 << 20) // 4, generator=g) * 0.05
    return [_decoder_row(t, repeat, gpu) for t in (w, w.bfloat16())]


def _decoder_row(t: torch.Tensor, repeat: int, gpu: bool) -> dict[str, Any]:
    blob = kernels.compress_planes(t)
    out = torch.empty_like(t)
    row: dict[str, Any] = {"dtype": str(t.dtype).replace("torch.", ""),
                           "bytes": t.numel() * t.element_size(), "coded": blob.numel()}  # fmt: skip
    row["host_s"] = _median(lambda: kernels.decompress_planes(blob, out), repeat, False)
    if not gpu:
        return row
    dev = torch.empty_like(t, device="cuda")
    device_codec.decode_planes(blob, dev)
    assert torch.equal(dev.cpu().view(torch.uint8), t.view(torch.uint8))

    def host_then_copy() -> None:
        kernels.decompress_planes(blob, out)
        dev.copy_(out)

    row["host_copy_s"] = _median(host_then_copy, repeat, True)
    row["device_s"] = _median(lambda: device_codec.decode_planes(blob, dev), repeat, True)
    on = blob.to("cuda")
    row["kernel_s"] = _median(
        lambda: device_codec.decode_planes(blob, dev, on_device=on), repeat, True
    )
    row["raw_copy_s"] = _median(lambda: dev.copy_(t), repeat, True)
    return row


def trained_cells(cells: int, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"training {cells:,} battery cells ...")
    fleet = battery.make_cells(cells, seed=0)
    return battery.train(fleet, battery.make_data(list(fleet), rows=64, seed=1), seed=0,
                         lr=0.05, epochs=2)  # fmt: skip


def vision_finetunes(arch: str, count: int) -> dict[str, Any]:
    """``count`` copies of the harness's ``arch`` (its initial weights), every float
    tensor nudged by noise of 1e-3 of its spread, as all-layer fine-tunes are: float32
    weights and BN statistics between int64 counters (a group of several streams)."""
    from benchmarks.harness import vision

    torch.manual_seed(0)
    base = {k: v.detach() for k, v in vision.build(arch)[0].state_dict().items()}
    out = {}
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        out[f"{arch}_ft{i}"] = {
            k: v + torch.randn(v.shape, generator=g) * 1e-3 * float(v.std().nan_to_num(0))
            if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }  # fmt: skip
    return out


def loads(models: dict[str, Any], repeat: int, gpu: bool, *,
          parts: bool = True) -> dict[str, Any]:  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="mmcore-gpu-decode-"))
    try:
        stores = {}
        for key, compress in (("plain", False), ("coded", True)):
            with mmcore.open(root / key) as s:
                s.save(models, compress=compress, progress=False)
            stores[key] = mmcore.open(root / key, readonly=True)
        vids = {k: s.versions()[0].id for k, s in stores.items()}
        out: dict[str, Any] = {"models": len(models),
                               "stored": {k: s.info(vids[k]).stored_bytes for k, s in stores.items()}}  # fmt: skip
        runs: dict[str, Callable[[], Any]] = {
            "cpu_plain": lambda: stores["plain"].load(vids["plain"]),
            "cpu_coded": lambda: stores["coded"].load(vids["coded"]),
        }
        if gpu:
            runs["gpu_plain"] = lambda: stores["plain"].load(vids["plain"], device="cuda")
            runs["gpu_coded"] = lambda: stores["coded"].load(vids["coded"], device="cuda")

            def host_decoded() -> Any:
                old = device_codec.decodes_on
                device_codec.decodes_on = lambda d: False  # type: ignore[assignment]
                try:
                    return stores["coded"].load(vids["coded"], device="cuda")
                finally:
                    device_codec.decodes_on = old

            runs["gpu_coded_host_decode"] = host_decoded
        first: dict[str, float] = {}
        for key, fn in runs.items():  # each checked once, bit for bit
            start = time.perf_counter()
            got = fn()
            first[key] = time.perf_counter() - start
            assert_same_models({n: {k: t.cpu() for k, t in sd.items()} for n, sd in got.items()},
                               models)  # fmt: skip
            del got
        out["first_seconds"] = first  # (one sample each: a process's first load)
        out["seconds"] = _alternating(runs, repeat, gpu)
        # the CPU loads again with no decode buffer lent twice: each coded load then
        # writes into fresh pages, as a process's first one does
        limit = records.buffer_cache()["limit"]
        records.buffer_cache(0)
        try:
            cpu = {k: runs[k] for k in ("cpu_plain", "cpu_coded")}
            out["seconds_no_reuse"] = _alternating(cpu, repeat, gpu)
        finally:
            records.buffer_cache(limit)
        if parts:
            out["parts"] = _parts(stores["coded"], vids["coded"], repeat)
        for s in stores.values():
            s.close()
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _alternating(runs: dict[str, Callable[[], Any]], repeat: int, gpu: bool) -> dict[str, float]:
    """Median seconds of each run, the runs taking turns ``repeat`` times in this process."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for key, fn in runs.items():
            gc.collect()
            start = time.perf_counter()
            got = fn()
            if gpu:
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
            del got
    return {k: statistics.median(v) for k, v in times.items()}


def _parts(store: mmcore.ModelStore, vid: str, repeat: int) -> dict[str, float]:
    """The CPU load of the coded set in pieces (best of ``repeat``, seconds): decoding
    and hashing every chunk on the decoder's threads, building the views on this one,
    and both at once as ``load`` runs them (the reader's own steps, one group)."""
    from concurrent.futures import ThreadPoolExecutor

    from mmcore.paths.reader import record_views

    manifest = store.manifest(vid)
    (group,) = manifest.groups
    reader = store.storage.reader
    rec, schema = reader.group_content(manifest, group), group.schema
    hashes = torch.empty((group.count * len(schema.tensors), 32), dtype=torch.uint8)
    filled, run = reader._decoder(rec, schema, hashes=hashes)
    run()
    pool = ThreadPoolExecutor(1)

    def decode_and_hash() -> Any:
        buf, fill = reader._decoder(rec, schema, hashes=hashes)
        fill()
        return buf

    def both() -> Any:  # as BlobReader.read_group runs them
        buf, fill = reader._decoder(rec, schema, hashes=hashes)
        wait = fill.start(pool)
        views = record_views(buf, schema, group.count)
        wait()
        return views

    runs = {"decode_and_hash": decode_and_hash,
            "views": lambda: record_views(filled, schema, group.count), "both": both}  # fmt: skip
    best = {}
    for key, fn in runs.items():
        times = []
        for _ in range(repeat):
            gc.collect()
            start = time.perf_counter()
            got = fn()
            times.append(time.perf_counter() - start)
            del got
        best[key] = min(times)
    pool.shutdown()
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=256, help="float32 MB of the decoder's tensor")
    p.add_argument("--cells", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--vision",
        choices=["resnet18", "resnet50", "mobilenet_v2"],
        help="also load fine-tunes of this network (a set of several streams)",
    )
    p.add_argument("--finetunes", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and kernels.cuda.available()
    name = torch.cuda.get_device_name() if gpu else "no CUDA device"
    print(f"machine: {machine_name()}; GPU: {name}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    rows = decoder(args.mb, args.repeat, gpu)
    print(f"{'dtype':9} {'MB':>7} {'coded':>6} {'host GB/s':>10} {'host+copy':>10} "
          f"{'device':>8} {'kernel':>8} {'raw copy':>9}   (GB/s of decoded bytes)")  # fmt: skip
    for r in rows:

        def rate(key: str, r: dict[str, Any] = r) -> str:
            return f"{r['bytes'] / r[key] / 1e9:>8.2f}" if key in r else f"{'-':>8}"

        print(f"{r['dtype']:9} {r['bytes'] / 1e6:>7.0f} {r['coded'] / r['bytes']:>6.3f} "
              f"{rate('host_s'):>10} {rate('host_copy_s'):>10} {rate('device_s'):>8} {rate('kernel_s'):>8} "
              f"{rate('raw_copy_s'):>9}")  # fmt: skip
    result = loads(trained_cells(args.cells, print), args.repeat, gpu)
    _report(result, f"{args.cells:,} trained cells", args.repeat, gpu, bar=True)
    parts = result["parts"]
    print(f"the coded load's pieces on the CPU (best of {args.repeat}): decode and hash "
          f"{parts['decode_and_hash'] * 1e3:.1f} ms, views {parts['views'] * 1e3:.1f} ms, "
          f"both at once {parts['both'] * 1e3:.1f} ms")  # fmt: skip
    saved = {"machine": machine_name(), "gpu": name, "torch": torch.__version__, "decoder": rows,
             "load": result}  # fmt: skip
    if args.vision:
        arch = args.vision
        saved["vision"] = loads(vision_finetunes(arch, args.finetunes), args.repeat, gpu,
                                parts=False)  # fmt: skip
        _report(saved["vision"], f"{args.finetunes} {arch} fine-tunes", args.repeat, gpu)
    if args.json:
        args.json.write_text(json.dumps(saved, indent=1))
    return 0


def _report(result: dict[str, Any], what: str, repeat: int, gpu: bool, bar: bool = False) -> None:
    sec = result["seconds"]
    print(f"load of {what} (median of {repeat}, hashes checked):")
    for key, s in sec.items():
        print(f"  {key:24} {s * 1e3:9.1f} ms")
    print(f"  coded / plain on the CPU: {sec['cpu_coded'] / sec['cpu_plain']:.2f}x"
          + (" (bar: 1.5x)" if bar else ""))  # fmt: skip
    fresh, first = result["seconds_no_reuse"], result["first_seconds"]
    print(f"  with no decode buffer lent again (MMCORE_BUFFER_CACHE=0): plain "
          f"{fresh['cpu_plain'] * 1e3:.1f} ms, coded {fresh['cpu_coded'] * 1e3:.1f} ms, "
          f"{fresh['cpu_coded'] / fresh['cpu_plain']:.2f}x")  # fmt: skip
    print(f"  this process's first loads (one each): plain {first['cpu_plain'] * 1e3:.1f} ms, "
          f"coded {first['cpu_coded'] * 1e3:.1f} ms")  # fmt: skip
    if gpu:
        print(f"  coded / plain onto the GPU: {sec['gpu_coded'] / sec['gpu_plain']:.2f}x; host "
              f"decode then copy / device decode: "
              f"{sec['gpu_coded_host_decode'] / sec['gpu_coded']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
