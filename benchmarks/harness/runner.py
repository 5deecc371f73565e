"""The benchmark harness: the paper's two use cases on real data, every save path
of mmcore against the tools a user would pick, and the battery set's scale.

    python -m benchmarks.run [--quick] [--parts battery,image,scale] [--device cuda]

writes ``benchmarks/results/<config>-<part>.json`` and their PNG plots beside them,
and regenerates the harness section of ``benchmarks/RESULTS.md`` from every results
file of the harness there (``benchmarks.harness.report``; other ``*.json`` there are
named and left out). ``--report-only`` redraws every plot. Parts:

* **battery**: per-cell voltage models (FFNN 5->48->48->48->1) trained on
  PyBaMM-simulated cells (``benchmarks.harness.cells``), then versions with 1%, 10% and
  100% of the cells retrained on aged-cell data: the paper's update and
  provenance scenarios.
* **image**: ResNet-18, ResNet-50 and MobileNetV2 (``benchmarks.harness.vision``), a base
  trained on scikit-learn's digits, and sets of fine-tuned classifiers (frozen
  backbone; all layers).
* **scale**: battery sets of 1,000 to 100,000 cells, save and recover times and
  per-model metadata bytes against N.

Every number in a results file is measured in this run; a contender that cannot
run here (ZipNN not installed, say) is listed with the reason instead of a row.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import mmcore

from . import contenders as ct
from . import methods, peers
from .measure import machine_name

StateDicts = dict[str, dict[str, torch.Tensor]]
Log = Callable[[str], None]
PARTS = ("battery", "image", "scale")


@dataclass(frozen=True)
class Config:
    name: str
    repeat: int  # timed runs per contender (median and spread reported)
    slow_repeat: int  # for one-file-per-model peers and retraining (provenance)
    one_samples: int  # single-model recoveries timed per contender
    # battery use case
    cells: int
    distinct: int  # cells simulated with PyBaMM; the rest derived by seeded perturbation
    epochs: int
    retrain_epochs: int
    lr: float
    batch_size: int
    fractions: tuple[float, ...]
    tolerances: tuple[float, ...]
    # image use case
    archs: tuple[str, ...]
    image_size: int
    base_steps: int
    head_steps: int  # fine-tuning steps, frozen backbone
    all_steps: int  # fine-tuning steps, all layers
    finetunes: int  # models per set
    # the image sets ("arch/mode") with a provenance row: it fine-tunes the set again at
    # save (the check) and at each recovery
    provenance_sets: tuple[str, ...]
    # scale
    scale_cells: tuple[int, ...]
    per_model_files_up_to: int  # one-file-per-model peers only for sets up to this size


CONFIGS = {
    "full": Config("full", repeat=3, slow_repeat=1, one_samples=50, cells=10_000, distinct=64,
                   epochs=30, retrain_epochs=30, lr=0.05, batch_size=16,
                   fractions=(0.01, 0.1, 1.0), tolerances=(1e-5, 1e-4, 1e-3),
                   archs=("resnet18", "resnet50", "mobilenet_v2"), image_size=32, base_steps=100,
                   head_steps=60, all_steps=40, finetunes=10,
                   provenance_sets=("resnet18/head", "resnet18/all", "resnet50/head",
                                    "mobilenet_v2/head"),
                   scale_cells=(1_000, 10_000, 100_000), per_model_files_up_to=10_000),
    "quick": Config("quick", repeat=3, slow_repeat=1, one_samples=20, cells=1_000, distinct=16,
                    epochs=30, retrain_epochs=30, lr=0.05, batch_size=16,
                    fractions=(0.01, 0.1, 1.0), tolerances=(1e-5, 1e-4, 1e-3),
                    archs=("mobilenet_v2",), image_size=32, base_steps=100, head_steps=30,
                    all_steps=10, finetunes=10, provenance_sets=("mobilenet_v2/head",),
                    scale_cells=(1_000, 10_000), per_model_files_up_to=1_000),
    # the test suite's: every row, a few seconds
    "tiny": Config("tiny", repeat=2, slow_repeat=1, one_samples=3, cells=12, distinct=2,
                   epochs=2, retrain_epochs=1, lr=0.05, batch_size=16,
                   fractions=(0.25, 1.0), tolerances=(1e-4,),
                   archs=("resnet18",), image_size=16, base_steps=2, head_steps=2, all_steps=1,
                   finetunes=2, provenance_sets=("resnet18/head", "resnet18/all"),
                   scale_cells=(8, 16), per_model_files_up_to=16),
}  # fmt: skip


# -- the machine ---------------------------------------------------------------


def _disk(path: Path) -> str:
    """The file system and block device ``path`` is on, and whether it is rotational."""
    best = ("?", "?", "")
    try:
        real = str(path.resolve())
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if real.startswith(mnt) and len(mnt) >= len(best[2]):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    dev, fstype, _ = best
    kind = ""
    name = Path(dev).name.rstrip("0123456789")
    if name.startswith("nvme"):
        name = Path(dev).name.split("p")[0]
    rot = Path(f"/sys/block/{name}/queue/rotational")
    if rot.exists():
        kind = ", rotational" if rot.read_text().strip() == "1" else ", solid-state"
    st = os.statvfs(path)
    return f"{fstype} on {dev}{kind}, {st.f_bavail * st.f_frsize / 1e9:.0f} GB free"


def machine(root: Path, device: torch.device) -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    info = {
        "cpu": machine_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30),
        "disk": _disk(root),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mmcore": mmcore.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "zipnn": peers.zipnn_version(),
    }
    return info


# -- one set, every contender -----------------------------------------------------


def compare(cfg: Config, root: Path, title: str, sds: StateDicts, *, parent: StateDicts | None,
            recipe: Callable[[mmcore.ModelStore], mmcore.Recipe] | None,
            metric: Callable[[Any], float] | None, per_model_files: bool,
            device: torch.device, log: Log) -> dict[str, Any]:  # fmt: skip
    """Every contender on one set: saved (against ``parent`` where the contender can),
    recovered whole and model by model, checked. ``metric`` scores a recovered set
    (the task metric); it runs on the original and on every lossy recovery."""
    log(f"  {title}: {len(sds):,} models, {ct.set_nbytes(sds) / 1e6:.1f} MB")
    cs: list[ct.Contender] = [
        ct.MMCoreSave(root / "baseline", "baseline", parent=parent, device=device)
    ]
    notes = []
    if parent is not None:
        cs.append(ct.MMCoreSave(root / "update", "update", parent=parent, device=device))
        cs += [ct.MMCoreSave(root / f"update-{tol:g}", "update", parent=parent, tolerance=tol,
                             device=device) for tol in cfg.tolerances]  # fmt: skip
        if recipe is not None:
            cs.append(ct.MMCoreSave(root / "provenance", "provenance", parent=parent,
                                    recipe=recipe, device=device))  # fmt: skip
    if per_model_files:
        cs += [ct.Peer(root / "torch", methods.TorchSavePerModel),
               ct.Peer(root / "st", methods.SafetensorsPerModel)]  # fmt: skip
    else:
        notes.append(f"one-file-per-model peers not run for {len(sds):,} models (config limit)")
    cs.append(ct.Peer(root / "st-set", methods.SafetensorsOneFile))
    if peers.zipnn_version() is None:
        notes.append("ZipNN rows skipped: zipnn is not installed (pip install zipnn)")
    else:
        cs.append(ct.ZipNNSave(root / "zipnn", sds))
        if parent is not None:
            cs.append(ct.ZipNNSave(root / "zipnn-xor", sds, parent))
    cs.append(ct.Peer(root / "raw", methods.Raw))
    rows = []
    original = metric(sds) if metric is not None else None
    for c in cs:
        m = ct.measure(c, sds, repeat=cfg.repeat, slow_repeat=cfg.slow_repeat,
                       one_samples=cfg.one_samples, log=log)  # fmt: skip
        shutil.rmtree(c.root, ignore_errors=True)  # measured: its files are not needed
        if "failed" in m.row:
            rows.append(m.row)
            continue
        if metric is not None and not m.row["exact"] and not isinstance(m.recovered, torch.Tensor):
            m.row["metric"] = metric(m.recovered)
        elif original is not None and m.row["exact"]:
            m.row["metric"] = original  # bit-identical models: the same score
        if c.tolerance is not None:
            m.row["within_tolerance"] = m.row["max_error"] <= c.tolerance
        elif not m.row["exact"]:
            raise AssertionError(f"{c.name} did not recover {title} exactly")
        rows.append(m.row)
        del m
    logical = ct.set_nbytes(sds)
    ct.add_rates(rows, logical)
    out: dict[str, Any] = {"set": title, "models": len(sds), "logical_bytes": logical,
                           "metric_original": original, "rows": rows, "notes": notes}  # fmt: skip
    if parent is not None:
        out["encoder"] = encoder_compare(sds, parent, cfg.repeat)
    return out


def encoder_compare(sds: StateDicts, parent: StateDicts, repeat: int) -> dict[str, Any]:
    """mmcore's lossless update encoder against ZipNN on the same bytes (every tensor's
    XOR with its parent): compressed fraction and input GB/s, medians of ``repeat``."""
    plain = peers.xor_bytes(sds, parent)
    n = plain.numel()
    out: dict[str, Any] = {"plain_bytes": n}
    times = []
    encode = peers.MMCoreXorEncoder(sds, parent)
    for _ in range(repeat):
        t, size = peers.timed_once(encode)
        times.append(t)
    out["mmcore"] = {"ratio": size / n, "gbps": n / statistics.median(times) / 1e9,
                     "s": ct.spread(times)}  # fmt: skip
    if peers.zipnn_version() is not None:
        times = []
        for _ in range(repeat):
            fresh = bytearray(plain.numpy().tobytes())  # ZipNN rewrites its input
            z = peers.zipnn_codec()
            t, packed = peers.timed_once(lambda: z.compress(fresh))  # noqa: B023
            times.append(t)
        out["zipnn"] = {"ratio": len(packed) / n, "gbps": n / statistics.median(times) / 1e9,
                        "s": ct.spread(times)}  # fmt: skip
    return out


# -- the battery use case -------------------------------------------------------------


def battery_part(
    cfg: Config, root: Path, cache: Path, device: torch.device, log: Log
) -> dict[str, Any]:
    from mmcore.examples import battery

    from . import cells

    names = [f"cell_{i:06d}" for i in range(cfg.cells)]
    log(f"battery: PyBaMM data for {cfg.cells:,} cells ({cfg.distinct} simulated) ...")
    t0 = time.perf_counter()
    with tqdm(total=2 * cfg.distinct, desc="simulating cells (PyBaMM; cached after)",
              unit="cell", disable=None, leave=False) as bar:  # fmt: skip
        fresh = cells.cell_data(names, distinct=cfg.distinct, aged=False, seed=0,
                                cache_dir=cache, progress=bar.update)  # fmt: skip
        aged = cells.cell_data(names, distinct=cfg.distinct, aged=True, seed=1, cache_dir=cache,
                               progress=bar.update)  # fmt: skip
    data_s = time.perf_counter() - t0
    params = {"lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size}
    log(f"battery: training {cfg.cells:,} cells together ({cfg.epochs} epochs) ...")
    t0 = time.perf_counter()
    trained = _owned(battery.train(battery.make_cells(cfg.cells, seed=0), fresh, seed=0, **params))  # type: ignore[arg-type]
    train_s = time.perf_counter() - t0
    rmse = cells.rmse_mv(trained, fresh)
    training = {
        "data_s": data_s, "train_s": train_s, "params": params, "rows": cells.ROWS,
        "rmse_mv": _quantiles(rmse), "rmse_mv_on_aged_before_retraining": _quantiles(cells.rmse_mv(trained, aged)),
    }  # fmt: skip
    sets = []

    def to_dev(sds: StateDicts) -> StateDicts:
        if device.type == "cpu":
            return sds
        return {n: {k: t.to(device) for k, t in sd.items()} for n, sd in sds.items()}

    def metric_for(data: dict[str, dict[str, torch.Tensor]]) -> Callable[[Any], float]:
        return lambda got: float(cells.rmse_mv(got, data).median())

    sets.append(compare(cfg, root, "all cells trained (first version)", to_dev(trained),
                        parent=None, recipe=None, metric=metric_for(fresh),
                        per_model_files=cfg.cells <= cfg.per_model_files_up_to, device=device,
                        log=log))  # fmt: skip
    retrain = {"lr": cfg.lr, "epochs": cfg.retrain_epochs, "batch_size": cfg.batch_size}
    for frac in cfg.fractions:
        k = max(1, round(frac * cfg.cells))
        chosen = sorted(random.Random(int(frac * 1e6)).sample(names, k))
        log(f"battery: retraining {k:,} cells ({frac:.0%}) on aged-cell data ...")
        t0 = time.perf_counter()
        new = _owned(battery.train({n: trained[n] for n in chosen}, {n: aged[n] for n in chosen},
                                   seed=1, **retrain))  # type: ignore[arg-type]  # fmt: skip
        retrain_s = time.perf_counter() - t0
        version = {**trained, **new}
        data = {**fresh, **{n: aged[n] for n in chosen}}
        before = cells.rmse_mv({n: trained[n] for n in chosen}, {n: aged[n] for n in chosen})
        after = cells.rmse_mv(new, {n: aged[n] for n in chosen})

        def recipe(store: mmcore.ModelStore, chosen: list[str] = chosen) -> mmcore.Recipe:
            ds = store.put_dataset({n: aged[n] for n in chosen}, progress=False)
            return mmcore.Recipe(battery.TRAINER, data=ds, params=retrain, seed=1, models=chosen)

        res = compare(cfg, root, f"{frac:.0%} of cells retrained on aged data", to_dev(version),
                      parent=to_dev(trained), recipe=recipe, metric=metric_for(data),
                      per_model_files=cfg.cells <= cfg.per_model_files_up_to, device=device,
                      log=log)  # fmt: skip
        res["retrained"] = {"cells": k, "train_s": retrain_s, "rmse_mv_before": _quantiles(before),
                            "rmse_mv_after": _quantiles(after)}  # fmt: skip
        sets.append(res)
    return {"part": "battery", "metric": "median voltage RMSE over cells (mV)",
            "training": training, "sets": sets}  # fmt: skip


def _owned(sds: StateDicts) -> StateDicts:
    """Each tensor in its own memory. The batched trainer returns views of stacked
    tensors, and ``torch.save`` writes a view's whole storage: a file per cell would
    hold every cell (20 GB for 1,000 cells, seen here). A user saving per file clones."""
    return {n: {k: t.clone() for k, t in sd.items()} for n, sd in sds.items()}


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(x.double().cpu(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


# -- the image use case -------------------------------------------------------------------


def image_part(cfg: Config, root: Path, device: torch.device, log: Log) -> dict[str, Any]:
    from . import vision

    data = vision.digits(size=cfg.image_size, seed=0)
    sets = []
    archs = []
    # the architectures' own definitions stand in for torchvision's where it does not
    # install beside this torch: their parameter counts must be torchvision's
    checked = (
        vision.check_param_counts() if vision.build(cfg.archs[0])[1] == vision.SOURCE_OWN else None
    )
    for arch in cfg.archs:
        _, source = vision.build(arch)
        log(f"image: {arch} ({source}): training the base on digits ({cfg.base_steps} steps) ...")
        t0 = time.perf_counter()
        base = vision.train_base(arch, data, steps=cfg.base_steps, seed=0)
        base_s = time.perf_counter() - t0
        tasks = [vision.task(data, k) for k in range(cfg.finetunes)]
        names = [f"ft_{k:02d}" for k in range(cfg.finetunes)]
        deployed = {n: base for n in names}  # the first version: the base, deployed once per task
        info: dict[str, Any] = {"arch": arch, "definition": source, "base_train_s": base_s,
                                "params": _parameters(base),
                                "base_top1": vision.top1(arch, base, data)}  # fmt: skip

        def metric(got: Any, arch: str = arch, tasks: list[Any] = tasks,
                   names: list[str] = names) -> float:  # fmt: skip
            return statistics.mean(
                vision.top1(arch, {k: t.cpu() for k, t in got[n].items()}, tasks[i])
                for i, n in enumerate(names)
            )

        for mode, label in (("head", "frozen backbone"), ("all", "all layers")):
            steps = cfg.head_steps if mode == "head" else cfg.all_steps
            log(f"image: {arch}: {cfg.finetunes} fine-tunes, {label} ({steps} steps) ...")
            params: dict[str, Any] = {"arch": arch, "mode": mode, "steps": steps,
                                      "lr": vision.finetune_lr(arch, mode), "batch_size": 64}  # fmt: skip
            task_data = {n: {"x": tasks[i].train_x, "y": tasks[i].train_y}
                         for i, n in enumerate(names)}  # fmt: skip
            t0 = time.perf_counter()
            tuned = vision.finetune_set(deployed, task_data, seed=0, **params)
            info[f"finetune_{mode}_s"] = time.perf_counter() - t0

            def recipe(store: mmcore.ModelStore, task_data: Any = task_data,
                       params: dict[str, Any] = params) -> mmcore.Recipe:  # fmt: skip
                ds = store.put_dataset(task_data, progress=False)
                return mmcore.Recipe(vision.TRAINER, data=ds, params=params, seed=0)

            res = compare(cfg, root, f"{arch}, {cfg.finetunes} fine-tunes, {label}", tuned,
                          parent=deployed, recipe=recipe if f"{arch}/{mode}" in cfg.provenance_sets else None,
                          metric=metric, per_model_files=True, device=device, log=log)  # fmt: skip
            if f"{arch}/{mode}" not in cfg.provenance_sets:
                res["notes"].append(f"no provenance row in the {cfg.name} configuration: it fine-tunes "
                                    "the set again at save (the check) and at recovery")  # fmt: skip
            res["arch"], res["mode"] = arch, mode
            sets.append(res)
        archs.append(info)
    return {"part": "image", "metric": "mean top-1 (%) of the set's classifiers on their tasks",
            "archs": archs, "sets": sets, "param_counts_checked": checked}  # fmt: skip


def _parameters(sd: dict[str, torch.Tensor]) -> int:
    """Parameters of a state dict: BatchNorm's running statistics are buffers, not parameters."""
    return sum(t.numel() for k, t in sd.items() if "running_" not in k and "num_batches" not in k)


