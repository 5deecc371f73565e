"""Shared tensors: tensors equal across the models of a group are stored once per
distinct value (a row blob the group's models point into), in every save path; the
group's other tensors stay in its records, viewed without a copy."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import torch
from conftest import assert_sets_equal

import mmcore
from mmcore.errors import ConflictError, CorruptRecordError, FormatVersionError, IntegrityError
from mmcore.manifest import Manifest
from mmcore.paths import baseline

Models = dict[str, dict[str, torch.Tensor]]


def _backbone(seed: int, layers: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"body.{i}.weight": torch.randn(96, 96, generator=g) for i in range(layers)}
    sd["body.bn.running_var"] = torch.rand(96, generator=g)
    return sd


def _frozen(count: int, seed: int = 0, backbone: dict[str, torch.Tensor] | None = None) -> Models:
    """``count`` fine-tunes of one frozen backbone: only their heads differ."""
    body = _backbone(seed) if backbone is None else backbone
    out = {}
    for k in range(count):
        g = torch.Generator().manual_seed(1000 * seed + k)
        out[f"ft{k}"] = {**body, "head.weight": torch.randn(10, 96, generator=g),
                         "head.bias": torch.randn(10, generator=g),
                         "steps": torch.tensor(k, dtype=torch.int64)}  # fmt: skip
    return out


def _every_way(store: mmcore.ModelStore, vid: str, want: Models) -> None:
    got = store.load(vid)
    assert list(got) == list(want)
    for name in want:
        assert list(got[name]) == list(want[name])
    assert_sets_equal(got, want)
    for name, sd in want.items():
        assert_sets_equal({name: store.load_model(vid, name)}, {name: sd})
    assert_sets_equal(store.load_stacked(vid).state_dicts(), want)


def _body_bytes(models: Models) -> int:
    first = next(iter(models.values()))
    return sum(t.numel() * t.element_size() for k, t in first.items() if k.startswith("body"))


def test_frozen_backbone_is_stored_once(store: mmcore.ModelStore) -> None:
    models = _frozen(8)
    one = store.save({"ft0": models["ft0"]})
    vid = store.save(models)
    m = store.manifest(vid)
    (group,) = m.groups
    assert group.shared is not None and group.shared.count == 1
    shared = {group.schema.tensors[i].name for i in group.shared.tensors}
    # every tensor of the body but the one under SHARE_MIN bytes
    assert shared == {k for k, t in models["ft0"].items()
                      if k.startswith("body") and t.nbytes >= baseline.SHARE_MIN}  # fmt: skip
    assert "body.bn.running_var" not in shared
    assert group.shared.rows == [0] * 8
    # the set costs one backbone and eight heads: under 1.15x one model
    assert m.stored_bytes < 1.15 * store.manifest(one).stored_bytes
    assert m.logical_bytes == 8 * sum(t.nbytes for t in models["ft0"].values())
    _every_way(store, vid, models)
    assert store.verify(vid) == 8 * len(models["ft0"])
    assert msgpack.unpackb(store.storage.catalog.get("manifests", vid.encode()))["format"] == 6


def test_stacks_view_records_and_expand_the_shared_row(store: mmcore.ModelStore) -> None:
    models = _frozen(5)
    vid = store.save(models)
    (group,) = store.manifest(vid).groups
    (stack,) = store.load_stacked(vid).groups
    body = stack.params["body.0.weight"]
    assert body.stride(0) == 0  # one tensor, expanded: no copy per model
    head = stack.params["head.weight"]  # the models' own tensors: views of their records
    assert head.stride(0) * head.element_size() == group.record_schema.stride
    bias = stack.params["head.bias"]
    at = {spec.name: spec.offset for spec in group.record_schema.tensors}
    assert bias.data_ptr() - head.data_ptr() == at["head.bias"] - at["head.weight"]
    with pytest.raises(RuntimeError):  # an expanded column refuses an in-place write
        body.add_(1)
    for name, sd in models.items():
        assert torch.equal(stack.state_dict(name)["body.0.weight"], sd["body.0.weight"])


def test_loaded_models_do_not_share_memory(store: mmcore.ModelStore) -> None:
    models = _frozen(3)
    vid = store.save(models)
    got = store.load(vid)
    got["ft0"]["body.0.weight"].add_(1)
    assert torch.equal(got["ft1"]["body.0.weight"], models["ft1"]["body.0.weight"])
    assert got["ft0"]["body.0.weight"].data_ptr() != got["ft2"]["body.0.weight"].data_ptr()
    few = store.load(vid, models=["ft1", "ft2"])
    assert few["ft1"]["body.1.weight"].data_ptr() != few["ft2"]["body.1.weight"].data_ptr()
    assert_sets_equal(few, {n: models[n] for n in ("ft1", "ft2")})


def test_two_backbones_are_two_rows(store: mmcore.ModelStore) -> None:
    a, b = _frozen(3, seed=1), _frozen(3, seed=2)
    models = {"a0": a["ft0"], "b0": b["ft0"], "a1": a["ft1"], "b1": b["ft1"], "a2": a["ft2"]}
    vid = store.save(models)
    (group,) = store.manifest(vid).groups
    assert group.shared is not None and group.shared.count == 2
    assert group.shared.rows == [0, 1, 0, 1, 0]
    _every_way(store, vid, models)
    (stack,) = store.load_stacked(vid).groups
    assert stack.params["body.0.weight"].stride(0) != 0  # gathered: two rows


def test_small_or_unequal_tensors_are_not_shared(store: mmcore.ModelStore) -> None:
    small = {f"m{k}": {"w": torch.ones(100), "b": torch.randn(3)} for k in range(50)}
    v1 = store.save(small)  # equal, but under SHARE_MIN bytes each
    assert store.manifest(v1).groups[0].shared is None
    own = {f"m{k}": _backbone(k) for k in range(3)}  # large, all different
    v2 = store.save(own)
    assert store.manifest(v2).groups[0].shared is None
    _every_way(store, v1, small)
    _every_way(store, v2, own)


def test_savings_below_the_floor_are_not_shared(store: mmcore.ModelStore) -> None:
    models = {f"m{k}": {"w": torch.ones(1024), "b": torch.randn(4096)} for k in range(3)}
    vid = store.save(models)  # 4 KiB shared by 3 models: 8 KiB saved, under SHARE_SAVES
    assert store.manifest(vid).groups[0].shared is None
    _every_way(store, vid, models)


def test_a_second_set_with_the_backbone_references_its_rows(store: mmcore.ModelStore) -> None:
    body = _backbone(7)
    first, second = _frozen(4, seed=7, backbone=body), _frozen(4, seed=8, backbone=body)
    v1 = store.save(first)
    v2 = store.save(second)
    g1, g2 = store.manifest(v1).groups[0], store.manifest(v2).groups[0]
    assert g1.shared is not None and g2.shared is not None
    assert g1.shared.blob == g2.shared.blob  # the backbone's rows: one blob
    assert store.storage.content(g1.shared.blob).refs == 2
    assert store.manifest(v2).stored_bytes < _body_bytes(first)  # its heads, not its body
    store.delete(v1)
    store.gc()
    assert store.storage.content(g2.shared.blob).refs == 1
    _every_way(store, v2, second)
    assert store.check().problems == []
    store.delete(v2)
    store.gc()
    assert store.storage.catalog.get("content", g2.shared.blob) is None


def test_a_row_blob_deleted_meanwhile_fails_the_save(store: mmcore.ModelStore,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A save that found its rows stored does not write them; if they went before its
    commit, it commits nothing (ConflictError), and a save after it writes them."""
    models = _frozen(3)
    monkeypatch.setattr(store.storage, "stored", lambda key: True)
    with pytest.raises(ConflictError, match="was deleted meanwhile"):
        store.save(models)
    assert store.versions() == []  # nothing committed
    monkeypatch.undo()
    vid = store.save(models)
    _every_way(store, vid, models)


