"""Sets as stacks on the battery use case: ``python -m benchmarks.stacked``.

Everything is measured in one process on one set of N cells (FFNN 5-48-48-48-1),
each time against its baseline from the same run (medians of ``--repeat`` runs):

- ``load_stacked`` of the set against a raw read of the same bytes from one file
  (both from the page cache, and both after evicting it);
- ``Stack.forward`` of every cell on 64 rows against a loop over the cells' modules;
- end to end, from ``mmcore.open`` to every cell's output: ``load_stacked`` +
  ``forward`` against ``load`` + building each module (``factory()`` and
  ``load_state_dict``) + a loop over them;
- saving the cells as ``nn.Module`` objects and with ``save_stacked`` against saving
  their state dicts;
- ways of building N modules: ``factory()`` + ``load_state_dict``, meta-device
  construction + ``load_state_dict(assign=True)``, ``copy.deepcopy`` of a template +
  ``load_state_dict``, and ``load_modules`` (per module, on ``--option-cells``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mmcore
from mmcore._units import human_bytes
from mmcore.examples.battery import ffnn

from .measure import evict, files_under, machine_name, timed
from .methods import Raw

ROWS = 64


def meta_ffnn(name: str = "") -> torch.nn.Module:
    with torch.device("meta"):
        return ffnn()


def build_slow(sds: dict[str, dict[str, torch.Tensor]],
               device: torch.device | None = None) -> dict[str, torch.nn.Module]:  # fmt: skip
    """What a user does without mmcore: construct each module (moved to ``device``, a
    GPU) and load its state."""
    out: dict[str, torch.nn.Module] = {}
    for name, sd in sds.items():
        m = ffnn() if device is None else ffnn().to(device)
        m.load_state_dict(sd)
        out[name] = m
    return out


def loop(modules: dict[str, torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([m(x[i]) for i, m in enumerate(modules.values())])


def build_options(sds: dict[str, dict[str, torch.Tensor]], store: mmcore.ModelStore,
                  version: str) -> dict[str, float]:  # fmt: skip
    """Seconds per module of each way to build the set's modules."""
    n = len(sds)
    template = ffnn()

    def meta_assign() -> None:
        for sd in sds.values():
            m = meta_ffnn()
            m.load_state_dict(sd, assign=True)

    def deepcopy() -> None:
        for sd in sds.values():
            m = copy.deepcopy(template)
            m.load_state_dict(sd)

    return {
        "factory() + load_state_dict": timed(lambda: build_slow(sds), 1)[0] / n,
        "meta construction + load_state_dict(assign=True)": timed(meta_assign, 1)[0] / n,
        "copy.deepcopy(template) + load_state_dict": timed(deepcopy, 1)[0] / n,
        "mmcore load_modules (load and clone)": timed(
            lambda: store.load_modules(version, meta_ffnn), 3
        )[0]
        / n,
    }


