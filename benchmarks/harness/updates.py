"""The update save path on the battery use case: versions in which 1%, 10% and
100% of the cells were retrained (a few SGD steps on synthetic data, all changed
cells trained together as one batched computation), saved as updates of the
baseline; and a chain of ten 1% updates, loaded whole and one model at a time.
Every time is a median of repeated runs in this process, next to the baseline's; each
update save is paired with a baseline save timed just before it (into a fresh store),
and the ratios of the pairs are reported as min-median-max.
"""

from __future__ import annotations

import random
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mmcore

StateDicts = dict[str, dict[str, torch.Tensor]]
LAYER_KEYS = [
    ("0.weight", "0.bias"),
    ("2.weight", "2.bias"),
    ("4.weight", "4.bias"),
    ("6.weight", "6.bias"),
]


def retrain(
    sds: StateDicts, fraction: float, seed: int, steps: int = 5, lr: float = 0.05
) -> StateDicts:
    """A copy of the set in which ``fraction`` of the cells took ``steps`` SGD steps."""
    names = list(sds)
    k = max(1, round(len(names) * fraction))
    picked = sorted(random.Random(seed).sample(range(len(names)), k))
    g = torch.Generator().manual_seed(seed)
    params = {key: torch.stack([sds[names[i]][key] for i in picked]).requires_grad_()
              for pair in LAYER_KEYS for key in pair}  # fmt: skip
    x = torch.rand(k, 64, 5, generator=g)  # per cell: voltage, current, temperature, ...
    y = (x * torch.linspace(0.5, 1.5, 5)).sum(-1).sin() + 0.01 * torch.randn(k, 64, generator=g)
    for _ in range(steps):
        h = x
        for i, (w, b) in enumerate(LAYER_KEYS):
            h = torch.baddbmm(params[b].unsqueeze(1), h, params[w].transpose(1, 2))
            if i < len(LAYER_KEYS) - 1:
                h = h.relu()
        loss = (h.squeeze(-1) - y).square().mean() * k  # each cell's own mean loss
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            for p in params.values():
                assert p.grad is not None
                p.sub_(lr * p.grad)
                p.grad = None
    out = dict(sds)
    for j, i in enumerate(picked):
        out[names[i]] = {key: params[key][j].detach().clone() for key in sds[names[i]]}
    return out


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The median time of ``repeat`` runs and the FIRST run's result: a repeated save of
    the same bytes is deduplicated, so only the first one's stored bytes are real."""
    times, results = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), results[0]


def _fresh_save_s(path: Path, save: Callable[[mmcore.ModelStore], Any]) -> float:
    """Seconds ``save`` takes into a store of its own at ``path`` (opened untimed,
    deleted after): a real save, not a deduplicated one."""
    with mmcore.open(path) as fresh:
        t0 = time.perf_counter()
        save(fresh)
        took = time.perf_counter() - t0
    shutil.rmtree(path)
    return took


def _baseline_save_s(sds: StateDicts, root: Path, prefix: str, repeat: int,
                     save: Callable[[mmcore.ModelStore], Any] | None = None) -> float:  # fmt: skip
    """The median time of saving ``sds`` as a baseline (or of ``save``), each run into a
    fresh store."""
    baseline = save or (lambda store: store.save(sds, progress=False))
    return statistics.median(_fresh_save_s(root / f"{prefix}-{i}.mm", baseline)
                             for i in range(repeat))  # fmt: skip


def _paired(sds: StateDicts, root: Path, prefix: str, repeat: int,
            update: Callable[[int], str]) -> dict[str, Any]:  # fmt: skip
    """``repeat`` pairs: a baseline save of ``sds`` into a fresh store, then
    ``update(i)``, which saves the i-th of ``repeat`` different updates (the same one
    again would be a deduplicated save, not a real one). Medians of each, the ratios of
    the pairs (sorted), and the first update's version."""
    bases, updates, ratios, vid = [], [], [], None
    for i in range(repeat):
        bases.append(_fresh_save_s(root / f"{prefix}-{i}.mm",
                                   lambda store: store.save(sds, progress=False)))  # fmt: skip
        t0 = time.perf_counter()
        got = update(i)
        updates.append(time.perf_counter() - t0)
        ratios.append(updates[-1] / bases[-1])
        vid = vid or got
    return {"save_s": statistics.median(updates), "base_s": statistics.median(bases),
            "ratios": sorted(ratios), "vid": vid}  # fmt: skip


