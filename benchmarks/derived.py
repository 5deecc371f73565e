"""Fine-tunes stored as deltas of their base (``save(..., derived_from=...)``, issue
23's second bar), on the harness's image use case: a ResNet trained on digits, then
all-layer fine-tunes of it, one per task (benchmarks/harness/vision.py).

Three ways to keep the family, each in its own store, each version loaded back and
compared bit for bit:

- ``today``: what an update needed before: the base saved once per fine-tune's name
  (``{ft_k: base}``, the harness's "deployed" version), then the fine-tunes as an
  update of it;
- ``derived``: the base saved once, then the fine-tunes as an update with
  ``derived_from="auto"`` (the base dropped in the same version);
- ``whole``: the fine-tunes as a baseline.

The bar: the derived update's deltas (model blobs, tables, hashes) at most the
``today`` update's (the same deltas; the manifests differ by a few bytes: the derived
one names each fine-tune's source). Also printed: each store's total, and load / load_model times against the
baseline's in the same run.

    python benchmarks/derived.py [--arch resnet50] [--finetunes 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
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
from benchmarks.harness.measure import assert_same_models, machine_name, timed

Models = dict[str, dict[str, torch.Tensor]]


def measure(arch: str, finetunes: int, base_steps: int, all_steps: int, repeat: int,
            log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    base, (tunes,) = vision.family(arch, finetunes, modes=[("all", all_steps)],
                                   base_steps=base_steps, log=log)  # fmt: skip
    names = list(tunes)
    raw = sum(t.numel() * t.element_size() for sd in tunes.values() for t in sd.values())
    out: dict[str, Any] = {"arch": arch, "finetunes": finetunes, "raw_bytes": raw,
                           "base_steps": base_steps, "all_steps": all_steps}  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="mmcore-derived-"))
    try:
        with (mmcore.open(root / "today") as today, mmcore.open(root / "derived") as derived,
              mmcore.open(root / "whole") as whole):  # fmt: skip
            t1 = today.save(dict.fromkeys(names, base), progress=False)
            t0 = time.perf_counter()
            t2 = today.save(tunes, approach="update", parent=t1, progress=False)
            today_save = time.perf_counter() - t0
            d1 = derived.save({"base": base}, progress=False)
            t0 = time.perf_counter()
            d2 = derived.save(tunes, approach="update", parent=d1, derived_from="auto",
                              progress=False)  # fmt: skip
            derived_save = time.perf_counter() - t0
            t0 = time.perf_counter()
            w1 = whole.save(tunes, progress=False)
            whole_save = time.perf_counter() - t0
            m = derived.manifest(d2).update
            assert m is not None and m.derived == dict.fromkeys(names, "base"), m
            for store, vid in ((today, t2), (derived, d2), (whole, w1)):
                assert_same_models(store.load(vid), tunes)
                assert_same_models(
                    {names[-1]: store.load_model(vid, names[-1])}, {names[-1]: tunes[names[-1]]}
                )
            for key, store, vid in (("today", today, t2), ("derived", derived, d2)):
                c = store.info(vid).changes
                out[f"{key}_delta_bytes"] = c["payload_bytes"] + c["metadata_bytes"]
            out["today"] = {"first_bytes": today.info(t1).stored_bytes,
                            "update_bytes": today.info(t2).stored_bytes,
                            "store_bytes": today.stored_bytes(), "save_s": today_save,
                            "load_s": timed(lambda: today.load(t2), repeat)[0],
                            "load_model_s": timed(lambda: today.load_model(t2, names[-1]), repeat)[0]}  # fmt: skip
            out["derived"] = {"first_bytes": derived.info(d1).stored_bytes,
                              "update_bytes": derived.info(d2).stored_bytes,
                              "store_bytes": derived.stored_bytes(), "save_s": derived_save,
                              "load_s": timed(lambda: derived.load(d2), repeat)[0],
                              "load_model_s": timed(lambda: derived.load_model(d2, names[-1]), repeat)[0]}  # fmt: skip
            out["whole"] = {"update_bytes": whole.info(w1).stored_bytes,
                            "store_bytes": whole.stored_bytes(), "save_s": whole_save,
                            "load_s": timed(lambda: whole.load(w1), repeat)[0],
                            "load_model_s": timed(lambda: whole.load_model(w1, names[-1]), repeat)[0]}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def report(r: dict[str, Any]) -> list[tuple[str, bool]]:
    mb = 1e6
    t, d, w = r["today"], r["derived"], r["whole"]
    print(
        f"{r['finetunes']} all-layer fine-tunes of {r['arch']}: {r['raw_bytes'] / mb:.1f} MB of parameters"
    )
    print(
        f"{'':10} {'first version':>14} {'fine-tunes':>12} {'store':>10} {'save':>8} {'load':>8} {'load_model':>11}"
    )
    for label, row in (("today", t), ("derived", d), ("whole", w)):
        first = f"{row['first_bytes'] / mb:>11.1f} MB" if "first_bytes" in row else f"{'-':>14}"
        print(f"{label:10} {first} {row['update_bytes'] / mb:>9.1f} MB {row['store_bytes'] / mb:>7.1f} MB "
              f"{row['save_s']:>7.2f}s {row['load_s']:>7.3f}s {row['load_model_s'] * 1e3:>8.1f} ms")  # fmt: skip
    print(f"derived update: {d['update_bytes'] / t['update_bytes']:.3f}x today's update, "
          f"{d['update_bytes'] / w['update_bytes']:.3f}x the fine-tunes stored whole; whole store "
          f"{d['store_bytes'] / t['store_bytes']:.3f}x today's; load {d['load_s'] / w['load_s']:.2f}x "
          f"the baseline's, load_model {d['load_model_s'] / w['load_model_s']:.2f}x")  # fmt: skip
    print(f"deltas (model blobs, tables and hashes): derived {r['derived_delta_bytes']:,} B, "
          f"today {r['today_delta_bytes']:,} B; manifests and pack headers: derived "
          f"{d['update_bytes'] - r['derived_delta_bytes']:,} B, today "
          f"{t['update_bytes'] - r['today_delta_bytes']:,} B")  # fmt: skip
    bars = [("derived_from's deltas <= the same deltas as an update today",
             r["derived_delta_bytes"] <= r["today_delta_bytes"])]  # fmt: skip
    for name, ok in bars:
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    return bars


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet50", "mobilenet_v2"])
    p.add_argument("--finetunes", type=int, default=10)
    p.add_argument("--base-steps", type=int, default=30)
    p.add_argument("--all-steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    r = measure(args.arch, args.finetunes, args.base_steps, args.all_steps, args.repeat,
                lambda s: print(s, file=sys.stderr, flush=True))  # fmt: skip
    r["machine"] = machine_name()
    r["torch"] = torch.__version__
    bars = report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0 if all(ok for _, ok in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
