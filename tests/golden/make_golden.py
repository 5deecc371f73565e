"""Writes the golden store of today's format: ``python tests/golden/make_golden.py``
(from the repository root, once per format change; the result is committed).

One small store holding a version of every kind: a baseline of mixed dtypes, shapes
and an empty tensor, a lossless and a lossy update (with a model added, one removed,
one reshaped and one saved in another tensor order), a provenance version, a set
saved as stacks, models derived from others (v2: one derived from a derived model,
its source removed), groups that share tensors (v3: one row, two rows, rows a later
baseline references, whole models of an update sharing theirs), compressed records
(v4, ``compress=True``: a baseline of mixed dtypes in several chunks, a family sharing
coded rows, an update's whole models coded; v5: the same with byte-plane streams of
version 2, Huffman tables as ranges of 4-bit lengths), and packs rewritten by compaction. ``expected.json`` records, per
version, each model's tensors in order with dtype, shape and the BLAKE3 of their
bytes as ``load`` returned them when the store was written (the ``blake3`` package,
not mmcore, computes them), and the torch version that ran the provenance recipe.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import blake3
import torch

import mmcore
from mmcore.examples import battery

HERE = Path(__file__).resolve().parent
FORMAT = "v5"  # bump (a new directory) when the format changes; keep reading the old ones


def digest(t: torch.Tensor) -> str:
    flat = t.detach().contiguous().reshape(-1)
    return blake3.blake3(bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b"").hexdigest()


def describe(models: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[list[object]]]:
    return {name: [[key, str(t.dtype), list(t.shape), digest(t)] for key, t in sd.items()]
            for name, sd in models.items()}  # fmt: skip


def mixed(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "dense": {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g).half()},
        "ints": {"i": torch.randint(-100, 100, (7,), generator=g, dtype=torch.int64),
                 "m": torch.rand(5, generator=g) > 0.5, "e": torch.empty(0, 3)},
        "bf": {"x": torch.randn(33, generator=g).bfloat16(), "s": torch.tensor(3.5, dtype=torch.float64)},
    }  # fmt: skip


def main() -> int:
    out = HERE / FORMAT
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    versions: dict[str, dict[str, object]] = {}
    with mmcore.open(out / "store") as store:
        m1 = mixed(0)
        v1 = store.save(m1, ref="main", message="baseline")
        m2 = {**m1, "dense": {"b": m1["dense"]["b"] + 1, "w": m1["dense"]["w"] * 2},  # reordered
              "ints": {**m1["ints"], "i": m1["ints"]["i"] + 1},
              "bf": {"x": m1["bf"]["x"][:20].clone(), "s": m1["bf"]["s"]},  # reshaped
              "new": {"z": torch.arange(12, dtype=torch.int16).reshape(3, 4)}}  # fmt: skip
        v2 = store.save(m2, approach="update", parent=v1, ref="main", message="update, lossless")
        m3 = {n: {k: (t + 0.001 if t.is_floating_point() else t) for k, t in sd.items()}
              for n, sd in m2.items() if n != "new"}  # fmt: skip
        v3 = store.save(m3, approach="update", parent=v2, ref="main", tolerance=1e-2,
                        message="update, lossy")  # fmt: skip
        cells = battery.make_cells(6, seed=1)
        data = battery.make_data(list(cells), rows=32, seed=2)
        c1 = store.save(cells, ref="cells", message="cells")
        ds = store.put_dataset(data)
        kw = {"lr": 0.05, "epochs": 1}
        trained = battery.train(cells, data, seed=0, **kw)
        recipe = mmcore.Recipe(battery.TRAINER, data=ds, params=kw, seed=0)
        c2 = store.save(trained, approach="provenance", parent=c1, recipe=recipe, ref="cells",
                        message="provenance")  # fmt: skip
        stacks = store.load_stacked(c1)
        params = {k: t * 0.5 for k, t in stacks.params.items()}
        c3 = store.save_stacked(stacks.names, params, approach="update", parent=c1,
                                message="stacked update")  # fmt: skip
        base = store.load(c1)
        first = next(iter(base))
        tunes = {f"tune{i}": {k: t + 0.01 * (i + 1) for k, t in base[first].items()}
                 for i in range(2)}  # fmt: skip
        d1 = store.save({**base, **tunes}, approach="update", parent=c1, ref="tunes",
                        derived_from={name: first for name in tunes},
                        message="derived from a cell")  # fmt: skip
        more = {**base, **tunes, "tune2": {k: t * 1.5 for k, t in tunes["tune0"].items()}}
        more.pop(first)  # the source goes; its derived models stay
        d2 = store.save(more, approach="update", parent=d1, ref="tunes",
                        derived_from={"tune2": "tune0"}, max_recovery=None,
                        message="derived from a derived model")  # fmt: skip
        g = torch.Generator().manual_seed(3)
        body, other = ({f"body.{i}": torch.randn(64, 64, generator=g) for i in range(4)}
                       for _ in range(2))  # fmt: skip

        def tuned(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {**backbone, "head": torch.randn(10, 64, generator=g),
                    "steps": torch.tensor(7, dtype=torch.int64)}  # fmt: skip

        fam = {f"ft{k}": tuned(body) for k in range(3)}
        s1 = store.save(fam, ref="shared", message="shared tensors, one row")
        s2 = store.save({"a0": tuned(body), "b0": tuned(other), "a1": tuned(body),
                         "b1": tuned(other)}, message="shared tensors, two rows")  # fmt: skip
        s3 = store.save({f"gt{k}": tuned(body) for k in range(2)},
                        message="shared tensors, rows stored before")  # fmt: skip
        s4 = store.save({**fam, **{f"new{k}": tuned(other) for k in range(3)}},
                        approach="update", parent=s1, ref="shared",
                        message="update: whole models sharing tensors")  # fmt: skip
        from mmcore.codec import records

        records.CHUNK_BYTES = 16384  # chunks of a few models: a group of several chunks
        cells = {f"cell{i}": {"w": torch.randn(40, 30, generator=g) * 0.1,
                              "n": torch.tensor(i, dtype=torch.int64),
                              "h": torch.randn(50, generator=g).bfloat16(),  # (planes: raw, Huffman,
                              "sparse": torch.zeros(900).index_fill_(0, torch.tensor([i]), 1.0)}  # rANS)
                 for i in range(8)}  # fmt: skip
        k1 = store.save({**mixed(5), **cells}, compress=True, message="compressed, mixed dtypes")
        k2 = store.save({f"kt{k}": tuned(other) for k in range(3)}, compress=True,
                        message="compressed, shared rows")  # fmt: skip
        cells["cell9"] = {k: t + 1 for k, t in cells["cell0"].items()}
        k3 = store.save({**mixed(5), **cells}, approach="update", parent=k1, compress=True,
                        message="update: whole models compressed")  # fmt: skip
        scratch = store.save({"scratch": {"w": torch.zeros(5000)}}, message="deleted")
        store.delete(scratch)
        assert store.gc(compact_below=2) > 0  # every pack rewritten: compaction's layout
        for m in (s1, s2, s3):
            assert store.manifest(m).groups[0].shared is not None
        assert store.manifest(s3).groups[0].shared.blob == store.manifest(s1).groups[0].shared.blob
        for k in (k1, k2):
            assert store.storage.content(store.manifest(k).groups[0].blob).chunks is not None
        for vid in (v1, v2, v3, c1, c2, c3, d1, d2, s1, s2, s3, s4, k1, k2, k3):
            versions[vid] = {
                "message": store.info(vid).message,
                "models": describe(store.load(vid)),
            }
    for log in (out / "store" / "catalog").glob("LOG*"):  # RocksDB's own log: no data
        log.unlink()
    (out / "expected.json").write_text(json.dumps(
        {"torch": torch.__version__, "mmcore": mmcore.__version__, "versions": versions},
        indent=1) + "\n")  # fmt: skip
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