def _spread(ratios: list[float]) -> str:
    return f"{ratios[0]:.2f}-{statistics.median(ratios):.2f}-{ratios[-1]:.2f}x"


def _stacked(sds: StateDicts) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The set as ``save_stacked`` takes it (one architecture): names and [N, ...] tensors."""
    names = list(sds)
    return names, {key: torch.stack([sds[n][key] for n in names]) for key in sds[names[0]]}


def run(sds: StateDicts, root: Path, repeat: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Save and load times and stored bytes of update versions, with the baseline's."""
    out: dict[str, Any] = {"rows": []}
    base_s = _baseline_save_s(sds, root, "baseline", repeat)
    with mmcore.open(root / "updates.mm") as store:
        v1 = store.save(sds, progress=False)
        base_bytes = store.info(v1).stored_bytes
        out["baseline"] = {"save_s": base_s, "stored_bytes": base_bytes}
        for fraction, tol in ((0.01, None), (0.1, None), (1.0, None), (1.0, 1e-4)):
            log(f"  update: {fraction:.0%} of cells retrained, tolerance {tol} ...")
            news = [retrain(sds, fraction, seed=int(fraction * 1000) + 1 + 7919 * i)
                    for i in range(repeat)]  # fmt: skip
            new = news[0]
            pair = _paired(sds, root, "pair", repeat, lambda i, tol=tol, news=news: store.save(  # type: ignore[misc]
                news[i], approach="update", parent=v1, tolerance=tol, progress=False))  # fmt: skip
            del news[1:]
            vid = pair["vid"]
            info = store.info(vid)
            got = store.load(vid)
            worst = max(
                float((got[n][k] - t).abs().max()) for n, sd in new.items() for k, t in sd.items()
            )
            if (tol is None and worst != 0) or (tol is not None and worst > tol):
                raise AssertionError(f"update round trip off by {worst}")
            out["rows"].append({"fraction": fraction, "tolerance": tol, "save_s": pair["save_s"],
                                "base_s": pair["base_s"], "ratios": pair["ratios"],
                                "stored_bytes": info.stored_bytes, "changes": info.changes})  # fmt: skip
            del got
        log("  save_stacked: a baseline, and an update of 1% of cells ...")
        names, params = _stacked(sds)
        moves = [_stacked(retrain(sds, 0.01, seed=11 + 7919 * i))[1] for i in range(repeat)]
        moved = moves[0]
        stacked = _paired(sds, root, "stacked", repeat, lambda i: store.save_stacked(
            names, moves[i], approach="update", parent=v1, progress=False))  # fmt: skip
        del moves[1:]
        stacked_base = _baseline_save_s(sds, root, "stacked-base", repeat,
                                        lambda st: st.save_stacked(names, params, progress=False))  # fmt: skip
        vid = stacked["vid"]
        if any(not torch.equal(store.load_model(vid, n)[k], moved[k][i])
               for i, n in enumerate(names[:50]) for k in moved):  # fmt: skip
            raise AssertionError("the stacked update does not load bit-exact")
        out["stacked"] = {"baseline_save_s": stacked_base, "update_save_s": stacked["save_s"],
                          "ratios": stacked["ratios"]}  # fmt: skip
        log("  chain of ten 1% updates ...")
        v, current = v1, sds
        for step in range(10):
            current = retrain(current, 0.01, seed=100 + step)
            v = store.save(current, approach="update", parent=v, progress=False)
        base_load, _ = _median(lambda: store.load(v1), repeat)
        chain_load, got = _median(lambda: store.load(v), repeat)
        if any(not torch.equal(got[n][k], t) for n, sd in current.items() for k, t in sd.items()):
            raise AssertionError("the chain's last version does not load bit-exact")
        del got
        out["chain"] = {"load_baseline_s": base_load, "load_last_s": chain_load,
                        "load_model_ms": _load_model_ms(store, v, list(current), 100, 3)}  # fmt: skip
        out["full_chains"] = []
        for i, (tol, bound) in enumerate([(None, "default"), (None, None), (1e-4, "default"),
                                          (1e-4, None)]):  # fmt: skip
            log(f"  chain of ten 100% updates, tolerance {tol}, recovery bound {bound} ...")
            out["full_chains"].append(  # its own seeds: no model of another chain to share
                _full_chain(store, v1, sds, tol, bound, base_load, base_bytes, repeat, 200 + 10 * i)
            )
        if torch.cuda.is_available() and mmcore.cuda_available():
            log("  GPU: the 1% update saved from models on the GPU ...")
            out["gpu"] = _gpu_update(store, sds, v1, repeat)
            out["gpu"]["load_chain_cpu_s"], _ = _median(lambda: store.load(v), repeat)

            def load_gpu() -> None:
                store.load(v, device="cuda")
                torch.cuda.synchronize()

            out["gpu"]["load_chain_gpu_s"], _ = _median(load_gpu, repeat)
    return out


