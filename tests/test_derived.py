"""``save(..., approach="update", derived_from=...)``: new models stored as deltas of
another model of the parent (a family of fine-tunes as deltas of its base)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from conftest import assert_sets_equal

import mmcore
from mmcore.errors import (
    CorruptRecordError,
    FormatVersionError,
    InvalidArgumentError,
    InvalidModelSetError,
)
from mmcore.manifest import Manifest

Models = dict[str, dict[str, torch.Tensor]]


def _net(seed: int, width: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "body.weight": torch.randn(width, 32, generator=g),
        "body.bias": torch.randn(width, generator=g),
        "head.weight": torch.randn(10, width, generator=g),
        "bn.running_var": torch.rand(10, generator=g),
        "steps": torch.tensor([seed], dtype=torch.int64),
    }


def _tune(base: dict[str, torch.Tensor], seed: int, scale: float = 1e-3,
          frozen: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:  # fmt: skip
    """A fine-tune: every float tensor nudged, except ``frozen`` ones."""
    g = torch.Generator().manual_seed(seed)
    return {k: t.clone() if k in frozen or not t.is_floating_point()
            else t + scale * torch.randn(t.shape, generator=g) for k, t in base.items()}  # fmt: skip


def _every_way(store: mmcore.ModelStore, vid: str, want: Models) -> None:
    """load (in order), load_model of each, load_stacked: bit for bit."""
    got = store.load(vid)
    assert list(got) == list(want)
    assert_sets_equal(got, want)
    for name, sd in want.items():
        assert_sets_equal({name: store.load_model(vid, name)}, {name: sd})
    assert_sets_equal(store.load_stacked(vid).state_dicts(), want)


@pytest.fixture
def family(store: mmcore.ModelStore) -> tuple[str, Models]:
    base = _net(0)
    return store.save({"base": base, "other": _net(1, width=40)}), {"base": base}


@pytest.mark.parametrize("how", ["mapping", "callable", "auto"])
def test_fine_tunes_are_stored_as_deltas_of_their_base(
    store: mmcore.ModelStore, family: tuple[str, Models], how: str
) -> None:
    v1, parent = family
    tunes = {f"ft{i}": _tune(parent["base"], seed=10 + i) for i in range(4)}
    given = {"base": parent["base"], "other": _net(1, width=40), **tunes}
    how_to: Any = {"mapping": dict.fromkeys(tunes, "base"), "callable": lambda n: "base",
                   "auto": "auto"}[how]  # fmt: skip
    v2 = store.save(given, approach="update", parent=v1, derived_from=how_to)
    m = store.manifest(v2)
    assert m.update is not None
    assert m.update.derived == dict.fromkeys(tunes, "base")
    assert m.update.added == [] and m.update.changed == list(tunes)
    assert store.info(v2).changes["derived"] == 4
    _every_way(store, v2, given)
    store.verify()
    # each delta is far smaller than a fine-tune stored whole
    whole = sum(t.numel() * t.element_size() for sd in tunes.values() for t in sd.values())
    assert m.update.stats["payload_bytes"] < 0.8 * whole
    store.storage.forget()  # read again from the catalog (nothing cached) agrees
    _every_way(store, v2, given)


def test_derived_models_chain_on_and_outlive_their_source(
    store: mmcore.ModelStore, family: tuple[str, Models]
) -> None:
    """v2 derives ft0/ft1 from base while base changes too (the deltas are of base as
    in v1); v3 drops base, changes ft0 and derives ft2 from ft1; v4 changes ft2: every
    version stays exact, and each derived model's depth counts its source's."""
    v1, parent = family
    base, other = parent["base"], _net(1, width=40)
    base2 = _tune(base, seed=5, frozen=("head.weight",))
    s2 = {"base": base2, "other": other, "ft0": _tune(base, 20), "ft1": _tune(base, 21)}
    v2 = store.save(s2, approach="update", parent=v1,
                    derived_from={"ft0": "base", "ft1": "base"})  # fmt: skip
    s3 = {"other": other, "ft0": _tune(s2["ft0"], 30), "ft1": s2["ft1"],
          "ft2": _tune(s2["ft1"], 31)}  # fmt: skip
    v3 = store.save(s3, approach="update", parent=v2, derived_from={"ft2": "ft1"},
                    max_recovery=None)  # fmt: skip
    m3 = store.manifest(v3)
    assert m3.update is not None and m3.update.derived == {"ft2": "ft1"}
    assert m3.update.removed == ["base"]
    s4 = {**s3, "ft2": _tune(s3["ft2"], 41)}
    v4 = store.save(s4, approach="update", parent=v3, max_recovery=None)
    for vid, want in ((v1, {"base": base, "other": other}), (v2, s2), (v3, s3), (v4, s4)):
        _every_way(store, vid, want)
    from mmcore.paths import chain

    index = chain.model_index(store.storage, v4)
    assert (index["ft0"].depth, index["ft1"].depth, index["ft2"].depth) == (2, 1, 3)
    assert store.check().problems == []


def test_max_chain_counts_the_source_s_deltas(
    store: mmcore.ModelStore, family: tuple[str, Models]
) -> None:
    v1, parent = family
    base = parent["base"]
    v2 = store.save({"base": _tune(base, 1)}, approach="update", parent=v1, max_chain=2,
                    max_recovery=None)  # fmt: skip
    given = {"base": store.load(v2)["base"], "ft": _tune(base, 2)}
    v3 = store.save(given, approach="update", parent=v2, derived_from={"ft": "base"}, max_chain=2,
                    max_recovery=None)  # fmt: skip
    assert store.manifest(v3).update.derived == {"ft": "base"}  # type: ignore[union-attr]
    given2 = {**given, "ft2": _tune(given["ft"], 3)}
    v4 = store.save(given2, approach="update", parent=v3, derived_from={"ft2": "ft"},
                    max_chain=2, max_recovery=None)  # fmt: skip
    m4 = store.manifest(v4)
    assert m4.update is not None
    assert m4.update.derived == {} and m4.update.added == ["ft2"]  # depth 3 > 2: whole
    _every_way(store, v4, given2)


def test_derived_deltas_cost_no_more_than_the_same_deltas_as_an_update(tmp_path: Path) -> None:
    """The family saved with derived_from against the base alone, and the way it had to
    be done before: the base stored under every fine-tune's name, then an update."""
    base = _net(0, width=96)
    tunes = {f"ft{i}": _tune(base, 100 + i) for i in range(6)}
    with mmcore.open(tmp_path / "a") as a, mmcore.open(tmp_path / "b") as b:
        va = a.save({"base": base})
        derived = a.save({"base": base, **tunes}, approach="update", parent=va,
                         derived_from="auto")  # fmt: skip
        vb = b.save({"base": base, **dict.fromkeys(tunes, base)})
        today = b.save({"base": base, **tunes}, approach="update", parent=vb)
        got, old = a.manifest(derived).update, b.manifest(today).update
        assert got is not None and old is not None
        assert got.stats["payload_bytes"] <= old.stats["payload_bytes"]
        assert a.info(derived).stored_bytes <= b.info(today).stored_bytes + 256  # (names)
        _every_way(a, derived, {"base": base, **tunes})


