"""``mmcore demo``: the battery use case end to end, narrated."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

import mmcore

from ..errors import InvalidArgumentError
from .battery import battery_set, ffnn
from .battery import main as battery_main
from .measure import human_bytes

DEMO_KEY = b"created-by"
DEMO_VALUE = b"mmcore demo"


def _clear_previous_demo(path: Path) -> None:
    """Removes a store an earlier ``mmcore demo`` made at ``path``, and nothing else.

    A missing path or an empty directory is fine; anything else (a file, a
    directory of someone's files, a store with versions of its own) is refused.
    """
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    refuse = InvalidArgumentError(
        f"{path} exists and was not made by `mmcore demo`; the demo deletes only stores it "
        "made itself. Pass --store with a new path, or remove it yourself."
    )
    if not (path / "MMCORE").is_file():
        raise refuse
    with mmcore.open(path, readonly=True, create=False) as old:
        made_by_demo = old.catalog.get("meta", DEMO_KEY) == DEMO_VALUE
    if not made_by_demo:
        raise refuse
    shutil.rmtree(path)


def _command_name() -> str:
    """How to run the ``mmcore`` command from here: its venv path when not on PATH."""
    script = Path(sys.executable).parent / "mmcore"
    if shutil.which("mmcore") == str(script) or not script.exists():
        return "mmcore"
    return os.path.relpath(script)


def _step(text: str, seconds: float) -> None:
    print(f"  {text:<58} {seconds * 1e3:>9.1f} ms", flush=True)


def run(cells: int, store_path: Path, compare: bool, repeat: int) -> int:
    print(f"mmcore {mmcore.__version__} demo: {cells:,} battery-cell models (FFNN 5-48-48-48-1)")
    t0 = time.perf_counter()
    sds = battery_set(cells)
    nbytes = sum(t.numel() * t.element_size() for sd in sds.values() for t in sd.values())
    _step(f"built {cells:,} models ({human_bytes(nbytes)} of parameters)", time.perf_counter() - t0)
    _clear_previous_demo(store_path)
    cli = _command_name()
    with mmcore.open(store_path) as store:
        store.catalog.commit([("meta", DEMO_KEY, DEMO_VALUE)])
        t0 = time.perf_counter()
        v1 = store.save(sds, approach="baseline", ref="battery", message="demo baseline")
        _step(f"saved baseline {v1} into {store_path}", time.perf_counter() - t0)
        t0 = time.perf_counter()
        loaded = store.load(v1)
        _step(f"recovered all {len(loaded):,} models (BLAKE3 checked)", time.perf_counter() - t0)
        same = all(torch.equal(loaded[n][k], t) for n, sd in sds.items() for k, t in sd.items())
        del loaded
        name = next(iter(sds))
        t0 = time.perf_counter()
        one = store.load_model(v1, name)
        _step(f"recovered one model ({name}, {len(one)} tensors)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        checked = store.verify(v1)
        _step(f"verified {checked:,} tensors", time.perf_counter() - t0)
        x = torch.randn(cells, 64, 5, generator=torch.Generator().manual_seed(1))
        with torch.device("meta"):
            template = ffnn()  # structure only: the stack brings every cell's tensors
        t0 = time.perf_counter()
        with torch.no_grad():
            ens = store.load_stacked(v1)  # every tensor a [cells, ...] view of the records
            y = ens.forward(template, x)
        _step(
            f"recovered as one stack, ran all {cells:,} on 64 rows each", time.perf_counter() - t0
        )
        first = ffnn()
        first.load_state_dict(sds[name])
        with torch.no_grad():
            gap = float((y[0] - first(x[0])).abs().max())
        print(
            f"  ensemble output {tuple(y.shape)}; {name} as a module gives the same within {gap:.1e}"
        )
        del ens, y
        info = store.info(v1)
        print(f"  bit-exact round trip: {'yes' if same else 'NO'}")
        print(
            f"  stored {human_bytes(info.stored_bytes)} for {human_bytes(info.logical_bytes)} of parameters "
            f"({info.stored_bytes / info.logical_bytes:.4f}x)"
        )
    print(
        f"  inspect it: {cli} info {store_path} {v1} | {cli} log {store_path} battery | "
        f"{cli} verify {store_path}"
    )
    if not same:
        return 1
    if compare:
        print(
            "\ncomparison with what users would pick instead (same process, medians):", flush=True
        )
        return battery_main(["--cells", str(cells), "--repeat", str(repeat)])
    return 0
