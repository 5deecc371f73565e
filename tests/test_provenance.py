"""Provenance building blocks: the trainer registry and code hashes, recipes, the
seeded deterministic run, and the battery example's batched trainer."""

from __future__ import annotations

import math

import pytest
import torch

import mmcore
from mmcore import provenance
from mmcore.errors import (
    DatasetNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    InvalidModelSetError,
    ProvenanceError,
    ProvenanceMismatchError,
    TrainerNotFoundError,
)
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
    assert provenance.registered(battery.TRAINER).fn is battery.train_stacked


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


# -- provenance versions in a store --------------------------------------------

KW = {"lr": 0.05, "epochs": 2}


@pytest.fixture
def battery_store(store: mmcore.ModelStore) -> tuple[mmcore.ModelStore, str, dict, str, dict]:  # type: ignore[type-arg]
    cells = battery.make_cells(12, seed=0)
    data = battery.make_data(list(cells), rows=32, seed=1)
    v1 = store.save(cells)
    ds = store.put_dataset(data)
    return store, v1, cells, ds, data


def _equal_sets(a: dict, b: dict) -> bool:  # type: ignore[type-arg]
    return list(a) == list(b) and all(
        list(a[n]) == list(b[n]) and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a
    )


def test_provenance_on_baseline_update_and_provenance_parents(battery_store, store_path) -> None:  # type: ignore[no-untyped-def]
    store, v1, cells, ds, data = battery_store
    recipe = mmcore.Recipe(battery.TRAINER, data=ds, params=KW, seed=0)
    first = battery.train(cells, data, seed=0, **KW)
    v2 = store.save(first, approach="provenance", parent=v1, recipe=recipe)
    nudged = {
        n: {k: t + (1e-3 if n == "cell_000003" else 0) for k, t in sd.items()}
        for n, sd in first.items()
    }
    v_up = store.save(nudged, approach="update", parent=v1)
    on_update = battery.train(nudged, data, seed=0, **KW)
    v3 = store.save(on_update, approach="provenance", parent=v_up, recipe=recipe)
    subset = mmcore.Recipe(battery.TRAINER, data=ds, params={"lr": 0.1, "epochs": 1}, seed=5,
                           models=["cell_000002", "cell_000009"])  # fmt: skip
    again = dict(first)
    again.update(battery.train({n: first[n] for n in subset.models}, {n: data[n] for n in subset.models},
                               lr=0.1, epochs=1, seed=5))  # fmt: skip
    v4 = store.save(again, approach="provenance", parent=v2, recipe=subset)
    info = store.info(v4)
    assert info.approach == "provenance" and info.depth == 2
    assert info.changes["retrained"] == 2 and info.changes["unchanged"] == 10
    assert info.stored_bytes < 0.05 * store.info(v1).stored_bytes
    store.close()
    with mmcore.open(store_path) as fresh:  # nothing from the saves is cached
        assert _equal_sets(fresh.load(v2), first)
        assert _equal_sets(fresh.load(v3), on_update)
        assert _equal_sets(fresh.load(v4), again)
        assert torch.equal(
            fresh.load_model(v4, "cell_000009")["6.bias"], again["cell_000009"]["6.bias"]
        )
        assert list(fresh.load(v4, models=["cell_000002"])) == ["cell_000002"]
        assert fresh.verify(v4) > 0


def test_an_irreproducible_recipe_is_refused_and_nothing_is_written(battery_store) -> None:  # type: ignore[no-untyped-def]
    store, v1, cells, ds, data = battery_store
    recipe = mmcore.Recipe(battery.TRAINER, data=ds, params=KW, seed=0)
    wrong = battery.train(cells, data, seed=1, **KW)  # another seed: other bits
    before = {v.id for v in store.versions()}
    with pytest.raises(
        ProvenanceMismatchError, match=r"does not reproduce 12 of the 12 model"
    ) as err:
        store.save(wrong, approach="provenance", parent=v1, recipe=recipe, ref="fleet")
    assert len(err.value.models) == 12
    assert {v.id for v in store.versions()} == before and "fleet" not in store.refs()
    # check=False records the given models' hashes; recovery then finds the mismatch
    v2 = store.save(wrong, approach="provenance", parent=v1, recipe=recipe, check=False)
    with pytest.raises(ProvenanceMismatchError, match="did not reproduce 12 model"):
        store.load(v2)


