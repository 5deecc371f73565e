"""Sets as stacks: load_stacked, forward, save_stacked, modules in and out."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_bit_equal, assert_sets_equal, small_set

import mmcore
from mmcore import provenance
from mmcore.errors import InvalidArgumentError, InvalidModelSetError
from mmcore.examples import battery
from mmcore.examples.battery import ffnn
from mmcore.modelset import module_state
from mmcore.stacked import Stack, StackedSet, stack_sets

needs_cuda_device = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def by_name(stacked: StackedSet, order: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    got = stacked.state_dicts()
    return {name: got[name] for name in order}


def mixed_set() -> dict[str, dict[str, torch.Tensor]]:
    """Two architectures taking turns, odd dtypes and values included."""
    g = torch.Generator().manual_seed(3)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(6):
        out[f"mlp_{i}"] = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
        out[f"odd_{i}"] = {
            "h": torch.tensor([-0.0, float("nan"), i], dtype=torch.bfloat16),
            "n": torch.tensor([[i, -i]], dtype=torch.int8),
            "m": torch.tensor([True, i % 2 == 0]),
            "s": torch.tensor(float(i), dtype=torch.float64),  # 0-d
        }
    return out


# -- load_stacked ----------------------------------------------------------------


def test_baseline_stacks_are_views_of_the_records_and_equal_each_model(
    store: mmcore.ModelStore,
) -> None:
    cells = battery.make_cells(120)  # 2.4 MB: mapped, not read
    v = store.save(cells)
    ens = store.load_stacked(v)
    assert ens.names == tuple(cells) and len(ens) == 1 and ens.models == 120
    w = ens.params["0.weight"]
    assert w.shape == (120, 48, 5) and w.dtype == torch.float32
    stride = store.manifest(v).groups[0].schema.stride
    assert w.stride(0) * 4 == stride  # a strided view of model-after-model records: no copy
    for key, col in ens.params.items():  # every tensor in the schema's byte offset
        spec = next(s for s in store.manifest(v).groups[0].schema.tensors if s.name == key)
        assert col.data_ptr() - ens.params["0.weight"].data_ptr() == spec.offset
    assert_sets_equal(ens.state_dicts(), cells)
    ens.params["0.weight"][3].fill_(7.0)  # copy-on-write: the store keeps its bytes
    assert_sets_equal(store.load_stacked(v).state_dicts(), cells)
    assert store.verify(v) == 120 * 8


@pytest.mark.local_files
def test_load_stacked_checks_hashes(store: mmcore.ModelStore) -> None:
    cells = battery.make_cells(8)
    v = store.save(cells)
    rec = store.storage.content(store.manifest(v).groups[0].blob)
    pack = store.path / "packs" / f"{rec.pack}.pack"
    data = bytearray(pack.read_bytes())
    data[rec.extents[0][0] + 5 * store.manifest(v).groups[0].schema.stride + 9] ^= 1
    pack.write_bytes(bytes(data))
    with pytest.raises(mmcore.errors.IntegrityError, match="cell_000005"):
        store.load_stacked(v)
    store.load_stacked(v, verify=False)  # asked not to check: no error


def test_mixed_architectures_are_one_stack_each(store: mmcore.ModelStore) -> None:
    models = mixed_set()
    v = store.save(models)
    ens = store.load_stacked(v)
    assert len(ens) == 2
    assert ens.groups[0].names == tuple(f"mlp_{i}" for i in range(6))
    assert ens.groups[1].names == tuple(f"odd_{i}" for i in range(6))
    assert ens.groups[1].params["s"].shape == (6,)  # 0-d tensors stack to [N]
    assert_sets_equal(by_name(ens, list(models)), models)
    with pytest.raises(InvalidArgumentError, match=r"2 architectures: use \.groups"):
        ens.names  # noqa: B018
    with pytest.raises(InvalidArgumentError, match="2 architectures"):
        ens.forward(torch.nn.Linear(3, 4), torch.zeros(6, 3))


def test_update_chains_stack_as_load_gives(store: mmcore.ModelStore) -> None:
    models = mixed_set()
    v1 = store.save(models)
    changed = copy.deepcopy(models)
    changed["mlp_2"]["w"][0, 0] += 1  # a delta
    changed["odd_4"]["n"][0, 1] = 99
    del changed["mlp_5"]  # removed
    changed["mlp_new"] = {"w": torch.ones(4, 3), "b": torch.zeros(4)}  # added
    v2 = store.save(changed, approach="update", parent=v1)
    lossy = copy.deepcopy(changed)
    lossy["mlp_1"]["w"] += 0.25  # quantized: a model assembled tensor by tensor
    v3 = store.save(lossy, approach="update", parent=v2, tolerance=1e-3)
    for v in (v2, v3):
        want = store.load(v)
        ens = store.load_stacked(v)
        assert [n for g in ens.groups for n in g.names] == [
            n for n in want if n.startswith("mlp")
        ] + [n for n in want if n.startswith("odd")]
        assert_sets_equal(by_name(ens, list(want)), want)


def test_save_stacked_is_the_state_dict_save_bit_for_bit(store: mmcore.ModelStore) -> None:
    cells = battery.make_cells(50)
    v1 = store.save(cells)
    stack = Stack.from_state_dicts(cells)
    v2 = store.save_stacked(stack.names, stack.params)
    assert store.manifest(v2).groups[0].blob == store.manifest(v1).groups[0].blob  # same bytes
    assert store.manifest(v2).groups[0].schema == store.manifest(v1).groups[0].schema
    assert_sets_equal(store.load(v2), cells)
    # stacked in (views of the records), stacked out; mixed sets and StackedSets too
    models = mixed_set()
    v3 = store.save(models)
    v4 = store.save_stacked(store.load_stacked(v3))  # the version's order kept
    assert store.manifest(v4).groups == store.manifest(v3).groups  # blobs and members
    assert store.manifest(v4).models == list(models)
    assert_sets_equal(store.load(v4), models)


def test_save_stacked_takes_any_strides_and_every_save_path(store: mmcore.ModelStore) -> None:
    g = torch.Generator().manual_seed(0)
    names = [f"m{i}" for i in range(10)]
    w = torch.randn(3, 10, 4, generator=g).permute(1, 2, 0)  # [10, 4, 3], rows not contiguous
    b = torch.randn(10, 4, dtype=torch.float64, generator=g)[:, ::2]  # [10, 2], strided rows
    s = -torch.randn(10, 2, generator=g)  # negated: resolved
    params = {"w": w, "b": b, "s": s}
    want = {n: {k: t[i].clone() for k, t in params.items()} for i, n in enumerate(names)}
    v1 = store.save_stacked(names, params)
    assert_sets_equal(store.load(v1), want)
    assert store.manifest(v1).groups[0].blob == store.manifest(store.save(want)).groups[0].blob
    w2 = w.clone()
    w2[3] += 1.0
    v2 = store.save_stacked(names, {"w": w2, "b": b, "s": s}, approach="update", parent=v1)
    assert store.manifest(v2).update.stats["delta"] == 1  # type: ignore[union-attr]
    want["m3"]["w"] = w2[3].clone()
    assert_sets_equal(store.load(v2), want)
    v3 = store.save_stacked(names, {"w": w2 + 1e-6, "b": b, "s": s}, approach="update",
                            parent=v2, tolerance=1e-4)  # fmt: skip
    got = store.load_stacked(v3)
    assert float((got.params["w"] - w2).abs().max()) <= 1e-4 + 1e-6
    assert_bit_equal(got.params["b"], b)


def _update_record(store: mmcore.ModelStore, vid: str) -> dict[str, object]:
    update = store.manifest(vid).update
    assert update is not None
    return {"removed": update.removed, "added": update.added, "whole": update.whole,
            "changed": update.changed, "orders": update.orders, "stats": update.stats,
            "model_order": update.model_order}  # fmt: skip


@pytest.mark.parametrize(("tolerance", "max_chain"), [(None, 16), (1e-3, 16), (None, 1)])
def test_a_stacked_update_is_the_update_of_the_same_state_dicts(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch, tolerance: float | None,
    max_chain: int,
) -> None:  # fmt: skip
    """A stacked set whose every model the parent holds alike is hashed and compared
    without a step per model (``_split_stacked``); what it stores is what the same set
    given as state dicts stores: the same models unchanged, delta or whole (keyframes
    at ``max_chain``), removed models, the set's order and recorded tensor orders."""
    from mmcore.paths import update

    models = mixed_set()
    v1 = store.save(models)
    swapped = copy.deepcopy(models)
    swapped["mlp_1"] = {"b": swapped["mlp_1"]["b"], "w": swapped["mlp_1"]["w"] * 2}
    v2 = store.save(swapped, approach="update", parent=v1)  # records mlp_1's order (b, w)
    given = copy.deepcopy(models)
    del given["odd_5"]  # removed
    given["mlp_1"]["w"] *= 2  # the parent's weights, in the schema's order (w, b)
    given["mlp_1"]["b"][0] = 5.0  # changed again: stored whole
    given["mlp_2"]["w"][1, 2] += 0.5
    given["odd_3"]["n"][0, 1] = 9
    given["odd_4"]["h"][2] = 8.0
    given = dict(reversed(given.items()))  # another model order than the parent's
    slow = []
    monkeypatch.setattr(update, "_split_entries",
                        lambda *a, _f=update._split_entries: slow.append(1) or _f(*a))  # fmt: skip
    from_dicts = store.save(given, approach="update", parent=v2, tolerance=tolerance,
                            max_chain=max_chain)  # fmt: skip
    assert slow == [1]
    stacked = store.save_stacked(stack_sets(given), approach="update", parent=v2,
                                 tolerance=tolerance, max_chain=max_chain)  # fmt: skip
    assert slow == [1]  # no model by model validation
    assert _update_record(store, stacked) == _update_record(store, from_dicts)
    want = store.load(from_dicts)
    assert list(want) == list(given) and list(want["mlp_1"]) == ["w", "b"]
    got = store.load(stacked)
    assert [list(sd) for sd in got.values()] == [list(sd) for sd in want.values()]
    assert_sets_equal(got, want)
    if tolerance is None:
        assert_sets_equal(got, given)
    stats = store.manifest(stacked).update.stats  # type: ignore[union-attr]
    assert (stats["removed"], stats["unchanged"]) == (1, 7)
    assert (stats["keyframes"], stats["delta"]) == (1, 3)  # (by max_chain, or by max_recovery)
    assert store.manifest(stacked).update.whole == [["mlp_1"]]  # type: ignore[union-attr]
    given["new_0"] = given["mlp_0"]  # a model the parent lacks: model by model
    assert_sets_equal(store.load(store.save_stacked(stack_sets(given), approach="update",
                                                    parent=v2)), given)  # fmt: skip
    assert slow == [1, 1]