def test_auto_picks_the_model_sharing_the_most_tensors(
    store: mmcore.ModelStore,
) -> None:
    a, b = _net(1), _net(2)
    v1 = store.save({"a": a, "b": b, "small": _net(3, width=8)})
    frozen = ("body.weight", "body.bias", "bn.running_var")
    given = {"a": a, "b": b, "small": _net(3, width=8),
             "of_b": _tune(b, 7, frozen=frozen),  # shares 4 tensors with b (steps too)
             "fresh": _net(9),  # shares nothing with a or b: two candidates, stored whole
             "counter": {**_net(11), "steps": torch.tensor([2])},  # only b's 8-byte counter
             "tiny": _tune(_net(3, width=8), 8)}  # the only model of its architecture  # fmt: skip
    v2 = store.save(given, approach="update", parent=v1, derived_from="auto")
    m = store.manifest(v2)
    assert m.update is not None
    assert m.update.derived == {"of_b": "b", "tiny": "small"}
    assert m.update.added == ["fresh", "counter"]
    _every_way(store, v2, given)


def test_a_derived_model_within_tolerance_of_its_source(
    store: mmcore.ModelStore, family: tuple[str, Models]
) -> None:
    """Every change within tolerance: nothing to store as a delta, and the model is new
    here, so it is stored whole (exact); another with a change beyond it is a delta."""
    v1, parent = family
    base = parent["base"]
    near = _tune(base, 3, scale=1e-7, frozen=("bn.running_var",))  # (kept exact: no tolerance)
    far = _tune(base, 4, scale=1e-1)
    given = {"base": base, "other": _net(1, width=40), "near": near, "far": far}
    v2 = store.save(given, approach="update", parent=v1, tolerance=1e-3,
                    derived_from={"near": "base", "far": "base"})  # fmt: skip
    m = store.manifest(v2)
    assert m.update is not None
    assert m.update.derived == {"far": "base"} and m.update.added == ["near"]
    got = store.load(v2)
    assert list(got) == list(given)
    assert_sets_equal({"near": got["near"]}, {"near": near})
    for k, t in far.items():
        assert (got["far"][k].double() - t.double()).abs().max() <= 1e-3