def test_models_outside_the_subset_must_be_the_parents(battery_store) -> None:  # type: ignore[no-untyped-def]
    store, v1, cells, ds, _ = battery_store
    recipe = mmcore.Recipe(battery.TRAINER, data=ds, params=KW, seed=0, models=["cell_000001"])
    changed = {n: {k: t.clone() for k, t in sd.items()} for n, sd in cells.items()}
    changed["cell_000004"]["0.bias"][0] += 1
    with pytest.raises(
        InvalidModelSetError, match=r"\['cell_000004'\] are not retrained by the recipe"
    ):
        store.save(changed, approach="provenance", parent=v1, recipe=recipe, check=False)
    with pytest.raises(InvalidModelSetError, match="holds its parent's models"):
        store.save(
            {n: cells[n] for n in list(cells)[:5]}, approach="provenance", parent=v1, recipe=recipe
        )
    with pytest.raises(InvalidArgumentError, match="not models of the parent"):
        store.save(cells, approach="provenance", parent=v1,
                   recipe=mmcore.Recipe(battery.TRAINER, data=ds, params=KW, models=["nope"]))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="recipe= goes with approach='provenance'"):
        store.save(cells, approach="provenance", parent=v1)
    with pytest.raises(DatasetNotFoundError, match="no dataset"):
        store.save(cells, approach="provenance", parent=v1,
                   recipe=mmcore.Recipe(battery.TRAINER, data="ab" * 32, params=KW))  # fmt: skip
    with pytest.raises(TrainerNotFoundError):
        store.save(
            cells, approach="provenance", parent=v1, recipe=mmcore.Recipe("tests.absent", data=ds)
        )