@pytest.mark.parametrize(
    ("names", "params", "match"),
    [
        (["a", "b"], {"w": torch.zeros(3, 4)}, "leading dimension 3, but 2 model names"),
        (["a", "b"], {"w": torch.tensor(1.0)}, "no leading dimension"),
        (["a", "a"], {"w": torch.zeros(2, 4)}, "duplicate model name 'a'"),
        ([], {"w": torch.zeros(0, 4)}, "at least one model name"),
        (["a"], [1], "must be a mapping of tensor name"),
        ("ab", {"w": torch.zeros(2, 4)}, "sequence of model names"),
        (["a"], {"w": [1.0]}, "expected a torch.Tensor"),
        (["a", ""], {"w": torch.zeros(2, 4)}, "non-empty strings"),
        (["a"], {"w": torch.zeros(1, 4, device="meta")}, "meta device"),
    ],
)
def test_save_stacked_refuses_bad_input_and_saves_nothing(
    store: mmcore.ModelStore, names: object, params: object, match: str
) -> None:
    with pytest.raises(InvalidModelSetError, match=match):
        store.save_stacked(names, params)  # type: ignore[arg-type]
    assert store.versions() == []


def test_save_stacked_without_params_needs_a_stack(store: mmcore.ModelStore) -> None:
    with pytest.raises(InvalidModelSetError, match="a Stack or StackedSet alone"):
        store.save_stacked(["a"])


