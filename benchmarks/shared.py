"""Shared tensors (issue 23's first bar): a set of frozen-backbone fine-tunes saved as
a baseline costs about one backbone, not one per model.

The harness's image use case: a ResNet trained on digits, then fine-tunes of its head
only (frozen backbone, BN statistics unchanged), one per task
(benchmarks/harness/vision.py). Saved as one baseline three ways, each in its own
store, each loaded back bit for bit:

- ``one``: the first fine-tune alone (the bar's unit: the stored bytes of one model);
- ``shared``: the whole set, tensors equal across models stored once (the default);
- ``plain``: the whole set with sharing off (``SHARE_MIN`` past every tensor): what a
  baseline stored before.

The bar: ``shared`` at most 1.15x ``one``. Also printed: save times (the median of
``--repeat`` saves into new stores, sharing on and off taking turns) and load,
load_stacked and load_model times of ``shared`` against ``plain`` in the same run;
and the same for a set of battery cells (``make_cells``: each initialised apart),
where nothing is shared: the cost of looking.

    python benchmarks/shared.py [--arch resnet50] [--finetunes 10] [--cells 10000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: the repository root makes `benchmarks` importable,
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (which drops the root again where mmcore/ is unbuilt)

import torch

import mmcore
from benchmarks.harness import vision
from benchmarks.harness.measure import assert_same_models, machine_name, timed
from mmcore.examples import battery
from mmcore.paths import baseline

Models = dict[str, dict[str, torch.Tensor]]


@contextmanager
def _sharing(on: bool) -> Iterator[None]:
    old = baseline.SHARE_MIN
    baseline.SHARE_MIN = old if on else 1 << 62
    try:
        yield
    finally:
        baseline.SHARE_MIN = old


def _saves(root: Path, models: Models, keys: list[tuple[str, bool]],
           repeat: int) -> dict[str, float]:  # fmt: skip
    """The median time of saving ``models`` as a baseline into a new store, per (key,
    sharing on or off), the keys taking turns (a disk busy with one's write-back
    slows the next, whichever it is)."""
    times: dict[str, list[float]] = {key: [] for key, _ in keys}
    for r in range(repeat):
        for key, share in keys[r % 2 :] + keys[: r % 2]:
            path = root / f"{key}-{r}"
            with mmcore.open(path) as store, _sharing(share):
                t0 = time.perf_counter()
                store.save(models, progress=False)
                times[key].append(time.perf_counter() - t0)
            shutil.rmtree(path)
    return {key: statistics.median(t) for key, t in times.items()}


def _timed_set(store: mmcore.ModelStore, models: Models, share: bool,
               repeat: int) -> dict[str, Any]:  # fmt: skip
    """Saves ``models`` as a baseline (sharing on or off) and times its loads."""
    with _sharing(share):
        t0 = time.perf_counter()
        vid = store.save(models, progress=False)
        save_s = time.perf_counter() - t0
    last = list(models)[-1]
    assert_same_models(store.load(vid), models)
    assert_same_models(store.load_stacked(vid).state_dicts(), models)
    assert_same_models({last: store.load_model(vid, last)}, {last: models[last]})
    groups = store.manifest(vid).groups
    return {"stored_bytes": store.info(vid).stored_bytes, "save_s": save_s,
            "shared_groups": sum(g.shared is not None for g in groups),
            "load_s": timed(lambda: store.load(vid), repeat)[0],
            "load_stacked_s": timed(lambda: store.load_stacked(vid), repeat)[0],
            "load_model_s": timed(lambda: store.load_model(vid, last), repeat)[0]}  # fmt: skip


def measure(arch: str, finetunes: int, cells: int, base_steps: int, head_steps: int, repeat: int,
            log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    _, (tunes,) = vision.family(arch, finetunes, modes=[("head", head_steps)],
                                base_steps=base_steps, log=log)  # fmt: skip
    names = list(tunes)
    raw = sum(t.numel() * t.element_size() for sd in tunes.values() for t in sd.values())
    out: dict[str, Any] = {"arch": arch, "finetunes": finetunes, "raw_bytes": raw,
                           "base_steps": base_steps, "head_steps": head_steps, "cells": cells}  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="mmcore-shared-"))
    try:
        with mmcore.open(root / "one") as one:
            out["one"] = _timed_set(one, {names[0]: tunes[names[0]]}, True, repeat)
        sets = [("", tunes)]
        if cells:
            sets.append(("cells_", battery.make_cells(cells, seed=0)))
        for prefix, models in sets:
            keys = [(f"{prefix}shared", True), (f"{prefix}plain", False)]
            log(f"saving {len(models):,} models, sharing on and off, {repeat} times each ...")
            saves = _saves(root, models, keys, repeat)
            for key, share in keys:
                with mmcore.open(root / key) as store:
                    out[key] = _timed_set(store, models, share, repeat)
                    out[key]["first_save_s"] = out[key]["save_s"]
                    out[key]["save_s"] = saves[key]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def report(r: dict[str, Any]) -> list[tuple[str, bool]]:
    mb = 1e6
    print(f"{r['finetunes']} frozen-backbone fine-tunes of {r['arch']}: "
          f"{r['raw_bytes'] / mb:.1f} MB of parameters")  # fmt: skip
    print(
        f"{'':13} {'stored':>10} {'x one':>7} {'save':>8} {'load':>8} {'stacked':>8} {'load_model':>11}"
    )
    rows = [("one model", "one"), ("shared", "shared"), ("plain", "plain")]
    if r.get("cells"):
        rows += [("cells shared", "cells_shared"), ("cells plain", "cells_plain")]
    for label, key in rows:
        row = r[key]
        times = (f"{row['save_s']:>7.2f}s {row['load_s']:>7.3f}s {row['load_stacked_s']:>7.3f}s "
                 f"{row['load_model_s'] * 1e3:>8.1f} ms")  # fmt: skip
        ratio = row["stored_bytes"] / r["one"]["stored_bytes"] if "cells" not in key else 0
        print(f"{label:13} {row['stored_bytes'] / mb:>7.1f} MB {ratio:>6.3f}x {times}")
    s, p = r["shared"], r["plain"]
    ratio = s["stored_bytes"] / r["one"]["stored_bytes"]
    print(f"shared against plain: stored {s['stored_bytes'] / p['stored_bytes']:.3f}x, save "
          f"{s['save_s'] / p['save_s']:.2f}x, load {s['load_s'] / p['load_s']:.2f}x, load_stacked "
          f"{s['load_stacked_s'] / p['load_stacked_s']:.2f}x, load_model "
          f"{s['load_model_s'] / p['load_model_s']:.2f}x")  # fmt: skip
    if r.get("cells"):
        c, q = r["cells_shared"], r["cells_plain"]
        print(f"cells, sharing on against off: save {c['save_s'] / q['save_s']:.2f}x, load "
              f"{c['load_s'] / q['load_s']:.2f}x (groups sharing: {c['shared_groups']})")  # fmt: skip
    return [(f"frozen-backbone set at most 1.15x one model ({ratio:.3f}x)", ratio <= 1.15)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="resnet50", choices=sorted(vision.HEAD))
    ap.add_argument("--finetunes", type=int, default=10)
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--base-steps", type=int, default=20)
    ap.add_argument("--head-steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    r = measure(args.arch, args.finetunes, args.cells, args.base_steps, args.head_steps,
                args.repeat, lambda s: print(s, file=sys.stderr))  # fmt: skip
    r["machine"] = machine_name()
    r["torch"] = torch.__version__
    r["date"] = time.strftime("%Y-%m-%d")
    bars = report(r)
    for text, ok in bars:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0 if all(ok for _, ok in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
