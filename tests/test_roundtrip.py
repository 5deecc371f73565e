"""Every dtype and layout torch has comes back bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bit_equal, assert_sets_equal, small_set

import mmcore
from mmcore import dtypes


def _random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("name", sorted(dtypes.BY_NAME))
def test_every_dtype_round_trips_bit_exact(store: mmcore.ModelStore, name: str) -> None:
    dtype = dtypes.BY_NAME[name]
    models = {
        f"m{i}": {
            "bits": _random_bits(dtype, (7, 3), seed=i),
            "scalar": _random_bits(dtype, (), seed=100 + i),
            "empty": _random_bits(dtype, (0, 4), seed=0),
        }
        for i in range(3)
    }
    v = store.save(models)
    assert_sets_equal(store.load(v), models)
    assert_sets_equal({"m1": store.load_model(v, "m1")}, {"m1": models["m1"]})


def test_special_float_values(store: mmcore.ModelStore) -> None:
    nan_payload = (
        torch.tensor([0x7FC00001, 0xFFC12345, 0x7F800001], dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )
    values = {
        "f32": torch.cat(
            [torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), 1e-45, -1e-40]), nan_payload]
        ),
        "f16": torch.tensor([-0.0, float("nan"), float("inf"), 6e-8], dtype=torch.float16),
        "bf16": torch.tensor([-0.0, float("nan"), -float("inf"), 1e-40], dtype=torch.bfloat16),
        "f64": torch.tensor([-0.0, float("nan"), 5e-324], dtype=torch.float64),
        "c64": torch.complex(
            torch.tensor([-0.0, float("nan")]), torch.tensor([float("inf"), -0.0])
        ),
    }
    v = store.save({"special": values})
    got = store.load(v)["special"]
    for k, t in values.items():
        assert_bit_equal(got[k], t)


def test_layouts_and_views(store: mmcore.ModelStore) -> None:
    base = torch.randn(6, 8)
    c = torch.randn(5, dtype=torch.complex64)
    models = {
        "views": {
            "transposed": base.t(),
            "strided": base[::2, 1::3],
            "expanded": torch.randn(3, 1).expand(3, 5),
            "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
            "offset_slice": base[3:, 2:],
            "conj_view": torch.conj(c),
            "neg_view": torch.conj(c).imag,
        }
    }
    v = store.save(models)
    got = store.load(v)["views"]
    for k, t in models["views"].items():
        assert torch.equal(got[k], t), k
        assert_bit_equal(got[k], t)
        assert got[k].is_contiguous()


def test_modules_and_state_dicts_mix_and_keep_order(store: mmcore.ModelStore) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    models = {"z_linear": lin, "a_conv": conv, **small_set(3)}
    v = store.save(models)
    got = store.load(v)
    assert list(got) == list(models)
    assert_sets_equal(
        got,
        {k: (m.state_dict() if isinstance(m, torch.nn.Module) else m) for k, m in models.items()},
    )
    info = store.info(v)
    assert info.num_models == 5
    assert len(store.manifest(v).groups) == 3  # linear, conv+bn, and the small set's schema


def test_unicode_names(store: mmcore.ModelStore) -> None:
    models = {
        "zelle_ü_电池_🔋": {"gewicht/ß": torch.ones(2), "": torch.zeros(1)},
        "x\ny\x00": {"t": torch.ones(1)},
    }
    v = store.save(models)
    assert_sets_equal(store.load(v), models)
    assert_bit_equal(store.load_model(v, "zelle_ü_电池_🔋")["gewicht/ß"], torch.ones(2))


def test_pairs_iterable_accepted(store: mmcore.ModelStore) -> None:
    pairs = [("b", {"w": torch.ones(3)}), ("a", {"w": torch.zeros(3)})]
    v = store.save(pairs)
    assert list(store.load(v)) == ["b", "a"]


def test_load_device_argument(store: mmcore.ModelStore) -> None:
    models = small_set(2)
    v = store.save(models)
    got = store.load(v, device=torch.device("cpu"))
    assert_sets_equal(got, models)
    assert all(t.device.type == "cpu" for sd in got.values() for t in sd.values())


def test_writing_loaded_tensors_leaves_store_intact(store: mmcore.ModelStore) -> None:
    models = small_set(4)
    v = store.save(models)
    got = store.load(v, verify=False)
    for sd in got.values():
        for t in sd.values():
            t.add_(1.0)
    assert_sets_equal(store.load(v), models)
    assert store.verify(v) == 16


def test_identical_set_saved_twice_stores_no_new_payload(store: mmcore.ModelStore) -> None:
    models = small_set(50)
    v1 = store.save(models)
    packs = store.tier.list()
    v2 = store.save(models)
    assert store.tier.list() == packs
    assert store.info(v2).stored_bytes < 4096  # the manifest only
    assert_sets_equal(store.load(v2), models)
    assert store.manifest(v1).groups[0].blob == store.manifest(v2).groups[0].blob


def test_large_models_span_many_extents(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmcore.paths import baseline

    monkeypatch.setattr(baseline, "BATCH_BYTES", 1000)  # five small models per batch
    cells = small_set(40)
    # two architectures taking turns: each group's batches lie between the other's
    models: dict[str, dict[str, torch.Tensor]] = {}
    for i, (name, sd) in enumerate(cells.items()):
        models[name] = sd
        models[f"other_{i:03d}"] = {"w": torch.randn(50)}
    models["big"] = {"w": torch.randn(3000)}
    v = store.save(models)
    rec = store.storage.content(store.manifest(v).groups[0].blob)
    assert len(rec.extents) > 5
    assert_sets_equal(store.load(v), models)
    for name in ("cell_000", "cell_017", "cell_039", "other_011", "big"):
        assert_sets_equal({name: store.load_model(v, name)}, {name: models[name]})
    assert store.verify(v) == 201
    stacked = store.load_stacked(v).state_dicts()  # extents joined: one buffer per group
    assert_sets_equal({name: stacked[name] for name in models}, models)


def test_batches_of_one_group_are_one_extent(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmcore.paths import baseline

    monkeypatch.setattr(baseline, "BATCH_BYTES", 1000)  # five small models per batch
    models = small_set(40)
    v = store.save(models)
    rec = store.storage.content(store.manifest(v).groups[0].blob)
    stride = store.manifest(v).groups[0].schema.stride
    assert rec.extents == [[rec.extents[0][0], 40]] and rec.extents[0][0] % 4096 == 0
    assert stride * 5 % 4096  # the batches do not end on a section boundary: still joined
    assert_sets_equal(store.load(v), models)
    assert store.verify(v) == 160


def test_load_subset_by_name(store: mmcore.ModelStore) -> None:
    models = small_set(5)
    v = store.save(models)
    got = store.load(v, models=["cell_004", "cell_001"])
    assert list(got) == ["cell_004", "cell_001"]
    assert_sets_equal(got, {k: models[k] for k in ("cell_004", "cell_001")})


def test_versions_by_prefix_and_ref(store: mmcore.ModelStore) -> None:
    v = store.save(small_set(2), ref="fleet/main")
    assert store.resolve(v[:6]) == v
    assert store.resolve("fleet/main") == v
    assert_sets_equal(store.load("fleet/main"), small_set(2))


def test_reopen_reads_what_was_saved(store_path) -> None:  # type: ignore[no-untyped-def]
    models = small_set(10)
    with mmcore.open(store_path) as s:
        v = s.save(models, ref="r", message="first")
    with mmcore.open(store_path, readonly=True) as s:
        assert_sets_equal(s.load(v), models)
        info = s.info("r")
        assert (info.id, info.message, info.refs, info.approach) == (v, "first", ("r",), "baseline")
