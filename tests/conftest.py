from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mmcore


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as uint8, for exact comparison (NaN payloads, -0.0)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(raw_bytes(got), raw_bytes(want))


def assert_sets_equal(
    got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]
) -> None:
    assert list(got) == list(want)
    for name, sd in want.items():
        assert list(got[name]) == list(sd), name
        for key, t in sd.items():
            assert_bit_equal(got[name][key], t)


def small_set(n: int = 8, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"cell_{i:03d}": {
            "l0.weight": torch.randn(6, 5, generator=g),
            "l0.bias": torch.randn(6, generator=g),
            "l1.weight": torch.randn(1, 6, generator=g),
            "l1.bias": torch.randn(1, generator=g),
        }
        for i in range(n)
    }


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "fleet.mm"


@pytest.fixture
def store(store_path: Path) -> Iterator[mmcore.ModelStore]:
    with mmcore.open(store_path) as s:
        yield s


def save_retrained(store: mmcore.ModelStore, parent: str, data: dict[str, dict[str, torch.Tensor]],
                   dataset: str) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:  # fmt: skip
    """A provenance version of ``parent``: every model retrained one epoch by the battery
    example's trainer on ``data`` (stored as ``dataset``). Returns its id and models."""
    from mmcore.examples import battery

    kw = {"lr": 0.1, "epochs": 1}
    trained = battery.train(store.load(parent), data, seed=0, **kw)
    recipe = mmcore.Recipe(battery.TRAINER, data=dataset, params=kw)
    return store.save(trained, approach="provenance", parent=parent, recipe=recipe), trained
