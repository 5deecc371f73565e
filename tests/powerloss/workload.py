"""The workload the power-loss test runs on the fault-injection file system.

``python workload.py MOUNT ROUNDS SEED``: creates the store MOUNT/fleet.mm and
runs a seeded mix of saves (baselines, some of content already stored, and
updates against a saved version), deletes, gc runs
and reopenings. Before and after each call it creates an empty file in
MOUNT/marks/ (outside the store); the file system logs these with its op
counter, so the test knows, for every point where it cuts the power, which
calls had returned.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

import mmcore
from mmcore.paths import baseline


def models_for(content: int) -> dict[str, dict[str, torch.Tensor]]:
    """A set of two schemas, the same bits for the same content id: ``content // 100``
    seeds the set, and variant ``content % 100`` (> 0) moves a fifth of its models."""
    models = _base_models(content // 100)
    variant = content % 100
    if variant:
        g = torch.Generator().manual_seed(content)
        for i, sd in enumerate(models.values()):
            if i % 5 == variant % 5:
                for t in sd.values():
                    if t.is_floating_point():
                        t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 1e-3)
    return models


def _base_models(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    models: dict[str, Any] = {}
    for i in range(40):
        models[f"cell_{i:03d}"] = {
            "l0.weight": torch.randn(16, 16, generator=g),
            "l0.bias": torch.randn(16, generator=g),
            "l1.weight": torch.randn(1, 16, generator=g),
        }
    for i in range(6):
        models[f"head_{i}"] = {
            "w": torch.randn(8, 8, generator=g).to(torch.float16),
            "steps": torch.randint(0, 1 << 40, (3,), generator=g),
        }
    return models


class Marks:
    def __init__(self, mount: Path) -> None:
        self.dir = mount / "marks"
        self.dir.mkdir()
        self.n = 0

    def __call__(self, text: str) -> None:
        self.n += 1
        fd = os.open(self.dir / f"{self.n:06d}-{text}", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)


def run(mount: Path, rounds: int, seed: int) -> None:
    baseline.BATCH_BYTES = 16 << 10  # several extents, and several syncs, per save
    rng = random.Random(seed)
    mark = Marks(mount)
    path = mount / "fleet.mm"
    mark("begin-open")
    store = mmcore.open(path)
    mark("end-open")
    saved: list[tuple[str, int]] = []  # (version, content id), not deleted
    parents: dict[str, str] = {}  # update version -> its parent (refused by delete)
    next_seed = 0
    for _ in range(rounds):
        action = rng.choices(["save", "resave", "update", "delete", "gc", "reopen"],
                             [25, 6, 22, 25, 15, 7])[0]  # fmt: skip
        heads = set(store.refs().values())
        deletable = [v for v, _ in saved if v not in heads and v not in parents.values()]
        if action == "save" or (action in ("resave", "update") and saved):
            kwargs: dict[str, Any] = {}
            if action == "save":
                content, next_seed = next_seed * 100, next_seed + 1
            elif action == "resave":  # bytes already stored: the content records are shared
                content = rng.choice(saved)[1]
            else:  # a delta against a saved version
                parent, parent_content = rng.choice(saved)
                content = parent_content // 100 * 100 + (parent_content % 100 + 1) % 100
                kwargs = {"approach": "update", "parent": parent}
            ref = "fleet" if rng.random() < 0.4 else None
            mark(f"begin-save-{content}")
            vid = store.save(models_for(content), ref=ref, **kwargs)
            mark(f"end-save-{vid}-{content}")
            saved.append((vid, content))
            if kwargs:
                parents[vid] = kwargs["parent"]
        elif action == "delete" and deletable:
            vid = rng.choice(deletable)
            mark(f"begin-delete-{vid}")
            store.delete(vid)
            mark(f"end-delete-{vid}")
            saved = [(v, c) for v, c in saved if v != vid]
            parents.pop(vid, None)
        elif action == "gc":
            mark("begin-gc")
            store.gc()
            mark("end-gc")
        elif action == "reopen":
            store.close()
            mark("begin-open")
            store = mmcore.open(path)
            mark("end-open")
    store.close()


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
