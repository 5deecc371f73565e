"""The workload the power-loss test runs on the fault-injection file system.

``python workload.py MOUNT ROUNDS SEED``: creates the store MOUNT/fleet.mm and
runs a seeded mix of saves (some of content already stored), deletes, gc runs
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


def models_for(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A set of two schemas, the same bits for the same seed."""
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
    saved: list[tuple[str, int]] = []  # (version, content seed), not deleted
    next_seed = 0
    for _ in range(rounds):
        action = rng.choices(["save", "resave", "delete", "gc", "reopen"], [40, 8, 25, 20, 7])[0]
        heads = set(store.refs().values())
        deletable = [v for v, _ in saved if v not in heads]
        if action == "save" or (action == "resave" and saved):
            if action == "save":
                content, next_seed = next_seed, next_seed + 1
            else:  # bytes already stored: the content records are shared
                content = rng.choice(saved)[1]
            ref = "fleet" if rng.random() < 0.4 else None
            mark(f"begin-save-{content}")
            vid = store.save(models_for(content), ref=ref)
            mark(f"end-save-{vid}-{content}")
            saved.append((vid, content))
        elif action == "delete" and deletable:
            vid = rng.choice(deletable)
            mark(f"begin-delete-{vid}")
            store.delete(vid)
            mark(f"end-delete-{vid}")
            saved = [(v, c) for v, c in saved if v != vid]
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