def fresh_saves(root: Path, fns: dict[str, Callable[[mmcore.ModelStore], Any]],
                repeat: int) -> dict[str, float]:  # fmt: skip
    """Median seconds of each save, each into a new store (made and removed untimed, so
    every save writes its bytes: none is a duplicate of a stored blob), run in turns
    (A, B, C, A, B, C, ...): on a shared, noisy machine the ratios hold better so."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeat):
        for name, fn in fns.items():
            path = root / f"save-{i}-{len(times[name])}-{name[:12].replace(' ', '_')}"
            with mmcore.open(path) as store:
                gc.collect()
                t0 = time.perf_counter()
                fn(store)
                times[name].append(time.perf_counter() - t0)
            shutil.rmtree(path)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(cells: int, repeat: int, option_cells: int, root: Path) -> dict[str, Any]:
    from mmcore.examples import battery

    sds = battery.make_cells(cells, seed=0)
    names = list(sds)
    x = torch.randn(cells, ROWS, 5, generator=torch.Generator().manual_seed(1))
    nbytes = sum(t.numel() * t.element_size() for sd in sds.values() for t in sd.values())
    out: dict[str, Any] = {"cells": cells, "bytes": nbytes, "rows": ROWS, "machine": machine_name(),
                           "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    (root / "raw").mkdir()
    raw = Raw(root / "raw")
    raw.prepare(sds)
    raw.save(sds)
    path = root / "store.mm"
    store = mmcore.open(path)
    v = store.save(sds, ref="cells")
    t: dict[str, float] = {}
    t["raw read, page cache"] = timed(raw.load_all, repeat)[0]
    t["load_stacked, page cache"] = timed(lambda: store.load_stacked(v), repeat)[0]
    t["load_stacked without hash check, page cache"] = timed(
        lambda: store.load_stacked(v, verify=False), repeat
    )[0]
    t["load (state dicts), page cache"] = timed(lambda: store.load(v), repeat)[0]

    def cold(paths: list[Path]) -> None:
        evict(paths)

    t["raw read, evicted"] = timed(
        raw.load_all, repeat, setup=lambda: cold(files_under(root / "raw"))
    )[0]
    t["load_stacked, evicted"] = timed(
        lambda: store.load_stacked(v), repeat, setup=lambda: cold(files_under(path))
    )[0]
    print(f"  load: {t['load_stacked, page cache']:.3f} s stacked, raw {t['raw read, page cache']:.3f} s",
          flush=True)  # fmt: skip

    ens = store.load_stacked(v)
    template = meta_ffnn()
    modules = store.load_modules(v, meta_ffnn)  # held until the end-to-end run reopens the store
    with torch.no_grad():
        t["forward, stacked"], y = timed(lambda: ens.forward(template, x), repeat)
    t["forward, loop over modules"], y_loop = timed(lambda: loop(modules, x), repeat)
    out["forward max abs difference"] = float((y - y_loop).abs().max())
    print(f"  forward: {t['forward, stacked']:.3f} s stacked, loop {t['forward, loop over modules']:.3f} s",
          flush=True)  # fmt: skip

    def fast_path() -> torch.Tensor:
        with mmcore.open(path, readonly=True) as s, torch.no_grad():
            y: torch.Tensor = s.load_stacked("cells").forward(meta_ffnn(), x)
        return y

    def slow_path() -> tuple[torch.Tensor, dict[str, torch.nn.Module]]:
        with mmcore.open(path, readonly=True) as s:
            built = build_slow(s.load("cells"))
        return loop(built, x), built

    store.close()
    t["end to end, load_stacked + forward"], y_fast = timed(fast_path, repeat)
    t["end to end, load + modules + loop"], (y_slow, slow_modules) = timed(slow_path, 1)
    out["end to end max abs difference"] = float((y_fast - y_slow).abs().max())
    print(f"  end to end: {t['end to end, load_stacked + forward']:.3f} s stacked, "
          f"{t['end to end, load + modules + loop']:.3f} s with modules", flush=True)  # fmt: skip

    store = mmcore.open(path)
    stack = ens.groups[0]
    t.update(fresh_saves(root, {
        "save, state dicts": lambda s: s.save(sds),
        "save, nn.Modules": lambda s: s.save(slow_modules),
        "save_stacked": lambda s: s.save_stacked(stack.names, stack.params),
    }, repeat))  # fmt: skip
    t["state_dict() of every module"] = timed(
        lambda: [m.state_dict() for m in slow_modules.values()], repeat
    )[0]
    print(f"  save: {t['save, state dicts']:.3f} s state dicts, {t['save, nn.Modules']:.3f} s "
          f"modules, {t['save_stacked']:.3f} s stacked", flush=True)  # fmt: skip
    slow_modules.clear()  # the 10,000 modules go before the next measurements
    some = {n: sds[n] for n in names[:option_cells]}
    small = store.save(some)
    out["build per module (s)"] = build_options(some, store, small)
    t["load_modules, whole set"] = timed(lambda: store.load_modules(v, meta_ffnn), repeat)[0]
    store.close()
    out["seconds"] = t
    out["ratios"] = {
        "load_stacked / raw read, page cache": t["load_stacked, page cache"] / t["raw read, page cache"],
        "load_stacked / raw read, evicted": t["load_stacked, evicted"] / t["raw read, evicted"],
        "loop / forward": t["forward, loop over modules"] / t["forward, stacked"],
        "end to end: modules / stacked": t["end to end, load + modules + loop"]
        / t["end to end, load_stacked + forward"],
        "save nn.Modules / save state dicts": t["save, nn.Modules"] / t["save, state dicts"],
        "save_stacked / save state dicts": t["save_stacked"] / t["save, state dicts"],
        "factory + load_state_dict / load_modules": out["build per module (s)"][
            "factory() + load_state_dict"
        ]
        / out["build per module (s)"]["mmcore load_modules (load and clone)"],
    }  # fmt: skip
    return out


def run_on_device(cells: int, repeat: int, root: Path, device: str) -> dict[str, Any]:
    """The load, forward, end-to-end and save rows with the set on ``device`` (a GPU):
    against a raw read copied there, a loop over modules there, and saving the same
    tensors as state dicts from there. Every timing ends with a synchronisation."""
    from mmcore.examples import battery

    dev = torch.device(device)
    sds = battery.make_cells(cells, seed=0)
    x = torch.randn(cells, ROWS, 5, generator=torch.Generator().manual_seed(1)).to(dev)
    out: dict[str, Any] = {"cells": cells, "rows": ROWS, "machine": machine_name(),
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
                           "torch": torch.__version__,
                           "bytes": sum(t.numel() * t.element_size() for sd in sds.values()
                                        for t in sd.values())}  # fmt: skip
    (root / "raw").mkdir()
    raw = Raw(root / "raw")
    raw.prepare(sds)
    raw.save(sds)
    path = root / "store.mm"
    with mmcore.open(path) as store:
        v = store.save(sds, ref="cells")

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            got = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return got

        return run

    t: dict[str, float] = {}
    with mmcore.open(path, readonly=True) as store, torch.no_grad():
        t["raw read + copy to the device"] = timed(synced(lambda: raw.load_all().to(dev)), repeat)[
            0
        ]
        t["load_stacked to the device"] = timed(
            synced(lambda: store.load_stacked(v, device=dev)), repeat
        )[0]
        ens = store.load_stacked(v, device=dev)
        t["forward, stacked"], y = timed(synced(lambda: ens.forward(meta_ffnn(), x)), repeat)
        modules = store.load_modules(v, meta_ffnn, device=dev)
        t["forward, loop over modules"], y_loop = timed(synced(lambda: loop(modules, x)), repeat)
        out["forward max abs difference"] = float((y - y_loop).abs().max())
        stack = ens.groups[0]
        on_dev = stack.state_dicts()  # the same tensors, as state dicts on the device
        modules.clear()

    def fast_path() -> torch.Tensor:
        with mmcore.open(path, readonly=True) as s, torch.no_grad():
            y: torch.Tensor = s.load_stacked("cells", device=dev).forward(meta_ffnn(), x)
        return y

    def slow_path() -> torch.Tensor:
        with mmcore.open(path, readonly=True) as s:
            built = build_slow(s.load("cells", device=dev), dev)
        return loop(built, x)

    t["end to end, load_stacked + forward"] = timed(synced(fast_path), repeat)[0]
    t["end to end, load + modules + loop"] = timed(synced(slow_path), 1)[0]
    t.update(fresh_saves(root, {
        "save, state dicts": lambda s: s.save(on_dev),
        "save_stacked": lambda s: s.save_stacked(stack.names, stack.params),
    }, repeat))  # fmt: skip
    out["seconds"] = t
    out["ratios"] = {
        "load_stacked / raw read, page cache": t["load_stacked to the device"]
        / t["raw read + copy to the device"],
        "loop / forward": t["forward, loop over modules"] / t["forward, stacked"],
        "end to end: modules / stacked": t["end to end, load + modules + loop"]
        / t["end to end, load_stacked + forward"],
        "save_stacked / save state dicts": t["save_stacked"] / t["save, state dicts"],
    }  # fmt: skip
    return out


BARS = (  # (ratio, bound, "at most" or "at least")
    ("load_stacked / raw read, page cache", 1.2, "at most"),
    ("load_stacked / raw read, evicted", 1.2, "at most"),
    ("loop / forward", 3.0, "at least"),
    ("end to end: modules / stacked", 10.0, "at least"),
    ("save nn.Modules / save state dicts", 1.3, "at most"),
    ("save_stacked / save state dicts", 1.2, "at most"),
    ("factory + load_state_dict / load_modules", 2.0, "at least"),
)


def report(out: dict[str, Any]) -> str:
    where = f"{out['device']} of " if "device" in out else ""
    lines = [
        f"{out['cells']:,} battery cells ({human_bytes(out['bytes'])}), {where}{out['machine']}, "
        f"torch {out['torch']}, {out.get('threads', '-')} threads; medians",
        "",
        "| measured | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in out["seconds"].items()]
    if "build per module (s)" in out:
        lines += ["", "| building one module | microseconds |", "|---|---:|"]
        lines += [f"| {k} | {v * 1e6:.1f} |" for k, v in out["build per module (s)"].items()]
    lines += ["", "| ratio | value | bar |", "|---|---:|---|"]
    for key, bound, kind in BARS:
        if key not in out["ratios"]:
            continue
        value = out["ratios"][key]
        ok = value <= bound if kind == "at most" else value >= bound
        lines.append(f"| {key} | {value:.2f} | {kind} {bound} [{'ok' if ok else 'MISSED'}] |")
    lines += [
        "",
        f"forward against the loop: max abs difference {out['forward max abs difference']:.2e} "
        "(batched matmuls round differently)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--option-cells", type=int, default=1_000, help="cells for the module-building options"
    )
    p.add_argument("--json", type=Path, default=None, help="write the measurements here")
    p.add_argument(
        "--device",
        default="cpu",
        help="cuda: the load, forward and save rows with the set on a GPU",
    )
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    root = Path(tempfile.mkdtemp(prefix="mmcore-stacked-"))
    try:
        t0 = time.perf_counter()
        if args.device == "cpu":
            out = run(args.cells, args.repeat, min(args.option_cells, args.cells), root)
        else:
            out = run_on_device(args.cells, args.repeat, root, args.device)
        out["wall seconds"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report(out))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0
