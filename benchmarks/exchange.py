"""Export and import of the battery set through .safetensors files (issue 9's
bar), against the safetensors package's own save_file / load_file in a loop,
in the same run: 10,000 files of one FFNN (5,041 parameters) each.

    python benchmarks/exchange.py [--cells 10000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: the repository root makes `benchmarks` importable,
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (which drops the root again where mmcore/ is unbuilt)

import safetensors.torch

import mmcore
from benchmarks.harness.measure import machine_name
from mmcore.examples import battery


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mmcore-exchange-"))
    try:
        print(
            f"machine: {machine_name()}; mmcore {mmcore.__version__}; safetensors {safetensors.__version__}"
        )
        cells = battery.make_cells(args.cells, seed=0)
        rows = {"export": [], "save_file": [], "import": [], "load_file": []}
        with mmcore.open(root / "s.mm") as store:
            v1 = store.save(cells, progress=False)
            for i in range(args.repeat):
                out, plain = root / f"out{i}", root / f"plain{i}"
                plain.mkdir()
                t0 = time.perf_counter()
                for name, sd in cells.items():
                    safetensors.torch.save_file(sd, str(plain / f"{name}.safetensors"))
                rows["save_file"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                store.export(v1, out, progress=False)
                rows["export"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for f in sorted(plain.iterdir()):
                    safetensors.torch.load_file(str(f))
                rows["load_file"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                store.import_(out, progress=False)
                rows["import"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"{args.cells:,} files, medians of {args.repeat}:")
        for k, v in med.items():
            print(f"  {k:<10} {v:7.3f} s")
        checks = [
            (f"export <= save_file loop: {med['export'] / med['save_file']:.2f}x", med["export"] <= med["save_file"]),
            (f"import (read + save as a version) <= load_file loop: {med['import'] / med['load_file']:.2f}x",
             med["import"] <= med["load_file"]),
        ]  # fmt: skip
        for text, ok in checks:
            print(f"  [{'ok' if ok else 'MISSED'}] {text}")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