def _full_chain(store: mmcore.ModelStore, v1: str, sds: StateDicts, tol: float | None,
                bound: str | None, base_load: float, base_bytes: int, repeat: int,
                seed: int) -> dict[str, Any]:  # fmt: skip
    """Ten versions in a row, each retraining every cell, saved as updates (with the
    default recovery bound, or none): their stored bytes against ten baselines, and
    the last one's load against the baseline's."""
    extra: dict[str, Any] = {} if bound == "default" else {"max_recovery": None}
    v, current, stored, saves, versions = v1, sds, 0, [], []
    for step in range(10):
        current = retrain(current, 1.0, seed=seed + step)
        t0 = time.perf_counter()
        v = store.save(current, approach="update", parent=v, tolerance=tol, progress=False,
                       **extra)  # fmt: skip
        saves.append(time.perf_counter() - t0)
        stored += store.info(v).stored_bytes
        versions.append(v)
    load_s, got = _median(lambda: store.load(v), repeat)
    each = []  # every version of the chain, once: those stored as deltas, not only the last
    for vid in versions:
        t0 = time.perf_counter()
        store.load(vid)
        each.append(time.perf_counter() - t0)
    worst = max(float((got[n][k] - t).abs().max()) for n, sd in current.items()
                for k, t in sd.items())  # fmt: skip
    del got
    if (tol is None and worst != 0) or (tol is not None and worst > 10 * tol):
        raise AssertionError(f"the chain's last version is off by {worst}")
    return {"tolerance": tol, "bound": bound, "stored_ratio": stored / (10 * base_bytes),
            "load_ratio": load_s / base_load, "load_ratios": [t / base_load for t in each],
            "load_model_ms": _load_model_ms(store, v, list(current), 50, 5),
            "save_s": statistics.median(saves), "worst": worst}  # fmt: skip


def _load_model_ms(store: mmcore.ModelStore, vid: str, names: list[str], picks: int,
                   seed: int) -> float:  # fmt: skip
    """The median milliseconds of ``load_model`` of ``picks`` random models of ``vid``
    (after one untimed load: the delta tables cached)."""
    rng = random.Random(seed)
    store.load_model(vid, names[0])
    one = []
    for _ in range(picks):
        t0 = time.perf_counter()
        store.load_model(vid, rng.choice(names))
        one.append(time.perf_counter() - t0)
    return statistics.median(one) * 1e3


def _gpu_update(store: mmcore.ModelStore, sds: StateDicts, v1: str, repeat: int) -> dict[str, Any]:
    """The 1% update saved from a set on the GPU, against the same update from host
    memory: time, the bytes that crossed to the host, and the delta blob compared."""
    from mmcore.paths import update

    new = retrain(sds, 0.01, seed=11)
    on_gpu = {n: {k: t.cuda() for k, t in sd.items()} for n, sd in new.items()}
    torch.cuda.synchronize()
    cpu_s, v_cpu = _median(
        lambda: store.save(new, approach="update", parent=v1, progress=False), repeat
    )
    gpu_s, v_gpu = _median(
        lambda: store.save(on_gpu, approach="update", parent=v1, progress=False), repeat
    )
    moved = dict(vars(update.TRANSFERS))
    same = store.manifest(v_cpu).update.delta_blob == store.manifest(v_gpu).update.delta_blob  # type: ignore[union-attr]
    return {"save_host_s": cpu_s, "save_gpu_s": gpu_s, "same_delta_blob": same, **moved}


