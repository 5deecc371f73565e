"""Provenance building blocks: the trainer registry and code hashes, recipes, the
seeded deterministic run, and the battery example's batched trainer."""

from __future__ import annotations

import math

import pytest
import torch

import mmcore
from mmcore import provenance
from mmcore.errors import InvalidArgumentError, ProvenanceError, TrainerNotFoundError
from mmcore.examples import battery


def test_registry_records_the_code_hash_and_refuses_unknown_names() -> None:
    @mmcore.trainer("tests.add_one")
    def add_one(models, data, *, seed):  # type: ignore[no-untyped-def]
        return {n: {k: t + 1 for k, t in sd.items()} for n, sd in models.items()}

    first = provenance.registered("tests.add_one")
    assert first.fn is add_one and len(first.code_hash) == 64
    assert provenance.code_hash(add_one) == first.code_hash  # stable

    @mmcore.trainer("tests.add_one")
    def add_one_changed(models, data, *, seed):  # type: ignore[no-untyped-def]
        return {n: {k: t + 2 for k, t in sd.items()} for n, sd in models.items()}

    second = provenance.registered("tests.add_one")
    assert second.fn is add_one_changed and second.code_hash != first.code_hash
    with pytest.raises(TrainerNotFoundError, match=r"no trainer 'tests\.nothing' is registered"):
        provenance.registered("tests.nothing")
    with pytest.raises(InvalidArgumentError, match="non-empty string"):
        mmcore.trainer("")
    assert provenance.registered(battery.TRAINER).fn is battery.train


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trainer": ""}, "Recipe.trainer must be a trainer name"),
        ({"data": 3}, "Recipe.data must be a dataset id"),
        ({"params": {"lr": math.nan}}, r"Recipe.params\['lr'\]: nan is not a finite number"),
        ({"params": {"f": object()}}, "a object is not JSON-representable"),
        ({"params": {1: 2}}, "key 1 is not a string"),
        ({"params": {"seed": 1}}, "must not hold 'seed'"),
        ({"seed": True}, "Recipe.seed must be an int"),
        ({"seed": -1}, "Recipe.seed must be an int"),
        ({"models": "cell_1"}, "Recipe.models must be None or a list"),
        ({"models": ["a", "a"]}, "names a model twice"),
        ({"models": []}, "Recipe.models is empty"),
    ],
)
def test_recipe_refuses_bad_fields(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"trainer": "t", "data": "d", **kwargs}
    with pytest.raises(InvalidArgumentError, match=message):
        mmcore.Recipe(**fields)  # type: ignore[arg-type]


def test_recipe_is_a_json_snapshot() -> None:
    params = {"lr": 0.1, "sizes": (1, 2)}
    recipe = mmcore.Recipe("t", "d", params=params, seed=3, models=("a", "b"))
    params["lr"] = 9.0  # the recipe keeps what it was given
    assert recipe.encode() == {"trainer": "t", "data": "d", "params": {"lr": 0.1, "sizes": [1, 2]},
                               "seed": 3, "models": ["a", "b"]}  # fmt: skip


def test_deterministic_run_restores_every_setting() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    before = torch.are_deterministic_algorithms_enabled()
    with provenance.deterministic(7):
        assert torch.are_deterministic_algorithms_enabled()
        inside = torch.rand(2)
    assert torch.equal(inside, torch.rand(2, generator=torch.Generator().manual_seed(7)))
    assert torch.are_deterministic_algorithms_enabled() == before
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched


def test_run_checks_what_the_trainer_returns() -> None:
    models = {"a": {"w": torch.zeros(2)}, "b": {"w": torch.ones(2)}}
    data = {"a": {"x": torch.zeros(1)}, "b": {"x": torch.zeros(1)}}

    def make(fn):  # type: ignore[no-untyped-def]
        return provenance.Trainer("t", fn, "0" * 64)

    recipe = mmcore.Recipe("t", "d", seed=1)
    with pytest.raises(ProvenanceError, match="exactly the 2 model"):
        provenance.run(make(lambda m, d, seed: {"a": m["a"]}), recipe, models, data)
    with pytest.raises(ProvenanceError, match="model 'a' came back with other tensor names"):
        provenance.run(
            make(lambda m, d, seed: {n: {"v": t["w"]} for n, t in m.items()}), recipe, models, data
        )
    with pytest.raises(
        ProvenanceError, match="tensor 'w' came back with another type, dtype or shape"
    ):
        provenance.run(
            make(lambda m, d, seed: {n: {"w": t["w"].double()} for n, t in m.items()}),
            recipe,
            models,
            data,
        )
    with pytest.raises(ProvenanceError, match="no data for 1 model"):
        provenance.run(make(lambda m, d, seed: m), recipe, models, {"a": data["a"]})


def test_battery_batched_training_equals_training_each_cell_alone() -> None:
    cells = battery.make_cells(6, seed=2)
    data = battery.make_data(list(cells), rows=48, seed=3)
    kwargs = {"lr": 0.05, "epochs": 2, "seed": 4}
    together = battery.train(cells, data, **kwargs)
    again = battery.train(cells, data, **kwargs)
    alone = battery.train_one_by_one(cells, data, **kwargs)
    moved = 0.0
    for name, sd in together.items():
        for key, t in sd.items():
            assert torch.equal(t, again[name][key])  # the same batched computation: bit for bit
            torch.testing.assert_close(t, alone[name][key], rtol=1e-5, atol=1e-6)
            moved = max(moved, float((t - cells[name][key]).abs().max()))
    assert moved > 1e-3  # it trained


def test_battery_data_and_cells_are_seeded() -> None:
    a, b = battery.make_cells(3, seed=1), battery.make_cells(3, seed=1)
    assert list(a) == ["cell_000000", "cell_000001", "cell_000002"]
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    assert sum(t.numel() for t in a["cell_000000"].values()) == 5041
    d = battery.make_data(["x", "y"], rows=10, seed=5)
    assert d["x"]["x"].shape == (10, 5) and d["x"]["y"].shape == (10, 1)
    with pytest.raises(InvalidArgumentError, match="rows must be a positive int"):
        battery.make_data(["x"], rows=0)
