"""The provenance save path on the battery use case (issue 8's bars).

10,000 cells (FFNN 5->48->48->48->1) are saved as a baseline, their data
(256 rows each) stored as a dataset, all cells retrained for 2 epochs by the
batched trainer of ``mmcore.examples.battery``, and the result saved as a
provenance version of the baseline. Reported, all measured in this one run:
the provenance version's own stored bytes against the baseline's (the dataset's
bytes beside them), the recovery time (load: retrain batched + check every
model's hash) against retraining the same cells one after another with the same
trainer, and that the recovered models equal the saved ones bit for bit.

    python benchmarks/provenance.py [--cells 10000] [--rows 256] [--epochs 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: the repository root makes `benchmarks` importable,
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (which drops the root again where mmcore/ is unbuilt)

import torch

import mmcore
from benchmarks.harness.measure import machine_name
from mmcore._units import human_bytes
from mmcore.examples import battery


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--sequential-cells", type=int, default=0,
                   help="time one-after-another training on this many cells and scale (default: all)")  # fmt: skip
    p.add_argument(
        "--device", default="cpu", help="where the cells and their data live and train (cpu, cuda)"
    )
    p.add_argument(
        "--root", default=None, help="directory for the store (default: a temporary one)"
    )
    args = p.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="mmcore-provenance-"))
    log = lambda text: print(text, flush=True)  # noqa: E731
    try:
        log(
            f"machine: {machine_name()}; torch {torch.__version__}; mmcore {mmcore.__version__}; "
            f"device {args.device}"
            + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        )
        dev = torch.device(args.device)
        cells = {
            n: {k: t.to(dev) for k, t in sd.items()}
            for n, sd in battery.make_cells(args.cells, seed=0).items()
        }
        data = {n: {k: t.to(dev) for k, t in d.items()}
                for n, d in battery.make_data(list(cells), rows=args.rows, seed=1).items()}  # fmt: skip
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        params = {"lr": args.lr, "epochs": args.epochs}
        with mmcore.open(root / "battery.mm") as store:
            v1 = store.save(cells, progress=False)
            ds = store.put_dataset(data, progress=False)
            log(
                f"training {args.cells:,} cells together ({args.epochs} epochs, {args.rows} rows) ..."
            )
            t0 = time.perf_counter()
            trained = battery.train(cells, data, seed=0, **params)  # type: ignore[arg-type]
            sync()
            train_s = time.perf_counter() - t0
            recipe = mmcore.Recipe(battery.TRAINER, data=ds, params=params, seed=0)
            t0 = time.perf_counter()
            v2 = store.save(
                trained, approach="provenance", parent=v1, recipe=recipe, progress=False
            )
            save_s = time.perf_counter() - t0
            base, prov = store.info(v1), store.info(v2)
            dataset_bytes = store.datasets()[ds]["stored_bytes"]
            log("recovering it (retrain batched, check every model) ...")
            t0 = time.perf_counter()
            got = store.load(v2, device=dev)
            sync()
            recover_s = time.perf_counter() - t0
            exact = all(torch.equal(got[n][k], trained[n][k]) for n in trained for k in trained[n])
            log("retraining the same cells one after another with the same trainer ...")
            t0 = time.perf_counter()
            n_seq = min(args.sequential_cells or args.cells, args.cells)
            some = list(cells)[:n_seq]  # every cell costs the same alone: time n_seq, scale up
            battery.train_one_by_one({n: cells[n] for n in some}, {n: data[n] for n in some}, seed=0,
                                     **params)  # type: ignore[arg-type]  # fmt: skip
            sync()
            sequential_s = (time.perf_counter() - t0) * args.cells / n_seq
        own = prov.stored_bytes / base.stored_bytes
        speedup = sequential_s / recover_s
        log(f"baseline version   {human_bytes(base.stored_bytes):>10}")
        log(f"provenance version {human_bytes(prov.stored_bytes):>10}  ({own:.3%} of the baseline)")
        log(
            f"its dataset        {human_bytes(dataset_bytes):>10}  (stored once, beside the versions)"
        )
        log(
            f"batched training {train_s:.2f} s; provenance save (recipe re-run as a check) {save_s:.2f} s"
        )
        scaled = (
            "" if n_seq == args.cells else f" (timed on {n_seq:,} cells, scaled to {args.cells:,})"
        )
        log(
            f"recovery {recover_s:.2f} s; one after another {sequential_s:.2f} s{scaled}: {speedup:.1f}x"
        )
        checks = [
            (f"provenance version <= 1% of the baseline: {own:.3%}", own <= 0.01),
            (
                f"batched recovery >= 50x retraining one after another: {speedup:.1f}x",
                speedup >= 50,
            ),
            (f"recovered bit-identical to the saved models: {exact}", exact),
        ]
        for text, ok in checks:
            log(f"  [{'ok' if ok else 'MISSED'}] {text}")
        return 0
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
