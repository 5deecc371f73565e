"""The save/recover methods the battery benchmark compares: mmcore, and what a
user would pick instead (torch.save or safetensors per model, safetensors for
the whole set, and raw bytes in one write as the floor). Each makes its files
durable (fsync) before its save returns."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Any

import torch

import mmcore

StateDicts = dict[str, dict[str, torch.Tensor]]


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def write_durable(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Writes ``data`` as the file ``path`` in one write, then fsyncs it and its directory."""
    with open(path, "wb", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())
    _sync_dir(path.parent)


def set_bytes(sds: StateDicts) -> torch.Tensor:
    """Every tensor's bytes, model after model, as one uint8 tensor on the CPU."""
    return torch.cat([t.detach().cpu().reshape(-1).view(torch.uint8) for sd in sds.values()
                      for t in sd.values()])  # fmt: skip


def _fsync_files(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


class Scratch:
    """Something measured that keeps its files in its own directory, emptied by ``reset``
    (a method here, a contender of the harness)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def reset(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)


class Method(Scratch):
    name = ""
    slow = False  # one file per model: repeated fewer times

    def save(self, sds: StateDicts) -> None: ...
    def load_all(self) -> Any: ...
    def load_one(self, name: str) -> Any: ...
    def close(self) -> None: ...


class Raw(Method):
    name = "raw bytes, one write (floor)"

    def prepare(self, sds: StateDicts) -> None:
        self.buf = set_bytes(sds)
        self.model_bytes = sum(
            t.numel() * t.element_size() for t in next(iter(sds.values())).values()
        )
        self.index = {name: i for i, name in enumerate(sds)}

    def save(self, sds: StateDicts) -> None:
        view = memoryview((ctypes.c_char * self.buf.numel()).from_address(self.buf.data_ptr()))
        write_durable(self.root / "params.bin", view)

    def _read(self, offset: int, n: int) -> torch.Tensor:
        buf = torch.empty(n, dtype=torch.uint8)
        with open(self.root / "params.bin", "rb", buffering=0) as f:
            f.seek(offset)
            f.readinto(memoryview((ctypes.c_char * n).from_address(buf.data_ptr())))
        return buf

    def load_all(self) -> torch.Tensor:
        return self._read(0, self.buf.numel())

    def load_one(self, name: str) -> torch.Tensor:
        return self._read(self.index[name] * self.model_bytes, self.model_bytes)


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


class TorchSavePerModel(Method):
    name = "torch.save, file per model"
    slow = True

    def save(self, sds: StateDicts) -> None:
        paths = []
        for name, sd in sds.items():
            p = self.root / f"{name}.pt"
            torch.save(sd, p)
            paths.append(p)
        _fsync_files(paths)
        _sync_dir(self.root)
        self.names = list(sds)

    def load_all(self) -> StateDicts:
        return {n: torch.load(self.root / f"{n}.pt", weights_only=True) for n in self.names}

    def load_one(self, name: str) -> dict[str, torch.Tensor]:
        return torch.load(self.root / f"{name}.pt", weights_only=True)  # type: ignore[no-any-return]


class SafetensorsPerModel(Method):
    name = "safetensors, file per model"
    slow = True

    def save(self, sds: StateDicts) -> None:
        from safetensors.torch import save_file

        paths = []
        for name, sd in sds.items():
            p = self.root / f"{name}.safetensors"
            save_file(sd, str(p))
            paths.append(p)
        _fsync_files(paths)
        _sync_dir(self.root)
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
        _fsync_files([path])
        _sync_dir(self.root)
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