# -- scale ----------------------------------------------------------------------------------


def scale_part(cfg: Config, root: Path, device: torch.device, log: Log) -> dict[str, Any]:
    from mmcore.examples import battery

    points = []
    for n in cfg.scale_cells:
        log(f"scale: {n:,} cells ...")
        sds = battery.make_cells(n, seed=n)
        if device.type != "cpu":
            sds = {m: {k: t.to(device) for k, t in sd.items()} for m, sd in sds.items()}
        res = compare(cfg, root, f"{n:,} cells", sds, parent=None, recipe=None, metric=None,
                      per_model_files=n <= cfg.per_model_files_up_to, device=device, log=log)  # fmt: skip
        for r in res["rows"]:
            if "failed" not in r:  # what a format stores beyond the parameters
                extra = r["stored_bytes"] - res["logical_bytes"]
                r["metadata_bytes_per_model"] = None if r["compressed"] else extra / n
        points.append({"cells": n, "logical_bytes": res["logical_bytes"], "rows": res["rows"],
                       "notes": res["notes"]})  # fmt: skip
        del sds
    return {"part": "scale", "note": "freshly initialised cells (the baseline path stores bytes "
            "as they are: values do not change its cost)", "points": points}  # fmt: skip


# -- the command ------------------------------------------------------------------------------


