"""The save/recover methods the battery benchmark compares: mmcore, and what a
user would pick instead (torch.save or safetensors per model, safetensors for
the whole set, and raw bytes in one write as the floor). Each makes its files
durable (fsync) before its save returns. The raw floor and torch.save per model
are ``mmcore demo``'s own (mmcore.demo, core dependencies only); the rest need
the bench extras."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

import mmcore
from mmcore.demo import (
    Method,
    Raw,
    TorchSavePerModel,
    fsync_files,
    save_per_model,
    set_bytes,
    write_durable,
)
from mmcore.store.layout import fsync_dir

__all__ = ["MMCore", "Method", "Raw", "SafetensorsOneFile", "SafetensorsPerModel", "Scratch",
           "TorchSavePerModel", "set_bytes", "write_durable"]  # fmt: skip

StateDicts = dict[str, dict[str, torch.Tensor]]


class Scratch:
    """Something measured that keeps its files in its own directory, emptied by ``reset``
    (a contender of the harness)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def reset(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)


class MMCore(Method):
    name = "mmcore baseline"
    store: mmcore.ModelStore | None = None

    @property
    def open_store(self) -> mmcore.ModelStore:
        assert self.store is not None, "reset() opens the store"
        return self.store

    def reset(self) -> None:
        self.close()
        super().reset()
        self.store = mmcore.open(self.root / "store.mm")

    def save(self, sds: StateDicts) -> None:
        self.version = self.open_store.save(sds, approach="baseline", ref="battery", progress=False)

    def load_all(self, verify: bool = False) -> StateDicts:
        return self.open_store.load(self.version, verify=verify)

    def load_one(self, name: str) -> dict[str, torch.Tensor]:
        return self.open_store.load_model(self.version, name)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


class SafetensorsPerModel(Method):
    name = "safetensors, file per model"
    slow = True

    def save(self, sds: StateDicts) -> None:
        from safetensors.torch import save_file

        save_per_model(self.root, sds, ".safetensors", lambda sd, p: save_file(sd, str(p)))
        self.names = list(sds)

    def load_all(self) -> StateDicts:
        from safetensors.torch import load_file

        return {n: load_file(str(self.root / f"{n}.safetensors")) for n in self.names}

    def load_one(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.root / f"{name}.safetensors"))


class SafetensorsOneFile(Method):
    name = "safetensors, one file for the set"

    def save(self, sds: StateDicts) -> None:
        from safetensors.torch import save_file

        flat = {f"{m}/{k}": t for m, sd in sds.items() for k, t in sd.items()}
        path = self.root / "set.safetensors"
        save_file(flat, str(path))
        fsync_files([path])
        fsync_dir(self.root)
        self.keys = {m: list(sd) for m, sd in sds.items()}

    def load_all(self) -> StateDicts:
        from safetensors.torch import load_file

        flat = load_file(str(self.root / "set.safetensors"))
        out: StateDicts = {}
        for key, t in flat.items():
            m, _, k = key.partition("/")
            out.setdefault(m, {})[k] = t
        return out

    def load_one(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.root / "set.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(f"{name}/{k}") for k in self.keys[name]}
