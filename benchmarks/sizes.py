"""Issue 23's table: what each way of storing a model set costs, per set, on the same
bytes in one run.

Sets: the harness's image use case (a ResNet trained on digits, then fine-tunes of
its head only, frozen backbone, and of all layers, one per task) and battery cells
trained by ``mmcore.examples.battery``. Columns, in bytes:

- ``raw``: the parameters;
- ``baseline``: a baseline save with sharing off (what a baseline stored before);
- ``+ dedup``: a baseline save (tensors equal across models stored once);
- ``+ compression``: a baseline save with ``compress=True`` (dedup on): its stored
  bytes; ``load`` of it against ``load`` of ``+ dedup``'s store (medians of alternating
  runs, every hash checked in both) is the ``load x`` column;
- ``+ derived_from``: the base saved, then the set as an update ``derived_from`` it
  (the base's bytes counted; fine-tunes only);
- ``ZipNN``: ZipNN 0.5.x (one thread) on each model's float tensors, the rest raw: a
  peer's lossless compression, no dedup.

Every store is loaded back and compared bit for bit.

    python benchmarks/sizes.py [--arch resnet50] [--finetunes 10] [--cells 2000] [--steps 20 20 5]
                               [--sets all|cells] [--json FILE]
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

if not __package__:  # run as a file: the repository root makes `benchmarks` importable,
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (which drops the root again where mmcore/ is unbuilt)

import torch

import mmcore
from benchmarks.harness import vision
from benchmarks.harness.measure import assert_same_models, machine_name
from mmcore.examples import battery
from mmcore.paths import baseline

Models = dict[str, dict[str, torch.Tensor]]
PUBLISHED = [
    "ZipNN (published): about 17% saved on float32 models, 33% on bfloat16 ones, 1.1-1.7 GB/s per thread",
    "ZipLLM (NSDI 2026, published): 54% saved over 3,048 LLMs by tensor dedup and XOR against the base",
]


def _by_dtype(tensors: list[torch.Tensor]) -> tuple[dict[torch.dtype, torch.Tensor], int]:
    """Float tensors joined per dtype (flat), and the bytes of the others."""
    floats: dict[torch.dtype, list[torch.Tensor]] = {}
    other = 0
    for t in tensors:
        if t.is_floating_point():
            floats.setdefault(t.dtype, []).append(t.reshape(-1))
        else:
            other += t.numel() * t.element_size()
    return {d: torch.cat(ts) for d, ts in floats.items()}, other


def zipnn_bytes(models: Models) -> int | None:
    from benchmarks.harness.peers import _zipnn_module

    zipnn = _zipnn_module()
    if zipnn is None:
        return None
    total = 0
    for sd in models.values():  # a model at a time, as a peer stores a checkpoint
        floats, other = _by_dtype(list(sd.values()))
        total += other
        for dtype, data in floats.items():
            if dtype not in (torch.float32, torch.bfloat16):
                total += data.numel() * data.element_size()
                continue
            codec = zipnn.ZipNN(bytearray_dtype="float32" if dtype == torch.float32 else "bfloat16",
                                threads=1)  # fmt: skip
            total += len(codec.compress(bytearray(data.view(torch.uint8).numpy().tobytes())))
    return total


def _saved(root: Path, key: str, models: Models, share: bool, compress: bool = False) -> int:
    """A baseline's stored bytes (the store stays, for ``_loads``)."""
    old = baseline.SHARE_MIN
    baseline.SHARE_MIN = old if share else 1 << 62
    try:
        with mmcore.open(root / key) as store:
            vid = store.save(models, compress=compress, progress=False)
            assert_same_models(store.load(vid), models)
            if compress:
                plain, coded = store.storage.compression(store.manifest(vid).groups)
                assert 0 < coded < plain, (plain, coded)
            return store.info(vid).stored_bytes
    finally:
        baseline.SHARE_MIN = old


def _loads(root: Path, keys: tuple[str, str], runs: int = 7) -> tuple[float, float]:
    """Median seconds of ``load`` (hashes checked) of each store's one version, the two
    run alternately in this process."""
    times: tuple[list[float], list[float]] = ([], [])
    stores = [mmcore.open(root / k, readonly=True) for k in keys]
    try:
        vids = [s.versions()[0].id for s in stores]
        for _ in range(runs):
            for store, vid, out in zip(stores, vids, times):
                gc.collect()
                start = time.perf_counter()
                got = store.load(vid)
                out.append(time.perf_counter() - start)
                del got
    finally:
        for s in stores:
            s.close()
    return statistics.median(times[0]), statistics.median(times[1])