def test_updates_on_a_shared_baseline(store: mmcore.ModelStore) -> None:
    models = _frozen(4)
    v1 = store.save(models)
    nxt = {n: dict(sd) for n, sd in models.items()}
    nxt["ft1"]["body.2.weight"] = nxt["ft1"]["body.2.weight"] + 1e-3  # a frozen tensor moves
    nxt["ft3"]["head.weight"] = nxt["ft3"]["head.weight"] * 2
    added = _frozen(3, seed=5)  # new models of another backbone: stored whole, sharing it
    nxt.update({f"new{k}": sd for k, sd in enumerate(added.values())})
    v2 = store.save(nxt, approach="update", parent=v1)
    changes = store.info(v2).changes
    assert changes["added"] == 3
    m2 = store.manifest(v2)
    assert any(g.shared is not None for g in m2.groups)  # the whole models share their body
    _every_way(store, v2, nxt)
    _every_way(store, v1, models)
    v3 = store.save(nxt, approach="update", parent=v2)
    assert store.info(v3).changes["unchanged"] == len(nxt)
    store.rebase(v2)  # a baseline of its own: written by the baseline writer
    assert any(g.shared is not None for g in store.manifest(v2).groups)
    _every_way(store, v2, nxt)
    _every_way(store, v3, nxt)
    assert store.verify() > 0