def test_code_change_is_refused_unless_allowed(
    battery_store, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    store, v1, cells, ds, data = battery_store
    recipe = mmcore.Recipe(battery.TRAINER, data=ds, params=KW, seed=0)
    trained = battery.train(cells, data, seed=0, **KW)
    v2 = store.save(trained, approach="provenance", parent=v1, recipe=recipe)
    real = provenance.registered(battery.TRAINER)
    monkeypatch.setitem(
        provenance._REGISTRY,
        battery.TRAINER,
        provenance.Trainer(real.name, real.fn, "f" * 64, real.stacked),
    )
    with pytest.raises(ProvenanceError, match="has changed since the save"):
        store.load(v2)
    assert _equal_sets(store.load(v2, allow_code_change=True), trained)  # same results: accepted
    monkeypatch.delitem(provenance._REGISTRY, battery.TRAINER)
    with pytest.raises(TrainerNotFoundError, match="import the module that defines it"):
        store.load(v2)


def test_another_environment_warns(battery_store, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from mmcore.paths.retrain import EnvironmentWarning

    store, v1, cells, ds, data = battery_store
    recipe = mmcore.Recipe(battery.TRAINER, data=ds, params=KW, seed=0, models=["cell_000000"])
    trained = dict(cells)
    trained.update(battery.train({"cell_000000": cells["cell_000000"]}, {"cell_000000": data["cell_000000"]},
                                 seed=0, **KW))  # fmt: skip
    v2 = store.save(trained, approach="provenance", parent=v1, recipe=recipe)
    real = provenance.environment
    monkeypatch.setattr(
        provenance, "environment", lambda device=None: {**real(device), "torch": "0.0"}
    )
    with pytest.warns(EnvironmentWarning, match="torch: .* then, '0.0' now"):
        store.load(v2)


def test_datasets_are_shared_counted_kept_and_checked(battery_store, store_path) -> None:  # type: ignore[no-untyped-def]
    store, v1, cells, ds, data = battery_store
    assert store.put_dataset(data) == ds  # the same bytes: one dataset
    listed = store.datasets()
    assert list(listed) == [ds] and listed[ds]["entries"] == 12 and listed[ds]["used_by"] == []
    recipe = mmcore.Recipe(battery.TRAINER, data=ds, params=KW, seed=0)
    trained = battery.train(cells, data, seed=0, **KW)
    v2 = store.save(trained, approach="provenance", parent=v1, recipe=recipe)
    v3 = store.save(trained, approach="provenance", parent=v1, recipe=recipe)
    assert sorted(store.datasets()[ds]["used_by"]) == sorted([v2, v3])
    assert store.info(v2).changes["dataset_bytes"] == listed[ds]["logical_bytes"]
    with pytest.raises(InvalidArgumentError, match="is the data of version"):
        store.delete_dataset(ds)
    store.delete(v3)
    store.gc()
    assert _equal_sets(store.load(v2), trained)  # gc kept the dataset a version uses
    loaded = store.load_dataset(ds)
    assert torch.equal(loaded["cell_000005"]["x"], data["cell_000005"]["x"])
    rec = store.storage.content(retrain_dataset_group_blob(store, ds))
    pack = store.tier.path_of(rec.pack)
    store.close()
    raw = bytearray(pack.read_bytes())
    raw[rec.extents[0][0] + 10] ^= 0x20
    pack.write_bytes(bytes(raw))
    with mmcore.open(store_path) as again:
        with pytest.raises(IntegrityError, match="dataset"):
            again.load(v2)
        with pytest.raises(IntegrityError):
            again.verify(v2)
        again.delete(v2)
        again.delete_dataset(ds)
        assert again.datasets() == {}
        assert again.gc() > 0


def retrain_dataset_group_blob(store: mmcore.ModelStore, ds: str) -> bytes:
    from mmcore.paths import retrain

    return retrain.dataset(store.storage, ds).groups[0].blob


def test_an_update_on_a_provenance_parent_is_refused(battery_store) -> None:  # type: ignore[no-untyped-def]
    store, v1, cells, ds, data = battery_store
    trained = battery.train(cells, data, seed=0, **KW)
    v2 = store.save(trained, approach="provenance", parent=v1,
                    recipe=mmcore.Recipe(battery.TRAINER, data=ds, params=KW))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="is a provenance version"):
        store.save(trained, approach="update", parent=v2)


def test_cli_shows_provenance_and_datasets(
    battery_store, store_path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from mmcore.cli import main

    store, v1, cells, ds, data = battery_store
    trained = battery.train(cells, data, seed=0, **KW)
    v2 = store.save(trained, approach="provenance", parent=v1,
                    recipe=mmcore.Recipe(battery.TRAINER, data=ds, params=KW))  # fmt: skip
    store.close()
    assert main(["info", str(store_path), v2]) == 0
    out = capsys.readouterr().out
    assert "approach   provenance" in out and f"trainer {battery.TRAINER}" in out
    assert (
        "retrains   12 model(s) of the parent, 0 unchanged" in out
        and f"dataset    {ds[:16]}" in out
    )
    assert main(["du", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "provenance versions      1" in out and "datasets                 1" in out
    assert f"dataset    {ds[:16]}  12 entries" in out and v2 in out
    assert main(["verify", str(store_path), v2]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_provenance_trained_on_the_gpu_recovers_there_and_to_the_cpu(battery_store) -> None:  # type: ignore[no-untyped-def]
    store, v1, cells, ds, data = battery_store
    on_gpu = {n: {k: t.cuda() for k, t in sd.items()} for n, sd in cells.items()}
    gpu_data = {n: {k: t.cuda() for k, t in d.items()} for n, d in data.items()}
    trained = battery.train(on_gpu, gpu_data, seed=0, **KW)
    v2 = store.save(trained, approach="provenance", parent=v1,
                    recipe=mmcore.Recipe(battery.TRAINER, data=ds, params=KW))  # fmt: skip
    assert store.manifest(v2).provenance.environment["device"] == "cuda"  # type: ignore[union-attr]
    for device in ("cuda", "cpu"):
        got = store.load(v2, device=device)
        for name, sd in trained.items():
            for key, t in sd.items():
                assert got[name][key].device.type == device
                assert torch.equal(got[name][key].cpu(), t.cpu())
