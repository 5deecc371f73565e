"""The paper's battery use case: one small FFNN (5->48->48->48->1, 5,041
parameters) per battery cell, thousands of cells saved and recovered as a set.

Every method gets the same state dicts and makes its files durable (fsync)
before the clock stops; each is timed by the median of repeated runs in this
one process, and compared with mmcore by ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import mmcore
from mmcore._units import human_bytes
from mmcore.examples.battery import LAYERS, ffnn

from . import updates
from .measure import evict, files_under, machine_name, peak_rss, timed
from .methods import Method, MMCore, Raw, SafetensorsOneFile, SafetensorsPerModel, TorchSavePerModel

StateDicts = dict[str, dict[str, torch.Tensor]]


def battery_set(cells: int, seed: int = 0) -> StateDicts:
    """``cells`` independently initialised FFNNs, as state dicts (real modules' tensors)."""
    torch.manual_seed(seed)
    return {
        f"cell_{i:06d}": {k: v.detach() for k, v in ffnn().state_dict().items()}
        for i in range(cells)
    }


def battery_set_fast(cells: int, seed: int = 0) -> StateDicts:
    """The same set without building modules: views of one tensor, initialised as
    nn.Linear does (uniform in +-1/sqrt(fan_in)). For sets too big to build module by module."""
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for i in range(len(LAYERS) - 1):
        shapes += [
            (f"{2 * i}.weight", (LAYERS[i + 1], LAYERS[i]), LAYERS[i]),
            (f"{2 * i}.bias", (LAYERS[i + 1],), LAYERS[i]),
        ]
    per_model = sum(math.prod(shape) for _, shape, _ in shapes)
    flat = torch.rand(cells, per_model, generator=g).mul_(2).sub_(1)
    out: StateDicts = {}
    col = 0
    columns = []
    for name, shape, fan_in in shapes:
        n = math.prod(shape)
        block = flat[:, col : col + n]
        block.mul_(1 / math.sqrt(fan_in))
        columns.append((name, block.reshape(cells, *shape).unbind(0)))
        col += n
    for i in range(cells):
        out[f"cell_{i:06d}"] = {name: views[i] for name, views in columns}
    return out


@dataclass
class Row:
    method: str
    save_s: float
    load_s: float
    load_verify_s: float | None
    load_one_ms: float
    stored_bytes: int
    repeats: int
    extra: dict[str, Any] = field(default_factory=dict)


def _median_one(fn: Callable[[str], Any], names: list[str], samples: int) -> float:
    rng = random.Random(7)
    picks = [rng.choice(names) for _ in range(samples)]
    fn(picks[0])  # warm the manifest / file handles once, as a running service would be
    times = []
    for name in picks:
        t0 = time.perf_counter()
        fn(name)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _check_equal(sds: StateDicts, got: StateDicts) -> None:
    for name, sd in sds.items():
        for k, t in sd.items():
            if not torch.equal(got[name][k].cpu(), t.cpu()):
                raise AssertionError(f"round trip changed {name}/{k}")


def run_method(
    method: Method, sds: StateDicts, repeat: int, cold: bool, log: Callable[[str], None]
) -> Row:
    reps = 1 if method.slow else repeat
    names = list(sds)
    log(f"  {method.name}: save x{reps} ...")
    save_s, _ = timed(lambda: method.save(sds), reps, setup=method.reset)
    stored = sum(p.stat().st_size for p in files_under(method.root))
    files = files_under(method.root)
    setup = (lambda: evict(files)) if cold else None
    log(f"  {method.name}: load x{reps} ...")
    load_s, got = timed(method.load_all, reps, setup=setup)
    if not isinstance(method, Raw):
        _check_equal(sds, got)
    del got
    load_verify_s = None
    if isinstance(method, MMCore):
        load_verify_s, got = timed(lambda: method.load_all(verify=True), reps, setup=setup)
        _check_equal(sds, got)
        del got
    samples = 50 if method.slow else 200
    one_s = _median_one(method.load_one, names, samples)
    row = Row(method.name, save_s, load_s, load_verify_s, one_s * 1e3, stored, reps)
    if isinstance(method, MMCore):
        tier = method.open_store.tier
        before = tier.bytes_read
        method.load_one(names[len(names) // 2])
        row.extra["load_one_payload_bytes_read"] = tier.bytes_read - before
        row.extra["model_bytes"] = sum(t.numel() * t.element_size() for t in sds[names[0]].values())
    return row


def memory_check(cells: int, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Peak RSS growth of mmcore's save and load, as a multiple of the set's parameter bytes."""
    log(f"memory check: building {cells:,} cells ...")
    sds = battery_set_fast(cells, seed=1)
    param_bytes = sum(t.numel() * t.element_size() for sd in sds.values() for t in sd.values())
    with mmcore.open(root / "memory.mm") as store:
        with peak_rss() as save_mem:
            vid = store.save(sds, progress=False)
        with peak_rss() as load_mem:
            loaded = store.load(vid)
        _check_equal(sds, loaded)
        del loaded
    return {
        "cells": cells,
        "param_bytes": param_bytes,
        "save_peak_growth_x": (save_mem["peak"] - save_mem["start"]) / param_bytes,
        "load_peak_growth_x": (load_mem["peak"] - load_mem["start"]) / param_bytes,
    }


def format_table(rows: list[Row], param_bytes: int) -> str:
    mm = next(r for r in rows if r.method == MMCore.name)
    head = (
        f"{'method':<34} {'save s':>8} {'load s':>8} {'load+hash s':>11} {'one model ms':>12} "
        f"{'stored MB':>10} {'save GB/s':>9} {'load GB/s':>9} {'save/mm':>8} {'load/mm':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lv = f"{r.load_verify_s:.3f}" if r.load_verify_s is not None else "-"
        lines.append(
            f"{r.method:<34} {r.save_s:>8.3f} {r.load_s:>8.3f} {lv:>11} {r.load_one_ms:>12.3f} "
            f"{r.stored_bytes / 1e6:>10.1f} {param_bytes / r.save_s / 1e9:>9.2f} "
            f"{param_bytes / r.load_s / 1e9:>9.2f} {r.save_s / mm.save_s:>7.2f}x {r.load_s / mm.load_s:>7.2f}x"
        )
    return "\n".join(lines)


COLUMNS = """\
  save s, load s   median seconds of {repeat} runs (1 for a file per model) to write the set and
                   fsync it, and to read it back as tensors (mmcore's "load": no hash check)
  load+hash s      mmcore's load with every tensor's BLAKE3 hash checked (load's default)
  one model ms     median milliseconds to read one model back (random picks)
  stored MB        bytes of the files the method left on disk
  save/load GB/s   the set's parameter bytes over the median time
  save/mm, load/mm the row's time over mmcore's: 2.00x takes twice as long, 0.50x half as long"""
MISSED = (
    "  a missed target is a measurement on this machine, not an error (exit status 0): fsync and "
    "read times swing on shared or virtual disks and busy cores; --repeat 5 takes more runs"
)


def bars(
    rows: list[Row], param_bytes: int, memory: dict[str, Any] | None
) -> list[tuple[str, bool]]:
    by = {r.method: r for r in rows}
    mm, raw = by[MMCore.name], by[Raw.name]
    checks = [
        (
            f"save <= 1.5x raw write+fsync: {mm.save_s / raw.save_s:.2f}x",
            mm.save_s <= 1.5 * raw.save_s,
        ),
        (
            f"load (no hash) <= 2x raw read: {mm.load_s / raw.load_s:.2f}x",
            mm.load_s <= 2 * raw.load_s,
        ),
    ]
    if mm.load_verify_s is not None:
        checks.append(
            (
                f"load (hash) <= 3x raw read: {mm.load_verify_s / raw.load_s:.2f}x",
                mm.load_verify_s <= 3 * raw.load_s,
            )
        )
    ts = by.get(TorchSavePerModel.name)
    if ts is not None:
        checks.append(
            (
                f"save >= 10x faster than torch.save per model: {ts.save_s / mm.save_s:.1f}x",
                ts.save_s >= 10 * mm.save_s,
            )
        )
        checks.append(
            (
                f"load >= 10x faster than torch.load per model: {ts.load_s / mm.load_s:.1f}x",
                ts.load_s >= 10 * mm.load_s,
            )
        )
    checks.append((f"one model < 5 ms median: {mm.load_one_ms:.2f} ms", mm.load_one_ms < 5))
    read = mm.extra.get("load_one_payload_bytes_read", 0)
    model = mm.extra.get("model_bytes", 1)
    checks.append(
        (
            f"one model reads its own bytes: {read:,} B payload for a {model:,} B model",
            read <= model + 4096,
        )
    )
    checks.append(
        (
            f"stored <= 1.02x parameter bytes: {mm.stored_bytes / param_bytes:.4f}x",
            mm.stored_bytes <= 1.02 * param_bytes,
        )
    )
    if memory is not None:
        peak = max(memory["save_peak_growth_x"], memory["load_peak_growth_x"])
        checks.append(
            (
                f"{memory['cells']:,} cells: peak memory growth {peak:.2f}x parameter bytes (<= 3x)",
                peak <= 3,
            )
        )
    return checks


METHODS = {"raw": Raw, "mmcore": MMCore, "torch": TorchSavePerModel,
           "safetensors": SafetensorsPerModel, "safetensors-set": SafetensorsOneFile}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="battery", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", type=int, default=10_000, help="models in the set (default 10,000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; median reported")
    p.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}"
    )
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument(
        "--cold", action="store_true", help="drop files from the page cache before each read"
    )
    p.add_argument(
        "--memory-cells", type=int, default=0, help="also check peak memory with this many cells"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--updates", action="store_true",
        help="also save 1%%, 10%% and 100%% retrained versions as updates, and a chain of ten",
    )  # fmt: skip
    p.add_argument(
        "--tiny", type=int, default=0, metavar="MODELS",
        help="also time this many tiny models (8 tensors of 16 bytes) saved and loaded: "
        "the Python cost per tensor",
    )  # fmt: skip
    p.add_argument(
        "--device", default="cpu", help="where the model set lives before saving (cpu, cuda)"
    )
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or "raw" not in names or "mmcore" not in names:
        p.error(
            f"--methods must include raw and mmcore, from {', '.join(METHODS)}; got {args.methods!r}"
        )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="mmcore-bench-", dir=args.dir))
    try:
        log(f"building the battery set: {args.cells:,} cells ...")
        sds = battery_set(args.cells)
        if args.device != "cpu":
            sds = {m: {k: t.to(args.device) for k, t in sd.items()} for m, sd in sds.items()}
        param_bytes = sum(t.numel() * t.element_size() for sd in sds.values() for t in sd.values())
        rows = []
        for key in names:
            method = METHODS[key](root / key)
            if isinstance(method, Raw):
                method.prepare(sds)
            try:
                rows.append(run_method(method, sds, args.repeat, args.cold, log))
            finally:
                method.close()
                shutil.rmtree(method.root, ignore_errors=True)
        memory = memory_check(args.memory_cells, root, log) if args.memory_cells else None
        update_res = None
        if args.updates:
            log("update path ...")
            cpu_sds = {m: {k: t.cpu() for k, t in sd.items()} for m, sd in sds.items()}
            update_res = updates.run(cpu_sds, root, args.repeat, log)
        tiny_res = updates.tiny(args.tiny, args.repeat, root, log) if args.tiny else None
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"battery set: {args.cells:,} cells x 5,041 parameters (FFNN 5-48-48-48-1), "
        f"{human_bytes(param_bytes)} of float32; {'cold' if args.cold else 'warm'} page cache"
    )
    print(f"machine: {machine_name()}; torch {torch.__version__}; mmcore {mmcore.__version__}")
    print(format_table(rows, param_bytes))
    print(COLUMNS.format(repeat=args.repeat))
    checks = bars(rows, param_bytes, memory)
    if update_res is not None:
        checks += updates.report(update_res)
    if tiny_res is not None:
        checks += updates.tiny_report(tiny_res)
    if args.cells != 10_000:
        print(
            "  (the bars below are stated for 10,000 cells; fixed costs weigh more in smaller sets)"
        )
    for text, ok in checks:
        print(f"  [{'ok' if ok else 'missed here'}] {text}")
    if not all(ok for _, ok in checks):
        print(MISSED)
    if args.json:
        args.json.write_text(json.dumps({
            "cells": args.cells, "param_bytes": param_bytes, "cold": args.cold, "machine": machine_name(),
            "torch": torch.__version__, "rows": [asdict(r) for r in rows], "memory": memory,
            "bars": [{"check": t, "ok": ok} for t, ok in checks], "updates": update_res, "tiny": tiny_res,
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