def test_a_derived_model_equal_to_its_source_keeps_its_tensor_order(
    store: mmcore.ModelStore, family: tuple[str, Models]
) -> None:
    """A copy of its source saved in another tensor order: stored whole (nothing
    changed), in its source's layout, and loaded in the order it was saved in (the
    fuzz found it came back in the source's)."""
    v1, parent = family
    base = parent["base"]
    copy = {k: base[k].clone() for k in reversed(list(base))}
    v2 = store.save({"base": base, "copy": copy}, approach="update", parent=v1,
                    derived_from="auto")  # fmt: skip
    m = store.manifest(v2)
    assert m.update is not None and m.update.added == ["copy"] and not m.update.derived
    got = store.load(v2)
    assert list(got["copy"]) == list(copy)
    assert_sets_equal({"copy": got["copy"]}, {"copy": copy})
    assert list(store.load_model(v2, "copy")) == list(copy)


def test_auto_with_models_without_tensors(store: mmcore.ModelStore) -> None:
    """``"auto"`` over a parent and new models that hold no tensors at all: the only
    model of that (empty) architecture is the source (the fuzz found the matching of
    no hash rows refused)."""
    v1 = store.save({"a": {}, "b": {}})
    v2 = store.save({"a": {}, "b": {}, "c": {}}, approach="update", parent=v1,
                    derived_from="auto")  # fmt: skip
    assert store.load(v2) == {"a": {}, "b": {}, "c": {}}
    v3 = store.save({"a": {}, "d": {}}, approach="update", parent=store.save({"a": {}}),
                    derived_from="auto")  # fmt: skip
    assert store.load(v3) == {"a": {}, "d": {}}


def _refused(store: mmcore.ModelStore, error: type[Exception], match: str,
             call: Callable[[], Any]) -> None:  # fmt: skip
    before = {v.id for v in store.versions()}
    with pytest.raises(error, match=match):
        call()
    assert {v.id for v in store.versions()} == before  # nothing saved


