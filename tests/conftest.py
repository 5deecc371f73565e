from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# Modules whose tests taking ``store`` run against both backends: the local store and
# a store on a real SeaweedFS (s3://). A test that also takes ``store_path`` (it reads
# or damages the store's local files), or is marked ``local_files``, runs on the local one only.
CONFORMANCE = {"test_roundtrip", "test_bad_input", "test_delete", "test_update", "test_stacked",
               "test_keyframes", "test_partial_and_log", "test_gc", "test_errors",
               "test_record_decode", "test_review_chain", "test_provenance", "test_exchange",
               "test_exchange_review", "test_hardening", "test_derived", "test_shared",
               "test_compress"}  # fmt: skip


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if "backend" in metafunc.fixturenames and module in CONFORMANCE:
        own = inspect.signature(metafunc.function).parameters
        local = "store_path" in own or metafunc.definition.get_closest_marker("local_files")
        metafunc.parametrize("backend", ["local"] if local else ["local", "s3"])


@pytest.fixture
def backend() -> str:
    return "local"  # (parametrized in the CONFORMANCE modules)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Any]:
    """A SeaweedFS of this test session (``weed mini`` on 127.0.0.1, telemetry off),
    killed by its pid at the end; the tests that need it skip where it cannot start."""
    from seaweed import serving

    yield from serving()


def s3_url(server: Any) -> str:
    """A fresh store location on ``server``."""
    from seaweed import BUCKET

    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(
    request: pytest.FixtureRequest, store_path: Path, backend: str
) -> Iterator[mmcore.ModelStore]:
    if backend == "s3":
        server = request.getfixturevalue("seaweed")
        with mmcore.open(s3_url(server), storage_options=server.options()) as s:
            s.gc_grace_s = 0.0  # (no other writer: gc reclaims at once, as a local store's)
            yield s
        return
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