def test_stacking_different_architectures_is_refused() -> None:
    models = small_set(3)
    models["cell_001"]["l0.weight"] = torch.zeros(7, 5)
    with pytest.raises(InvalidModelSetError, match="'cell_001' has another architecture"):
        Stack.from_state_dicts(models)
    with pytest.raises(InvalidModelSetError, match="leading dimension 2, but the stack has 3"):
        Stack(["a", "b", "c"], {"w": torch.zeros(2, 4)})
    groups = stack_sets(models)
    assert [g.names for g in groups] == [("cell_000", "cell_002"), ("cell_001",)]


# -- forward ---------------------------------------------------------------------


def test_forward_runs_every_model_as_a_loop_would() -> None:
    cells = battery.make_cells(30)
    ens = Stack.from_state_dicts(cells)
    x = torch.randn(30, 16, 5)
    template = ffnn()
    loop = []
    for i, name in enumerate(ens.names):
        template.load_state_dict(cells[name])
        loop.append(template(x[i]))
    want = torch.stack(loop).detach()
    meta = ffnn().to("meta")
    got = ens.forward(meta, x)
    assert got.shape == (30, 16, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # batched matmul: rounding
    torch.testing.assert_close(ens.forward(meta, x, chunk_size=7), got, rtol=0, atol=0)
    shared = ens.forward(meta, x[0], shared=True)
    torch.testing.assert_close(shared[4], ens.forward(meta, x[0].expand(30, 16, 5))[4])
    x2 = torch.randn(30, 2, 3, 5)  # more batch dimensions
    assert ens.forward(meta, x2).shape == (30, 2, 3, 1)
    torch.testing.assert_close(ens.forward(meta, x2)[:, 1], ens.forward(meta, x2[:, 1]))
    before = x.clone()  # an in-place activation first never writes into the caller's x
    first = Stack(ens.names, {"1.weight": ens.params["0.weight"], "1.bias": ens.params["0.bias"]})
    first.forward(torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Linear(5, 48)), x)
    assert torch.equal(x, before)