def test_bad_derived_from_is_refused_and_saves_nothing(
    store: mmcore.ModelStore, family: tuple[str, Models]
) -> None:
    v1, parent = family
    base = parent["base"]
    given = {"base": base, "ft": _tune(base, 1)}

    def up(**kw: Any) -> Callable[[], str]:
        return lambda: store.save(given, approach="update", parent=v1, **kw)

    _refused(store, InvalidArgumentError, "goes with approach='update'",
             lambda: store.save(given, derived_from="auto"))  # fmt: skip
    _refused(store, InvalidArgumentError, "which version .* does not hold",
             up(derived_from={"ft": "nobody"}))  # fmt: skip
    _refused(store, InvalidArgumentError, "'stranger', which is not in the set",
             up(derived_from={"stranger": "base"}))  # fmt: skip
    _refused(store, InvalidArgumentError, "'base', which version .* holds",
             up(derived_from={"base": "other"}))  # fmt: skip
    _refused(store, InvalidModelSetError, "other tensors .* than 'other'",
             up(derived_from={"ft": "other"}))  # fmt: skip
    _refused(store, InvalidArgumentError, "mapping, a callable or \"auto\"",
             up(derived_from="closest"))  # fmt: skip
    _refused(store, InvalidArgumentError, "mapping, a callable or \"auto\", got int",
             up(derived_from=3))  # fmt: skip
    _refused(store, InvalidArgumentError, "maps model names to model names",
             up(derived_from={"ft": 1}))  # fmt: skip
    _refused(store, InvalidArgumentError, r"derived_from\('ft'\) returned 7",
             up(derived_from=lambda n: 7))  # fmt: skip