def test_corrupted_rows_are_found(store_path: Path) -> None:
    models = _frozen(3)
    with mmcore.open(store_path) as store:
        vid = store.save(models)
        group = store.manifest(vid).groups[0]
        assert group.shared is not None
        rec = store.storage.content(group.shared.blob)
        at = rec.extents[0][0] + 100
    pack = store_path / "packs" / f"{rec.pack}.pack"
    data = bytearray(pack.read_bytes())
    data[at] ^= 0xFF
    pack.write_bytes(bytes(data))
    with mmcore.open(store_path) as store:
        for call in (lambda: store.load(vid), lambda: store.load_model(vid, "ft2"),
                     lambda: store.load_stacked(vid), lambda: store.verify(vid)):  # fmt: skip
            with pytest.raises(IntegrityError, match=r"body\.0\.weight") as err:
                call()
            assert err.value.tensor == "body.0.weight"
        assert store.load(vid, verify=False)["ft1"]["head.weight"].equal(
            models["ft1"]["head.weight"]
        )


def _damage(store: mmcore.ModelStore, vid: str, change: dict[str, object]) -> None:
    raw = msgpack.unpackb(store.storage.catalog.get("manifests", vid.encode()))
    raw["groups"][0]["shared"].update(change)
    store.storage.catalog.commit([("manifests", vid.encode(), msgpack.packb(raw))])
    store.storage.forget()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"tensors": [3, 1]}, "ascending indices"),
        ({"tensors": [99]}, "ascending indices"),
        ({"tensors": []}, "ascending indices"),
        ({"rows": b"\x00" * 4}, "bytes of rows"),
        ({"rows": b"\x05\x00\x00\x00" * 3}, "past the 1 rows"),
        ({"count": 9}, "rows"),
        ({"blob": b"short"}, "blob key"),
    ],
)
def test_damaged_shared_fields_are_refused(store: mmcore.ModelStore, change: dict[str, object],
                                           problem: str) -> None:  # fmt: skip
    vid = store.save(_frozen(3))
    _damage(store, vid, change)
    with pytest.raises(CorruptRecordError, match=problem):
        store.load(vid)


