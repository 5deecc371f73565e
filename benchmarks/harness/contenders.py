"""What the harness compares on one model set: mmcore's save paths and the peers
a user would pick, behind one interface, and the loop that measures each.

Every contender's save makes its files durable (fsync) before it returns;
``reset`` (untimed) gives it an empty directory and whatever it saves against
(the parent version, a dataset). Times are medians of repeated runs, each with
its spread (min, max); recovery is checked against the saved set: bit for bit
for lossless contenders, within the tolerance for lossy ones.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mmcore

from . import methods, peers
from .measure import files_under

StateDicts = dict[str, dict[str, torch.Tensor]]
Log = Callable[[str], None]


def spread(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and count of repeated timings (seconds)."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "runs": len(times)}  # fmt: skip


def set_nbytes(sds: StateDicts) -> int:
    return sum(t.numel() * t.element_size() for sd in sds.values() for t in sd.values())


class Contender(methods.Scratch):
    name = ""
    family = "peer"  # "mmcore", "peer" or "floor"
    tolerance: float | None = None
    slow = False  # repeated fewer times (one file per model, retraining)
    whole = (
        False  # recovering one model costs recovering the set (retraining, one stream): timed once
    )
    compresses = False  # stores the set compressed: no "bytes beyond the parameters"

    def save(self, sds: StateDicts) -> None: ...
    def recover(self) -> Any: ...
    def recover_one(self, name: str) -> Any: ...

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in files_under(self.root))

    def dataset_bytes(self) -> int:
        return 0

    def close(self) -> None: ...


class MMCoreSave(Contender):
    """``store.save`` with one approach; the parent version (and a provenance
    version's dataset) saved untimed into a fresh store by ``reset``."""

    family = "mmcore"

    def __init__(self, root: Path, approach: str, *, parent: StateDicts | None = None,
                 tolerance: float | None = None, recipe: Callable[[mmcore.ModelStore], mmcore.Recipe] | None = None,
                 device: torch.device | None = None) -> None:  # fmt: skip
        super().__init__(root)
        self.approach, self.parent, self.tolerance, self.recipe = (
            approach,
            parent,
            tolerance,
            recipe,
        )
        self.device = device
        self.store: mmcore.ModelStore | None = None
        self.version: str | None = None
        self.slow = self.whole = approach == "provenance"
        if approach == "update":
            self.name = "mmcore update, " + (
                "lossless" if tolerance is None else f"tolerance {tolerance:g}"
            )
        else:
            self.name = f"mmcore {approach}"

    def reset(self) -> None:
        """The first time: a fresh store holding the parent (and dataset). After a save:
        that version deleted and its pack reclaimed, so each run saves into the same
        store, holding only the parent, without writing the parent again."""
        if self.store is not None and self.version is not None:
            self.store.delete(self.version)
            self.store.gc(compact_below=0, progress=False)
            self.version = None
            return
        self.close()
        super().reset()
        self.store = mmcore.open(self.root / "store.mm")
        self.parent_id = None
        self.made_recipe = None
        if self.parent is not None:
            self.parent_id = self.store.save(self.parent, progress=False)
        if self.recipe is not None:
            self.made_recipe = self.recipe(self.store)

    def save(self, sds: StateDicts) -> None:
        assert self.store is not None
        parent = None if self.approach == "baseline" else self.parent_id
        self.version = self.store.save(
            sds, approach=self.approach, parent=parent, tolerance=self.tolerance,
            recipe=self.made_recipe, progress=False,
        )  # fmt: skip

    def recover(self) -> StateDicts:
        assert self.store is not None and self.version is not None
        return self.store.load(self.version, device=self.device or "cpu")

    def recover_one(self, name: str) -> dict[str, torch.Tensor]:
        assert self.store is not None and self.version is not None
        return self.store.load_model(self.version, name, device=self.device or "cpu")

    def stored_bytes(self) -> int:
        assert self.store is not None and self.version is not None
        return self.store.info(self.version).stored_bytes

    def dataset_bytes(self) -> int:
        assert self.store is not None
        if self.made_recipe is None:
            return 0
        return int(self.store.datasets()[self.made_recipe.data]["stored_bytes"])

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
            self.version = None


class Peer(Contender):
    """One of ``benchmarks.harness.methods``' peers (torch.save, safetensors, raw bytes)."""

    def __init__(self, root: Path, kind: type[methods.Method]) -> None:
        super().__init__(root)
        self.method = kind(root)
        self.name, self.slow = kind.name, kind.slow
        self.family = "floor" if kind is methods.Raw else "peer"

    def reset(self) -> None:
        self.method.reset()

    def prepare(self, sds: StateDicts) -> None:
        self.method.prepare(sds)

    def save(self, sds: StateDicts) -> None:
        self.method.save(sds)

    def recover(self) -> Any:
        return self.method.load_all()

    def recover_one(self, name: str) -> Any:
        return self.method.load_one(name)


class ZipNNSave(Contender):
    """ZipNN over the set's bytes (``parent`` None) or over their XOR with the parent's
    (the parent held in memory to undo it: its own storage and read are not counted),
    as one file."""

    def __init__(self, root: Path, sds: StateDicts, parent: StateDicts | None = None) -> None:
        super().__init__(root)
        self.plain = methods.set_bytes(sds) if parent is None else peers.xor_bytes(sds, parent)
        self.parent = None if parent is None else methods.set_bytes(parent)
        self.path = root / "set.zipnn"
        self.fresh: bytearray | None = None
        self.name = "ZipNN, set bytes" if parent is None else "ZipNN, XOR with the parent"
        self.whole = self.compresses = True
        sizes = [sum(t.numel() * t.element_size() for t in sd.values()) for sd in sds.values()]
        self.offsets = dict(zip(sds, torch.tensor([0, *sizes]).cumsum(0).tolist()))
        self.sizes = dict(zip(sds, sizes))

    def reset(self) -> None:
        super().reset()
        self.fresh = bytearray(self.plain.numpy().tobytes())  # ZipNN rewrites its input

    def save(self, sds: StateDicts) -> None:
        assert self.fresh is not None, "reset() first"
        methods.write_durable(self.path, peers.zipnn_codec().compress(self.fresh))
        self.fresh = None

    def recover(self) -> torch.Tensor:
        plain = bytearray(peers.zipnn_codec().decompress(self.path.read_bytes()))
        out = torch.frombuffer(plain, dtype=torch.uint8)
        if self.parent is not None:
            out = (out.view(torch.int32) ^ self.parent.view(torch.int32)).view(torch.uint8)
        return out

    def recover_one(self, name: str) -> torch.Tensor:
        at = self.offsets[name]  # one stream: the whole set is decompressed for one model
        return self.recover()[at : at + self.sizes[name]]


@dataclass
class Checked:
    exact: bool
    max_error: float  # largest |recovered - saved| over float elements (0 when exact)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def check(sds: StateDicts, got: Any) -> Checked:
    """Compares a recovery with the saved set: byte for byte, and where they differ the
    largest absolute error of the float tensors."""
    if isinstance(got, torch.Tensor):  # a peer that recovers the set's bytes
        exact = torch.equal(got.cpu(), methods.set_bytes(sds))
        return Checked(exact, 0.0 if exact else float("inf"))
    exact, worst = True, 0.0
    for name, sd in sds.items():
        for k, t in sd.items():
            r = got[name][k]
            if torch.equal(_flat_bytes(r), _flat_bytes(t)):
                continue
            exact = False
            if t.is_floating_point():
                worst = max(worst, float((r.cpu().double() - t.cpu().double()).abs().max()))
            else:
                worst = float("inf")
    return Checked(exact, worst)


@dataclass
class Measured:
    row: dict[str, Any]
    recovered: Any = field(repr=False)


def measure(c: Contender, sds: StateDicts, *, repeat: int, one_samples: int, log: Log,
            slow_repeat: int = 1) -> Measured:  # fmt: skip
    """Saves ``sds`` with ``c`` (``repeat`` times, each after an untimed reset), recovers
    the whole set and single models, checks the recovery and returns the row. A peer
    that fails (safetensors cannot map 100,000 files in one process, say) gives a row
    saying how it failed; mmcore's failures propagate."""
    if c.family == "mmcore":
        return _measure(
            c, sds, repeat=repeat, one_samples=one_samples, log=log, slow_repeat=slow_repeat
        )
    try:
        return _measure(
            c, sds, repeat=repeat, one_samples=one_samples, log=log, slow_repeat=slow_repeat
        )
    except Exception as exc:  # a peer's limit is a result
        c.close()
        log(f"    {c.name}: failed: {type(exc).__name__}: {exc}")
        return Measured({"method": c.name, "family": c.family, "tolerance": c.tolerance,
                         "failed": f"{type(exc).__name__}: {str(exc)[:200]}"}, None)  # fmt: skip


def _measure(c: Contender, sds: StateDicts, *, repeat: int, one_samples: int, log: Log,
             slow_repeat: int) -> Measured:  # fmt: skip
    reps = slow_repeat if c.slow else repeat
    if isinstance(c, Peer):
        c.prepare(sds)
    saves, recovers = [], []
    got: Any = None
    gc.collect()  # once: a full collection of this process's heap takes longer than a save
    for i in range(reps):
        c.reset()
        log(f"    {c.name}: save {i + 1}/{reps}")
        t0 = time.perf_counter()
        c.save(sds)
        saves.append(time.perf_counter() - t0)
        got = None
        t0 = time.perf_counter()
        got = c.recover()
        recovers.append(time.perf_counter() - t0)
    rng = random.Random(7)
    names = list(sds)
    picks = [rng.choice(names) for _ in range(1 if c.whole else one_samples)]
    if not c.whole:
        c.recover_one(picks[0])  # open files and caches once, as a running service would
    ones = []
    for name in picks:
        t0 = time.perf_counter()
        c.recover_one(name)
        ones.append(time.perf_counter() - t0)
    checked = check(sds, got)
    row = {
        "method": c.name,
        "family": c.family,
        "tolerance": c.tolerance,
        "save_s": spread(saves),
        "recover_s": spread(recovers),
        "recover_one_ms": {k: v * 1e3 if k != "runs" else v for k, v in spread(ones).items()},
        "stored_bytes": c.stored_bytes(),
        "dataset_bytes": c.dataset_bytes(),
        "compressed": c.compresses,
        "exact": checked.exact,
        "max_error": checked.max_error,
    }
    c.close()
    return Measured(row, got)


def add_rates(rows: list[dict[str, Any]], logical: int) -> None:
    """GB/s of each row (the set's logical bytes over its median time) and that rate as a
    fraction of the raw-bytes floor's, measured in the same run; stored bytes as a
    fraction of mmcore baseline's."""
    raw = next((r for r in rows if r["family"] == "floor" and "failed" not in r), None)
    base = next((r for r in rows if r["method"] == "mmcore baseline"), None)
    for r in rows:
        if "failed" in r:
            continue
        for what in ("save", "recover"):
            t = r[f"{what}_s"]["median"]
            r[f"{what}_gbps"] = logical / t / 1e9 if t > 0 else None
            if raw is not None:
                r[f"{what}_of_raw"] = raw[f"{what}_s"]["median"] / t if t > 0 else None
        if base is not None:
            r["stored_of_baseline"] = r["stored_bytes"] / base["stored_bytes"]