def report(res: dict[str, Any]) -> list[tuple[str, bool]]:
    base = res["baseline"]
    print(
        f"\nupdate path (baseline: save {base['save_s']:.3f} s, stored {base['stored_bytes'] / 1e6:.1f} MB)"
    )
    print(f"{'cells retrained':>16} {'tolerance':>10} {'save s':>8} {'paired base s':>13} "
          f"{'save/base min-med-max':>22} {'stored MB':>10} {'stored/base':>11} {'payload MB':>10} "
          f"{'tables MB':>9}")  # fmt: skip
    for r in res["rows"]:
        c = r["changes"]
        print(f"{r['fraction']:>16.0%} {r['tolerance'] or 'exact':>10} {r['save_s']:>8.3f} "
              f"{r['base_s']:>13.3f} {_spread(r['ratios']):>22} {r['stored_bytes'] / 1e6:>10.2f} "
              f"{r['stored_bytes'] / base['stored_bytes']:>10.2%} {c['payload_bytes'] / 1e6:>10.2f} "
              f"{c['metadata_bytes'] / 1e6:>9.3f}")  # fmt: skip
    st = res.get("stacked")
    if st:
        print(f"save_stacked: 1% update {st['update_save_s']:.3f} s, {_spread(st['ratios'])} the paired "
              f"baseline save from dicts; a stacked baseline save {st['baseline_save_s']:.3f} s")  # fmt: skip
    ch = res["chain"]
    print(f"chain of 10 x 1%: load last {ch['load_last_s']:.3f} s vs baseline {ch['load_baseline_s']:.3f} s; "
          f"load_model {ch['load_model_ms']:.2f} ms")  # fmt: skip
    full = res.get("full_chains", [])
    for c in full:
        print(f"chain of 10 x 100%, tolerance {c['tolerance'] or 'exact'}, recovery bound "
              f"{c['bound'] or 'off'}: stored {c['stored_ratio']:.3f}x ten baselines, load of the "
              f"last {c['load_ratio']:.2f}x the baseline load, load_model {c['load_model_ms']:.2f} ms, "
              f"median save {c['save_s']:.3f} s")  # fmt: skip
        if "load_ratios" in c:
            print("    load of each version / baseline load: "
                  + " ".join(f"{r:.2f}x" for r in c["load_ratios"]))  # fmt: skip
    by = {(r["fraction"], r["tolerance"]): r for r in res["rows"]}
    bounded = {c["tolerance"]: c for c in full if c["bound"] == "default"}
    chain_checks = []
    for tol, most in ((None, 0.8), (1e-4, 0.6)):
        if tol in bounded:
            c = bounded[tol]
            what = "exact" if tol is None else f"tolerance {tol:g}"
            chain_checks += [
                (f"10 x 100% chain ({what}) stored <= {most}x ten baselines: {c['stored_ratio']:.3f}x",
                 c["stored_ratio"] <= most),
                (f"10 x 100% chain ({what}): load of the last <= 2x the baseline load: "
                 f"{c['load_ratio']:.2f}x", c["load_ratio"] <= 2),
                (f"10 x 100% chain ({what}): load_model < 2 ms: {c['load_model_ms']:.2f} ms",
                 c["load_model_ms"] < 2),
            ]  # fmt: skip

    def ratio(key: tuple[float, float | None]) -> float:
        return float(by[key]["stored_bytes"]) / float(base["stored_bytes"])

    save_checks = []
    for key, most in (
        ((0.01, None), 0.5),
        ((0.1, None), 0.8),
        ((1.0, None), 2.5),
        ((1.0, 1e-4), 3.0),
    ):
        if key in by:
            got = statistics.median(by[key]["ratios"])
            what = "exact" if key[1] is None else f"tolerance {key[1]:g}"
            save_checks.append((f"{key[0]:.0%} update save ({what}) <= {most}x baseline save: {got:.2f}x",
                                got <= most))  # fmt: skip
    if st:
        got = statistics.median(st["ratios"])
        save_checks.append(
            (f"1% update save from save_stacked <= 0.25x baseline save: {got:.2f}x", got <= 0.25)
        )
    gpu_checks = []
    if "gpu" in res:
        g = res["gpu"]
        print(f"GPU: 1% update from the GPU {g['save_gpu_s']:.3f} s vs from host memory {g['save_host_s']:.3f} s; "
              f"device-to-host {g['device_to_host'] / 1e6:.2f} MB for {g['encodings'] / 1e6:.2f} MB of encodings, "
              f"host-to-device {g['host_to_device'] / 1e6:.2f} MB; same delta blob: {g['same_delta_blob']}"
              )  # fmt: skip
        d2h = g["device_to_host"] / max(g["encodings"], 1)
        to_gpu = g["load_chain_gpu_s"] / g["load_chain_cpu_s"]
        print(f"GPU: the chain's last version loaded to the GPU {g['load_chain_gpu_s']:.3f} s, "
              f"to the CPU {g['load_chain_cpu_s']:.3f} s")  # fmt: skip
        gpu_checks = [
            (f"update from the GPU: the same delta blob as from host memory: {g['same_delta_blob']}",
             bool(g["same_delta_blob"])),
            (f"update from the GPU: device-to-host bytes <= 1.1x the encodings: {d2h:.2f}x", d2h <= 1.1),
            (f"load of the chain's last version to the GPU <= 1.5x to the CPU: {to_gpu:.2f}x", to_gpu <= 1.5),
        ]  # fmt: skip
    return [
        *gpu_checks,
        *chain_checks,
        (f"1% update stored <= 1.3% of the baseline: {ratio((0.01, None)):.2%}", ratio((0.01, None)) <= 0.013),
        (f"100% lossless <= 75%: {ratio((1.0, None)):.1%}", ratio((1.0, None)) <= 0.75),
        (f"100% tolerance 1e-4 <= 30%: {ratio((1.0, 1e-4)):.1%}", ratio((1.0, 1e-4)) <= 0.30),
        *save_checks,
        (f"load of a 10-update chain of 1% <= 1.5x baseline load: "
         f"{ch['load_last_s'] / ch['load_baseline_s']:.2f}x", ch["load_last_s"] <= 1.5 * ch["load_baseline_s"]),
        (f"load_model from the chain < 5 ms: {ch['load_model_ms']:.2f} ms", ch["load_model_ms"] < 5),
    ]  # fmt: skip