class Gated(torch.nn.Module):
    """Not a Sequential of Linears: runs under torch.vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.norm(self.a(x))) * x.sum(-1, keepdim=True)


def test_forward_of_other_modules_uses_vmap_and_matches_a_loop() -> None:
    torch.manual_seed(0)
    models = {}
    for i in range(5):
        m = Gated()
        m.norm.running_mean.uniform_(-1, 1)
        m.norm.running_var.uniform_(0.5, 2)
        models[f"g{i}"] = m.state_dict()
    ens = Stack.from_state_dicts(models)
    x = torch.randn(5, 8, 3)
    template = Gated().eval()
    want = []
    for i, sd in enumerate(models.values()):
        template.load_state_dict(sd)
        want.append(template(x[i]))
    got = ens.forward(Gated().eval().to("meta"), x)
    torch.testing.assert_close(got, torch.stack(want).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="BatchNorm1d is in training mode"):
        ens.forward(Gated().to("meta"), x)


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:  # data-dependent control flow: vmap cannot batch it
            return x * self.w
        return x


def test_forward_refuses_what_cannot_run_stacked() -> None:
    ens = Stack(["a", "b"], {"w": torch.ones(2, 3)})
    with pytest.raises(InvalidArgumentError, match=r"\(DataDependent\) could not run batched"):
        ens.forward(DataDependent(), torch.ones(2, 3))
    with pytest.raises(
        InvalidArgumentError, match="x has leading dimension 3, but the stack holds 2"
    ):
        ens.forward(DataDependent(), torch.ones(3, 3))
    with pytest.raises(InvalidArgumentError, match="not the stack's architecture"):
        ens.forward(torch.nn.Linear(3, 3), torch.ones(2, 3))
    with pytest.raises(InvalidArgumentError, match="other shapes than in the stack"):
        Stack(["a"], {"weight": torch.ones(1, 2, 3)}).forward(torch.nn.Linear(3, 4, bias=False),
                                                             torch.ones(1, 3))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=r"must be a torch\.nn\.Module"):
        ens.forward("linear", torch.ones(2, 3))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="chunk_size must be a positive int"):
        ens.forward(DataDependent(), torch.ones(2, 3), chunk_size=0)


# -- modules -----------------------------------------------------------------------


class Tied(torch.nn.Module):
    """Shared parameters, a non-persistent buffer, a frozen parameter, a submodule twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 6, bias=False)
        self.out = torch.nn.Linear(6, 4, bias=False)
        self.out.weight = torch.nn.Parameter(torch.randn(4, 6))
        self.head = torch.nn.Linear(6, 4, bias=False)
        self.head.weight = self.out.weight  # tied
        self.block = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh())
        self.again = self.block  # one module under two names
        self.scale = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)
        self.register_buffer("steps", torch.tensor(0))
        self.register_buffer("cache", torch.arange(3.0), persistent=False)
        self.label = "tied"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.again(self.embed(x))) * self.scale + self.cache.sum()