def _derived(root: Path, base: dict[str, torch.Tensor], models: Models) -> int:
    with mmcore.open(root / "derived") as store:
        v1 = store.save({"base": base}, progress=False)
        v2 = store.save(models, approach="update", parent=v1, derived_from="auto", progress=False)
        assert_same_models(store.load(v2), models)
        return store.info(v1).stored_bytes + store.info(v2).stored_bytes


def row(name: str, models: Models, base: dict[str, torch.Tensor] | None, root: Path,
        log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    log(f"{name}: saving ...")
    raw = sum(t.numel() * t.element_size() for sd in models.values() for t in sd.values())
    shared = _saved(root, f"{name}-shared", models, True)
    coded = _saved(root, f"{name}-coded", models, True, compress=True)
    plain_s, coded_s = _loads(root, (f"{name}-shared", f"{name}-coded"))
    return {"set": name, "models": len(models), "raw": raw,
            "baseline": _saved(root, f"{name}-plain", models, False), "dedup": shared,
            "compression": coded, "load_plain_s": plain_s, "load_coded_s": coded_s,
            "derived_from": None if base is None else _derived(root, base, models),
            "zipnn": zipnn_bytes(models)}  # fmt: skip


def measure(arch: str, finetunes: int, cells: int, steps: tuple[int, ...],
            log: Callable[[str], None], which: str = "all") -> list[dict[str, Any]]:  # fmt: skip
    sets: list[tuple[str, Models, dict[str, torch.Tensor] | None]] = []
    if which == "all":
        base, (head, every) = vision.family(arch, finetunes, base_steps=steps[0], log=log,
                                            modes=[("head", steps[1]), ("all", steps[2])])  # fmt: skip
        sets += [(f"{finetunes} {arch} fine-tunes, frozen backbone", head, base),
                 (f"{finetunes} {arch} fine-tunes, all layers", every, base)]  # fmt: skip
    log(f"training {cells:,} battery cells ...")
    fleet = battery.make_cells(cells, seed=0)
    trained = battery.train(fleet, battery.make_data(list(fleet), rows=64, seed=1), seed=0,
                            lr=0.05, epochs=2)  # fmt: skip
    sets.append((f"{cells:,} battery cells, trained", trained, None))
    root = Path(tempfile.mkdtemp(prefix="mmcore-sizes-"))
    try:
        return [row(name, models, b, root, log) for name, models, b in sets]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(rows: list[dict[str, Any]]) -> None:
    cols = ["raw", "baseline", "dedup", "compression", "derived_from", "zipnn"]
    heads = ["raw", "baseline", "+ dedup", "+ compression", "+ derived_from", "ZipNN"]
    print(f"{'set':44} " + " ".join(f"{h:>16}" for h in heads) + "   load x")
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{'-':>16}" if v is None else f"{v / 1e6:>8.1f} MB {v / r['raw']:>4.2f}")
        load = r["load_coded_s"] / r["load_plain_s"]
        print(f"{r['set'][:44]:44} " + " ".join(cells) + f"   {load:>5.2f}")
    print("load x: load of the + compression store / load of the + dedup store (hashes checked, "
          "median of alternating runs)")  # fmt: skip
    for line in PUBLISHED:
        print(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet50", "mobilenet_v2"])
    p.add_argument("--finetunes", type=int, default=10)
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--steps", type=int, nargs=3, default=[20, 20, 5], metavar=("BASE", "HEAD", "ALL"),
                   help="training steps of the base, of a head fine-tune and of an all-layer one")  # fmt: skip
    p.add_argument("--sets", choices=["all", "cells"], default="all",
                   help="cells: the battery cells only (no vision training)")  # fmt: skip
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = measure(args.arch, args.finetunes, args.cells, tuple(args.steps),
                   lambda s: print(s, file=sys.stderr, flush=True), args.sets)  # fmt: skip
    report(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_name(), "torch": torch.__version__,
                                         "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                        indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