def tiny(count: int, repeat: int, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The Python cost per tensor: ``count`` tiny models (8 float32 tensors of 4
    elements: 128 bytes each, so the bytes cost next to nothing), saved as a baseline,
    then as updates in which 1% and 100% of the models changed (every tensor of a
    changed model), and each version loaded. Medians of ``repeat`` runs, in ns per
    tensor of the set."""
    g = torch.Generator().manual_seed(7)
    keys = [f"t{i}" for i in range(8)]
    flat = torch.rand(count, 8, 4, generator=g)
    sds = {f"m{i:06d}": dict(zip(keys, flat[i].unbind(0))) for i in range(count)}
    tensors = count * len(keys)
    out: dict[str, Any] = {"models": count, "tensors": tensors, "rows": []}
    base_s = _baseline_save_s(sds, root, "tiny-base", repeat)
    with mmcore.open(root / "tiny.mm") as store:
        v1 = store.save(sds, progress=False)
        load_s, _ = _median(lambda: store.load(v1), repeat)
        out["baseline"] = {"save_ns": base_s / tensors * 1e9, "load_ns": load_s / tensors * 1e9}
        for fraction in (0.01, 1.0):
            log(f"  tiny models: {fraction:.0%} changed ...")
            step = max(1, round(1 / fraction))
            times: list[float] = []
            vid: str | None = None
            new = sds
            for r in range(repeat):  # another update each run (the same one is deduplicated)
                moved = {n: ({k: t + 1 + r for k, t in sd.items()} if i % step == 0 else sd)
                         for i, (n, sd) in enumerate(sds.items())}  # fmt: skip
                t0 = time.perf_counter()
                got_vid = store.save(moved, approach="update", parent=v1, progress=False)
                times.append(time.perf_counter() - t0)
                vid, new = (vid, new) if vid else (got_vid, moved)
            save_s = statistics.median(times)
            assert vid is not None
            first: str = vid
            upd_load, got = _median(lambda first=first: store.load(first), repeat)  # type: ignore[misc]
            if any(not torch.equal(got[n][k], t) for n, sd in new.items() for k, t in sd.items()):
                raise AssertionError("a tiny-model update does not load bit-exact")
            del got
            out["rows"].append({"fraction": fraction, "save_ns": save_s / tensors * 1e9,
                                "load_ns": upd_load / tensors * 1e9})  # fmt: skip
    return out


def tiny_report(res: dict[str, Any]) -> list[tuple[str, bool]]:
    b = res["baseline"]
    print(f"\nPython cost per tensor: {res['models']:,} tiny models, {res['tensors']:,} tensors "
          f"(ns per tensor of the set; median)")  # fmt: skip
    print(f"{'version':>22} {'save ns':>9} {'load ns':>9}")
    print(f"{'baseline':>22} {b['save_ns']:>9.0f} {b['load_ns']:>9.0f}")
    for r in res["rows"]:
        print(
            f"{'update, ' + format(r['fraction'], '.0%') + ' changed':>22} {r['save_ns']:>9.0f} "
            f"{r['load_ns']:>9.0f}"
        )
    full = [r for r in res["rows"] if r["fraction"] == 1.0]
    return [
        (f"update save, 100% changed: <= 3 us per tensor: {r['save_ns'] / 1e3:.2f} us",
         r["save_ns"] <= 3000)
        for r in full
    ]  # fmt: skip
