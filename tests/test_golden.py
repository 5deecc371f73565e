"""Stores outlive versions of the library: the golden store written by an earlier
mmcore (tests/golden/, made by make_golden.py) opens, verifies and loads exactly. A
change of format must keep reading it, or fail here on purpose with a note in
docs/FORMAT.md and a new golden directory beside the old one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import blake3
import pytest
import torch

import mmcore
from mmcore.examples import battery  # registers the trainer the provenance version names

GOLDEN = Path(__file__).resolve().parent / "golden"
STORES = sorted(p for p in GOLDEN.iterdir() if (p / "expected.json").is_file())


def _described(models: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[list[object]]]:
    def digest(t: torch.Tensor) -> str:
        flat = t.detach().contiguous().reshape(-1)
        raw = bytes(flat.view(torch.uint8).tolist()) if flat.numel() else b""
        return blake3.blake3(raw).hexdigest()

    return {name: [[key, str(t.dtype), list(t.shape), digest(t)] for key, t in sd.items()]
            for name, sd in models.items()}  # fmt: skip


@pytest.fixture(params=STORES, ids=[p.name for p in STORES])
def golden(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    src: Path = request.param
    shutil.copytree(src / "store", tmp_path / "store")  # opening may write (a WAL, a lock)
    return tmp_path / "store", json.loads((src / "expected.json").read_text())


def test_there_is_a_golden_store() -> None:
    assert STORES and battery.TRAINER


def test_a_golden_store_verifies_and_loads_exactly(golden: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    path, expected = golden
    same_torch = expected["torch"] == torch.__version__
    with mmcore.open(path, create=False) as store:
        assert store.check().problems == []
        assert sorted(v.id for v in store.versions()) == sorted(expected["versions"])
        for vid, want in expected["versions"].items():
            info = store.info(vid)
            assert info.message == want["message"]
            if info.approach == "provenance" and not same_torch:
                continue  # retraining under another torch may give other bits (checked, refused)
            assert _described(store.load(vid)) == want["models"], vid
            for name in want["models"]:
                assert _described({name: store.load_model(vid, name)}) == {
                    name: want["models"][name]
                }
            stacks = store.load_stacked(vid)
            assert sorted(n for g in stacks.groups for n in g.names) == sorted(want["models"])
    with mmcore.open(path, readonly=True) as store:
        vid = next(iter(expected["versions"]))
        assert _described(store.load(vid)) == expected["versions"][vid]["models"]