def test_module_state_is_state_dict() -> None:
    torch.manual_seed(0)
    for module in (Tied(), ffnn(), torch.nn.BatchNorm2d(3), Gated()):
        fast, slow = module_state(module), module.state_dict(keep_vars=True)
        assert list(fast) == list(slow)
        assert all(fast[key] is slow[key] for key in slow)


class Custom(torch.nn.Linear):
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        destination[prefix + "weight"] = self.weight.detach() * 2


def test_module_state_keeps_customised_saving() -> None:
    custom = Custom(2, 3)
    assert torch.equal(module_state(custom)["weight"], custom.weight.detach() * 2)
    hooked = torch.nn.Linear(2, 3)

    def drop_bias(m, sd, prefix, local):  # type: ignore[no-untyped-def]
        del sd[prefix + "bias"]

    hooked._register_state_dict_hook(drop_bias)
    assert list(module_state(hooked)) == ["weight"] == list(hooked.state_dict())


def test_load_modules_gives_the_modules_the_slow_way_gives(store: mmcore.ModelStore) -> None:
    torch.manual_seed(1)
    saved = {f"t{i}": Tied() for i in range(4)}
    for i, m in enumerate(saved.values()):
        m.steps.fill_(i)
    v = store.save(saved)  # from modules: their state dicts
    assert_sets_equal(store.load(v), {n: m.state_dict() for n, m in saved.items()})
    built = store.load_modules(v, lambda name: Tied())
    x = torch.randn(2, 4)
    for name in saved:
        slow = Tied()
        slow.load_state_dict(store.load_model(v, name))
        got = built[name]
        assert type(got) is Tied and got.label == "tied" and got.training == slow.training
        assert_sets_equal({name: got.state_dict()}, {name: slow.state_dict()})
        assert got.head.weight is got.out.weight and got.again is got.block  # sharing kept
        assert [p.requires_grad for p in got.parameters()] == [
            p.requires_grad for p in slow.parameters()
        ]
        assert torch.equal(got(x), slow(x))
        assert torch.equal(got.cache, slow.cache)
    a, b = built["t0"], built["t1"]
    a.register_forward_hook(lambda *args: None)  # a clone's hooks are its own
    assert len(a._forward_hooks) == 1 and len(b._forward_hooks) == 0
    with torch.no_grad():
        a.embed.weight.add_(1.0)  # its tensors too
    assert_sets_equal({"t1": b.state_dict()}, {"t1": saved["t1"].state_dict()})
    assert_sets_equal(store.load(v), {n: m.state_dict() for n, m in saved.items()})
    a.embed.weight.sum().backward()  # trainable
    assert a.embed.weight.grad is not None and b.embed.weight.grad is None