def test_a_reader_of_format_5_refuses_shared_groups(store: mmcore.ModelStore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    vid = store.save(_frozen(3))
    raw = store.storage.catalog.get("manifests", vid.encode())
    assert raw is not None
    monkeypatch.setattr("mmcore.manifest.MANIFEST_FORMAT", 5)
    with pytest.raises(FormatVersionError, match="format 6"):
        Manifest.decode(raw)


def test_stacked_saves_and_thresholds(store: mmcore.ModelStore,
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    models = _frozen(4)
    vid = store.save(models)
    again = store.save_stacked(store.load_stacked(vid))  # expanded columns: written per model
    _every_way(store, again, models)
    monkeypatch.setattr(baseline, "SHARE_MIN", 1 << 30)
    plain = store.save(models)
    assert store.manifest(plain).groups[0].shared is None
    _every_way(store, plain, models)


def test_compaction_and_transfer_move_rows(store: mmcore.ModelStore, tmp_path: Path) -> None:
    models = _frozen(4)
    filler = {f"x{k}": {"w": torch.randn(4000)} for k in range(4)}
    doomed = store.save(filler)
    vid = store.save({**models, **filler})  # one pack: the filler's group and the family's
    store.delete(doomed)
    store.gc(compact_below=2.0)  # every pack rewritten
    _every_way(store, vid, {**models, **filler})
    assert store.verify() > 0
    with mmcore.open(tmp_path / "other.mm") as other:
        store.push(other)
        _every_way(other, vid, {**models, **filler})
        assert other.check().problems == []


def test_info_and_du_report_what_sharing_saved(store_path: Path) -> None:
    import subprocess
    import sys

    with mmcore.open(store_path) as store:
        vid = store.save(_frozen(4))
        saved = store.manifest(vid).groups[0].shared_saved()
    assert saved == 3 * 6 * 96 * 96 * 4  # three models' six 96x96 float32 body tensors
    run = [sys.executable, "-m", "mmcore"]
    info = subprocess.run([*run, "info", str(store_path), vid], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert "shared     24 tensors equal across models stored once per value: 663.6 KB" in info
    du = subprocess.run([*run, "du", str(store_path)], capture_output=True, text=True,
                        check=True).stdout  # fmt: skip
    assert "saved      by shared tensors: 663.6 KB of parameters not stored, in 1 group(s)" in du


def test_a_group_whose_first_models_share_nothing_streams(store: mmcore.ModelStore) -> None:
    """Where none of a group's first ``SHARE_LOOK`` models repeats a tensor, the group
    is written as it is read (not held); a set whose first models share is held whole."""
    n = baseline.SHARE_LOOK
    own = {f"m{k}": _backbone(k, layers=2) for k in range(n)}
    late = {f"late{k}": own["m0"] for k in range(4)}  # copies after the look: not shared
    v1 = store.save({**own, **late})
    assert store.manifest(v1).groups[0].shared is None
    _every_way(store, v1, {**own, **late})
    early = {**{f"late{k}": own["m0"] for k in range(4)}, **own}
    v2 = store.save(early)
    group = store.manifest(v2).groups[0]
    assert group.shared is not None and group.shared.count == n
    _every_way(store, v2, early)


def test_a_subset_retrained_on_a_parent_that_shares_tensors(store: mmcore.ModelStore) -> None:
    """Provenance writes retrained rows into its parent's stacks: a shared tensor comes
    expanded and is copied per model first (the fuzz found the in-place write refused)."""
    from mmcore.examples import battery

    cells = battery.make_cells(6, seed=0)
    for k in range(1, 6):  # every cell starts from the first one's weights
        cells[f"cell_{k:06d}"] = dict(cells["cell_000000"])
    v1 = store.save(cells)
    assert store.manifest(v1).groups[0].shared is not None
    data = battery.make_data(list(cells), rows=16, seed=1)
    ds = store.put_dataset(data)
    some = ["cell_000002", "cell_000004"]
    recipe = mmcore.Recipe(battery.TRAINER, data=ds, params={"lr": 0.1, "epochs": 1}, seed=5,
                           models=some)  # fmt: skip
    after = dict(cells)
    after.update(battery.train({n: cells[n] for n in some}, {n: data[n] for n in some}, lr=0.1,
                               epochs=1, seed=5))  # fmt: skip
    v2 = store.save(after, approach="provenance", parent=v1, recipe=recipe)
    assert_sets_equal(store.load(v2), after)
    assert_sets_equal(store.load(v1), cells)


def test_a_group_whose_every_tensor_is_shared(store: mmcore.ModelStore) -> None:
    """Records of no bytes: every tensor in the row blob (the fuzz found the hash table
    of no tensors per model refused)."""
    body = {k: t for k, t in _backbone(3, layers=2).items() if t.nbytes >= baseline.SHARE_MIN}
    models = {f"m{k}": dict(body) for k in range(4)}
    vid = store.save(models)
    group = store.manifest(vid).groups[0]
    assert group.shared is not None and len(group.record_schema.tensors) == 0
    _every_way(store, vid, models)
    nxt = {**models, "m1": {k: t + 1 for k, t in body.items()}}
    v2 = store.save(nxt, approach="update", parent=vid)
    _every_way(store, v2, nxt)
    assert store.check().problems == []


def test_two_architectures_with_one_backbone_share_one_row_blob(store: mmcore.ModelStore) -> None:
    """Fine-tunes with heads of another size are another architecture (group): their
    backbone's rows are one blob, written once and referenced by both groups."""
    body = _backbone(4)
    ten = _frozen(3, backbone=body)
    hundred = {f"wide{k}": {**body, "head.weight": torch.randn(100, 96)} for k in range(3)}
    models = {**ten, **hundred}
    vid = store.save(models)
    groups = store.manifest(vid).groups
    assert len(groups) == 2 and all(g.shared is not None for g in groups)
    assert groups[0].shared.blob == groups[1].shared.blob  # type: ignore[union-attr]
    assert store.storage.content(groups[0].shared.blob).refs == 2  # type: ignore[union-attr]
    assert store.manifest(vid).stored_bytes < 2 * _body_bytes(ten)  # the body written once
    _every_way(store, vid, models)
    store.delete(vid)
    store.gc()
    assert store.check().problems == []
    assert store.storage.catalog.get("content", groups[0].shared.blob) is None  # type: ignore[union-attr]


def test_a_fine_tune_added_later_shares_the_family_backbone(store: mmcore.ModelStore) -> None:
    """An update adding one more fine-tune of a family (no derived_from): stored whole,
    its backbone a reference to the family's row blob, not a second copy."""
    body = _backbone(6)
    family = _frozen(4, backbone=body)
    v1 = store.save(family)
    row_blob = store.manifest(v1).groups[0].shared.blob  # type: ignore[union-attr]
    more = {**family, "late": {**body, "head.weight": torch.randn(10, 96),
                               "head.bias": torch.randn(10), "steps": torch.tensor(9)}}  # fmt: skip
    v2 = store.save(more, approach="update", parent=v1)
    assert store.info(v2).changes["added"] == 1
    (group,) = store.manifest(v2).groups
    assert group.shared is not None and group.shared.blob == row_blob
    assert store.info(v2).stored_bytes < _body_bytes(family) / 4  # its head, not its body
    assert store.storage.content(row_blob).refs == 2
    _every_way(store, v2, more)
    store.rebase(v2)  # a baseline of its own: the late model's row still the family's
    _every_way(store, v2, more)
    assert store.check().problems == []


def test_a_commit_built_again_counts_a_twice_referenced_blob_twice() -> None:
    """Two groups referencing one new row blob: two references, however often the
    commit is built (object storage builds it again after another writer's commit)."""
    from mmcore.manifest import ContentRecord
    from mmcore.paths.commit import content_records

    class Empty:
        def get(self, cf: str, key: bytes) -> bytes | None:
            return None

    rec = ContentRecord("0" * 16, [[4096, 1]], 8192, 32, refs=1)
    blobs: list[tuple[bytes, ContentRecord | None]] = [(b"k" * 32, rec), (b"k" * 32, rec)]
    for _ in range(3):
        puts, live, _ = content_records(Empty(), blobs, "0" * 16, 9000, 0.0)  # type: ignore[arg-type]
        (put,) = [p for p in puts if p[0] == "content"]
        assert ContentRecord.decode(put[2]).refs == 2 and live == 1
    assert rec.refs == 1