def test_the_manifest_says_what_an_older_reader_cannot_read(
    store: mmcore.ModelStore, family: tuple[str, Models], monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, parent = family
    v2 = store.save({"base": parent["base"], "ft": _tune(parent["base"], 1)},
                    approach="update", parent=v1, derived_from="auto")  # fmt: skip
    raw = store.catalog.get("manifests", v2.encode())
    assert raw is not None and msgpack.unpackb(raw)["format"] == 5
    assert msgpack.unpackb(store.catalog.get("manifests", v1.encode()))["format"] == 1
    from mmcore import manifest

    monkeypatch.setattr(manifest, "MANIFEST_FORMAT", 4)  # a reader of 4 refuses it
    with pytest.raises(FormatVersionError):
        Manifest.decode(raw)
    monkeypatch.undo()
    for damage in ([["ft", "base", "x"]], [["other", "base"]], [["ft", "base"], ["ft", "base"]],
                   "ft"):  # fmt: skip
        obj = msgpack.unpackb(raw)
        obj["update"]["derived"] = damage
        with pytest.raises(CorruptRecordError, match="derived"):
            Manifest.decode(msgpack.packb(obj))
    obj = msgpack.unpackb(raw)
    obj["update"]["derived"] = [["ft", "gone"]]  # a source the parent lacks: found on load
    store.catalog.commit([("manifests", v2.encode(), msgpack.packb(obj))])
    store.storage.forget()
    with pytest.raises(CorruptRecordError, match="derives model 'ft' from 'gone'"):
        store.load(v2)
    assert any("derives model 'ft'" in p for p in store.check().problems)


def test_rebase_and_delete_of_the_source_version(
    store: mmcore.ModelStore, family: tuple[str, Models]
) -> None:
    v1, parent = family
    given = {"base": parent["base"], "ft": _tune(parent["base"], 1)}
    v2 = store.save(given, approach="update", parent=v1, derived_from="auto")
    store.rebase(v2)  # stored whole: v1 may go
    store.delete(v1)
    store.gc()
    _every_way(store, v2, given)
    assert store.check().problems == []


@pytest.mark.local_files
def test_mmcore_info_names_the_sources(
    store: mmcore.ModelStore, family: tuple[str, Models], capsys: pytest.CaptureFixture[str]
) -> None:
    from mmcore.cli import main

    v1, parent = family
    v2 = store.save({"base": parent["base"], "a": _tune(parent["base"], 1),
                     "b": _tune(parent["base"], 2)}, approach="update", parent=v1,
                    derived_from="auto")  # fmt: skip
    path = str(store.path)
    store.close()
    assert main(["info", path, v2]) == 0
    out = capsys.readouterr().out
    from mmcore._units import human_bytes

    tunes = human_bytes(2 * sum(t.numel() * t.element_size() for t in parent["base"].values()))
    want = (
        f"derived    2 new model(s) stored as deltas of the parent's 'base': {tunes} of parameters"
    )
    assert want in out
    assert "changes    1 unchanged, 2 as deltas, 0 whole (0 added)" in out
    assert main(["du", path]) == 0
    out = capsys.readouterr().out
    assert "saved      by updates: " in out
    assert f"; of them models derived from another: {tunes} in" in out


@pytest.mark.parametrize("later", ["removed", "whole"])
def test_a_derived_model_dropped_or_stored_whole_later_needs_no_source(
    store: mmcore.ModelStore, family: tuple[str, Models], later: str
) -> None:
    """(Found by the API fuzzer.) v2 derives ft from base; v3 stores base whole again
    and removes ft (or stores it whole again too): loading v3 reads base only where
    v3 has it, and follows no derivation to a source it does not read."""
    v1, parent = family
    base = parent["base"]
    s2 = {"base": base, "other": _net(1, width=40), "ft": _tune(base, 1)}
    v2 = store.save(s2, approach="update", parent=v1, derived_from={"ft": "base"})
    s3 = {"base": _net(7, width=40), "other": s2["other"]}  # (another shape: whole)
    if later == "whole":
        s3["ft"] = _net(8, width=40)
    v3 = store.save(s3, approach="update", parent=v2)
    m = store.manifest(v3)
    assert m.update is not None and "base" in {n for g in m.update.whole for n in g}
    for vid, want in ((v2, s2), (v3, s3)):
        _every_way(store, vid, want)


def test_push_export_and_import_of_a_family(tmp_path: Path) -> None:
    """A family pushed to another store loads exactly there (its manifests say which
    model each is derived from; the deltas travel as any blob does); exported and
    imported back as an update of the base with derived_from, it is the same bytes."""
    base = _net(0)
    tunes = {f"ft{i}": _tune(base, i) for i in range(3)}
    with mmcore.open(tmp_path / "a") as a, mmcore.open(tmp_path / "b") as b:
        v1 = a.save({"base": base}, ref="main")
        v2 = a.save({"base": base, **tunes}, approach="update", parent=v1, ref="main",
                    derived_from="auto")  # fmt: skip
        report = a.push(b, "main")
        assert report.versions == 2 and report.head == v2
        _every_way(b, v2, {"base": base, **tunes})
        assert b.manifest(v2).update.derived == dict.fromkeys(tunes, "base")  # type: ignore[union-attr]
        b.export(v2, tmp_path / "out", models=list(tunes))
        v3 = b.import_(tmp_path / "out", approach="update", parent=v1)  # whole: no derived_from
        v4 = b.save(b.load(v3), approach="update", parent=v1, derived_from="auto")
        assert b.info(v4).changes["derived"] == 3 and b.info(v3).changes["added"] == 3
        _every_way(b, v4, tunes)
        assert b.check().problems == []


def test_a_rebase_keeps_a_derived_model_a_delta_where_the_new_parent_holds_its_source(
    store: mmcore.ModelStore, family: tuple[str, Models]
) -> None:
    v1, parent = family
    base = parent["base"]
    given = {"base": base, "ft": _tune(base, 1), "ft2": _tune(base, 2)}
    v2 = store.save(given, approach="update", parent=v1, derived_from="auto")
    v3 = store.save({"base": base})  # another baseline holding the source
    store.rebase(v2, parent=v3)
    m = store.manifest(v2)
    assert m.parent == v3 and m.update is not None
    assert m.update.derived == {"ft": "base", "ft2": "base"} and m.update.added == []
    store.delete(v1)  # what it was stored against can go
    store.gc()
    _every_way(store, v2, given)
    v4 = store.save({"other": _net(1, width=40)})  # no source there: stored whole
    store.rebase(v2, parent=v4)
    m = store.manifest(v2)
    assert m.update is not None and m.update.derived == {} and set(m.update.added) == set(given)
    _every_way(store, v2, given)
    assert store.check().problems == []