def run(config: Config, parts: Sequence[str], *, results: Path, work: Path, cache: Path,
        device: torch.device, tag: str | None = None, log: Log | None = None) -> list[Path]:  # fmt: skip
    """Runs ``parts`` with ``config``; writes one results file per part into ``results``
    (``<tag or config name>-<part>.json``) and returns their paths."""
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    written = []
    for part in parts:
        start = time.perf_counter()
        root = work / part
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        try:
            if part == "battery":
                body = battery_part(config, root, cache, device, say)
            elif part == "image":
                body = image_part(config, root, device, say)
            elif part == "scale":
                body = scale_part(config, root, device, say)
            else:
                raise ValueError(f"unknown part {part!r}; the parts are {', '.join(PARTS)}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        body.update(config=asdict(config), machine=machine(work, device), seconds=time.perf_counter() - start,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))  # fmt: skip
        path = results / f"{tag or config.name}-{part}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, path)
        say(f"{part}: done in {body['seconds']:.0f} s -> {path}")
        written.append(path)
    return written


def configured(name: str, **overrides: Any) -> Config:
    return replace(CONFIGS[name], **overrides)


def main(argv: list[str] | None = None, *, repo: Path | None = None) -> int:
    import argparse
    import tempfile

    from . import report

    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="the quick configuration (1,000 cells, ResNet-18 only; minutes on 2 cores)")  # fmt: skip
    p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                   help="a named configuration (overrides --quick)")  # fmt: skip
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--device", default="cpu", help="where the sets live before saving (cpu, cuda)")
    p.add_argument("--tag", default=None,
                   help="results file prefix (default: the configuration; gpu_check.sh uses gpu)")  # fmt: skip
    here = repo or Path.cwd()
    p.add_argument("--results", type=Path, default=here / "benchmarks" / "results")
    p.add_argument("--results-md", type=Path, default=here / "benchmarks" / "RESULTS.md")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch directory for the stores (default: a temp dir)",
    )
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmcore-bench",
                   help="where simulated battery data is kept between runs")  # fmt: skip
    p.add_argument("--compare", type=Path, default=None, metavar="DIR",
                   help="after the run, compare its results with an earlier run's results directory")  # fmt: skip
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: redraw every results file's plot and rewrite RESULTS.md")  # fmt: skip
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    config = CONFIGS[args.config or ("quick" if args.quick else "full")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    if args.report_only:  # every harness results file's plot, from its JSON
        written, others = report.harness_results(args.results)
        for path in others:
            print(f"{path.name}: not a results file of this harness, left out", file=sys.stderr)
    else:
        work = Path(tempfile.mkdtemp(prefix="mmcore-harness-", dir=args.work))
        try:
            written = run(config, parts, results=args.results, work=work, cache=args.cache,
                          device=device, tag=args.tag)  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for path in written:  # a run's own plots only: the other results' PNGs stay as they are
        if report.plot(path) is None:
            print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
            break
    report.update_results_md(args.results, args.results_md)
    if args.compare is not None:
        for line in report.compare(args.compare, args.results):
            print(line)
    print(f"tables: {args.results_md}; results and plots: {args.results}")
    return 0