def test_load_modules_from_a_meta_template_and_bad_factories(store: mmcore.ModelStore) -> None:
    cells = battery.make_cells(6)
    v = store.save(cells)

    def on_meta(name: str) -> torch.nn.Module:
        with torch.device("meta"):
            return ffnn()

    built = store.load_modules(v, on_meta)
    assert list(built) == list(cells)
    assert_sets_equal({n: m.state_dict() for n, m in built.items()}, cells)
    with pytest.raises(
        InvalidModelSetError, match=r"its tensors \['weight', 'bias'\] are not stored"
    ):
        store.load_modules(v, lambda name: torch.nn.Linear(5, 48))
    with pytest.raises(InvalidModelSetError, match=r"tensor '0\.weight' is torch\.float64"):
        store.load_modules(v, lambda name: ffnn().double())
    with pytest.raises(InvalidArgumentError, match=r"must return a torch\.nn\.Module"):
        store.load_modules(v, lambda name: cells[name])  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidArgumentError, match="factory must be a callable"):
        store.load_modules(v, 3)  # type: ignore[arg-type]

    class Cached(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ffnn()
            self.register_buffer("table", torch.zeros(2), persistent=False)

        def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return self.net.state_dict(*args, **kwargs)

    with pytest.raises(InvalidArgumentError, match="buffer 'table' is not stored"):
        store.load_modules(v, lambda name: Cached().to("meta"))
    with pytest.raises(InvalidModelSetError, match=r"customises its state dict: .*'net.0.weight'"):
        store.load_modules(v, lambda name: Cached())


# -- provenance in the stacked form --------------------------------------------


def test_provenance_trains_on_stacks_and_recovers_stacked(store: mmcore.ModelStore) -> None:
    cells = battery.make_cells(12)
    data = battery.make_data(list(cells), rows=32, seed=1)
    v1 = store.save(cells)
    ds = store.put_dataset(data)
    kw = {"lr": 0.05, "epochs": 1}
    seen: list[type] = []
    real = provenance.registered(battery.TRAINER)

    def spy(models, rows, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(type(models))
        return real.fn(models, rows, **kwargs)

    trained = battery.train(cells, data, seed=0, **kw)
    subset = [f"cell_{i:06d}" for i in (7, 2, 9)]
    mine = {n: dict(cells[n]) for n in cells}
    mine.update(battery.train({n: cells[n] for n in subset}, {n: data[n] for n in subset},
                              seed=3, **kw))  # fmt: skip
    try:
        provenance._REGISTRY[battery.TRAINER] = provenance.Trainer(
            real.name, spy, real.code_hash, stacked=True
        )
        v2 = store.save(trained, approach="provenance", parent=v1,
                        recipe=mmcore.Recipe(battery.TRAINER, data=ds, params=kw, seed=0))  # fmt: skip
        v3 = store.save_stacked(Stack.from_state_dicts(mine), approach="provenance", parent=v1,
                                recipe=mmcore.Recipe(battery.TRAINER, data=ds, params=kw, seed=3,
                                                     models=subset))  # fmt: skip
        assert seen == [Stack, Stack]  # the check at save time ran on stacks
        ens = store.load_stacked(v2)
        assert seen[-1] is Stack
        assert_sets_equal(ens.state_dicts(), trained)
        assert_sets_equal(store.load(v2), trained)
        assert_sets_equal(store.load_stacked(v3).state_dicts(), mine)  # rows replaced
        assert_sets_equal(store.load(v3), mine)
    finally:
        provenance._REGISTRY[battery.TRAINER] = real


def test_battery_trainer_on_state_dicts_is_the_stacked_one() -> None:
    cells = battery.make_cells(5)
    data = battery.make_data(list(cells), rows=16)
    kw = {"lr": 0.1, "epochs": 2, "seed": 4}
    stacked = battery.train_stacked(Stack.from_state_dicts(cells), Stack.from_state_dicts(data),
                                    **kw)  # fmt: skip
    assert_sets_equal(battery.train(cells, data, **kw), Stack(list(cells), stacked).state_dicts())
    assert not torch.equal(stacked["0.weight"][0], cells["cell_000000"]["0.weight"])


# -- GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda_device
def test_stacks_on_the_gpu_equal_the_cpu(store: mmcore.ModelStore) -> None:
    cells = battery.make_cells(40)
    v1 = store.save(cells)
    moved = copy.deepcopy(cells)
    moved["cell_000003"]["2.bias"] += 1
    v2 = store.save(moved, approach="update", parent=v1)
    for v, want in ((v1, cells), (v2, moved)):
        on_gpu = store.load_stacked(v, device="cuda")
        assert on_gpu.params["0.weight"].device.type == "cuda"
        assert_sets_equal({n: {k: t.cpu() for k, t in sd.items()}
                           for n, sd in on_gpu.state_dicts().items()}, want)  # fmt: skip
        x = torch.randn(40, 8, 5)
        got = on_gpu.forward(ffnn().to("meta"), x.cuda()).cpu()
        torch.testing.assert_close(got, store.load_stacked(v).forward(ffnn().to("meta"), x),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    params = {k: t.cuda() for k, t in Stack.from_state_dicts(moved).params.items()}
    v3 = store.save_stacked(list(moved), params, approach="update", parent=v1)
    assert_sets_equal(store.load(v3), moved)


def test_moving_recovered_states_gathers_each_architecture_once(store: mmcore.ModelStore) -> None:
    from mmcore.paths import chain

    models = mixed_set()
    v1 = store.save(models)
    lossy = copy.deepcopy(models)
    lossy["mlp_1"]["w"] += 0.25  # quantized: assembled tensor by tensor
    lossy["odd_2"]["n"][0, 0] = 7  # xor: one record
    v2 = store.save(lossy, approach="update", parent=v1, tolerance=1e-3)
    names, states, schemas, _ = chain._recover(store.storage, v2, None, verify=True)
    moved = chain.move_states({n: states[n] for n in names}, schemas, torch.device("cpu"))
    assert_sets_equal(moved, store.load(v2))
    for kind in ("mlp", "odd"):  # one buffer per architecture, records in the version's order
        members = [n for n in names if n.startswith(kind)]
        key = next(iter(moved[members[0]]))
        stride = schemas[members[0]].stride
        base = moved[members[0]][key].data_ptr()
        assert [moved[n][key].data_ptr() - base for n in members] == [
            i * stride for i in range(len(members))
        ]


# -- found in review --------------------------------------------------------------


class Nested(torch.nn.Module):
    """A submodule shared by two parents (and reached after the second parent), and a
    buffer registered in two modules."""

    def __init__(self) -> None:
        super().__init__()
        shared = torch.nn.Linear(3, 3)
        self.a = torch.nn.Sequential(torch.nn.Tanh(), shared)
        self.b = torch.nn.Sequential(shared, torch.nn.Tanh())
        self.a.register_buffer("scale", torch.tensor(2.0))
        self.b.register_buffer("scale", self.a.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) * self.b.scale


def test_load_modules_keeps_shared_submodules_and_buffers(store: mmcore.ModelStore) -> None:
    torch.manual_seed(2)
    saved = {f"n{i}": Nested() for i in range(3)}
    v = store.save(saved)
    built = store.load_modules(v, lambda name: Nested())
    x = torch.randn(4, 3)
    for name, m in built.items():
        assert m.a[1] is m.b[0] and m.a.scale is m.b.scale
        assert_sets_equal({name: m.state_dict()}, {name: saved[name].state_dict()})
        assert torch.equal(m(x), saved[name](x))


def test_models_without_tensors_stay_in_every_form(store: mmcore.ModelStore) -> None:
    # one architecture is one stored layout: ReLU and Tanh (no tensors) are one group,
    # built from one factory call; here one model without tensors between two Linears
    models = {"lin": torch.nn.Linear(2, 2), "relu": torch.nn.ReLU(), "lin2": torch.nn.Linear(2, 2)}
    v = store.save(models)
    want = store.load(v)
    assert list(want) == ["lin", "relu", "lin2"] and want["relu"] == {}
    stacked = store.load_stacked(v)
    assert_sets_equal(stacked.state_dicts(), want)
    built = store.load_modules(v, lambda name: models[name].__class__(*(
        () if name == "relu" else (2, 2))))  # fmt: skip
    assert list(built) == list(want) and type(built["relu"]) is torch.nn.ReLU
    again = store.save_stacked(stacked)
    assert_sets_equal(store.load(again), want)
    v2 = store.save_stacked(["x", "y"], {})
    assert store.load(v2) == {"x": {}, "y": {}}


@mmcore.trainer("tests.stacked.double", stacked=True)
def _double(models, data, *, seed):  # type: ignore[no-untyped-def]
    return {k: t * 2 for k, t in models.params.items()}


@mmcore.trainer("tests.stacked.conjugate", stacked=True)
def _conjugate(models, data, *, seed):  # type: ignore[no-untyped-def]
    return {k: t.conj() for k, t in models.params.items()}  # lazily conjugated views


def test_provenance_keeps_the_version_order_and_resolves_lazy_views(
    store: mmcore.ModelStore,
) -> None:
    models = {}
    for i in range(3):  # two architectures taking turns
        models[f"a{i}"] = {"w": torch.full((2,), float(i))}
        models[f"b{i}"] = {"v": torch.full((3,), float(i)), "u": torch.ones(1)}
    v1 = store.save(models)
    data = {name: {"x": torch.zeros(1)} for name in models}
    ds = store.put_dataset(data)
    doubled = {n: {k: t * 2 for k, t in sd.items()} for n, sd in models.items()}
    v2 = store.save(doubled, approach="provenance", parent=v1,
                    recipe=mmcore.Recipe("tests.stacked.double", data=ds))  # fmt: skip
    assert list(store.load(v2)) == list(models)  # the parent's order, not group by group
    assert list(store.load_stacked(v2).state_dicts()) == list(models)
    assert store.manifest(v2).provenance.retrained == list(models)  # type: ignore[union-attr]
    assert_sets_equal(store.load(v2), doubled)
    cplx = {
        f"c{i}": {"z": torch.tensor([1 + 2j, -3j], dtype=torch.complex64) * i} for i in range(2)
    }
    v3 = store.save(cplx)
    ds2 = store.put_dataset({n: {"x": torch.zeros(1)} for n in cplx})
    conj = {n: {"z": sd["z"].conj().resolve_conj()} for n, sd in cplx.items()}
    v4 = store.save(conj, approach="provenance", parent=v3,
                    recipe=mmcore.Recipe("tests.stacked.conjugate", data=ds2))  # fmt: skip
    assert_sets_equal(store.load(v4), conj)


@pytest.mark.local_files
def test_verify_reads_a_large_group_in_pieces(
    store: mmcore.ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmcore.paths import reader

    monkeypatch.setattr(reader, "HASH_PIECE", 3 * 4096)  # a few models per piece
    cells = battery.make_cells(40)
    v = store.save(cells)
    assert len(store.storage.content(store.manifest(v).groups[0].blob).extents) == 1
    assert store.verify(v) == 40 * 8
    assert_sets_equal(store.load_stacked(v).state_dicts(), cells)
    rec = store.storage.content(store.manifest(v).groups[0].blob)
    stride = store.manifest(v).groups[0].schema.stride
    pack = store.path / "packs" / f"{rec.pack}.pack"
    data = bytearray(pack.read_bytes())
    data[rec.extents[0][0] + 33 * stride + 100] ^= 4  # in a late piece
    pack.write_bytes(bytes(data))
    with pytest.raises(mmcore.errors.IntegrityError, match="cell_000033"):
        store.verify(v)
    with pytest.raises(mmcore.errors.IntegrityError, match="cell_000033"):
        store.load_stacked(v)


def test_forward_refuses_a_template_tensor_the_stack_lacks() -> None:
    stack = Stack(["a", "b"], {"weight": torch.ones(2, 2, 3)})
    with pytest.raises(InvalidArgumentError, match=r"the stack lacks \['bias'\]"):
        stack.forward(torch.nn.Linear(3, 2), torch.ones(2, 3))
    got = stack.forward(torch.nn.Linear(3, 2, bias=False), torch.ones(2, 3))
    assert torch.equal(got, torch.full((2, 2), 3.0))
