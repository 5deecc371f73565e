"""Bounded recovery (issue 21): a model is stored whole again once recovering it
through its deltas would cost more than ``max_recovery`` times recovering it whole,
and recovery reads nothing a later keyframe superseded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import assert_sets_equal

import mmcore
from mmcore.errors import InvalidArgumentError
from mmcore.paths import chain

Set = dict[str, dict[str, torch.Tensor]]


def _fleet(n: int = 6, seed: int = 0) -> Set:
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
            for i in range(n)}  # fmt: skip


def _step(models: Set, seed: int, keys: tuple[str, ...] = ("w", "b")) -> Set:
    """Every model with the tensors ``keys`` nudged (a full retrain: every byte moves)."""
    g = torch.Generator().manual_seed(seed)
    return {n: {k: t + 0.01 * torch.randn(t.shape, generator=g) if k in keys else t
                for k, t in sd.items()} for n, sd in models.items()}  # fmt: skip


def _chain(store: mmcore.ModelStore, length: int, **kwargs: object) -> tuple[list[str], list[Set]]:
    models = _fleet()
    vids, sets = [store.save(models)], [models]
    for i in range(length):
        models = _step(models, i + 1)
        vids.append(store.save(models, approach="update", parent=vids[-1], **kwargs))  # type: ignore[arg-type]
        sets.append(models)
    return vids, sets


def test_fully_changed_models_alternate_between_a_delta_and_a_keyframe(
    store: mmcore.ModelStore,
) -> None:
    vids, sets = _chain(store, 6)
    changes = [store.info(v).changes for v in vids[1:]]
    assert [c["keyframes"] for c in changes] == [0, 6, 0, 6, 0, 6]
    assert [c["delta"] for c in changes] == [6, 0, 6, 0, 6, 0]
    assert all(store.info(v).max_recovery == 2.0 for v in vids[1:])
    for vid, want in zip(vids, sets):
        assert_sets_equal(store.load(vid), want)
        assert_sets_equal({"m3": store.load_model(vid, "m3")}, {"m3": want["m3"]})
    costs = chain.model_index(store.storage, vids[-1])
    assert all(info.depth == 0 and info.cost == 0 for info in costs.values())
    index = chain.model_index(store.storage, vids[-2])
    assert all(info.depth == 1 and info.cost > 0 for info in index.values())


def test_without_a_bound_only_max_chain_stores_models_whole_again(
    store: mmcore.ModelStore,
) -> None:
    vids, sets = _chain(store, 5, max_recovery=None, max_chain=3)
    assert [store.info(v).changes["keyframes"] for v in vids[1:]] == [0, 0, 0, 6, 0]
    assert store.info(vids[1]).max_recovery is None
    for vid, want in zip(vids, sets):
        assert_sets_equal(store.load(vid), want)


def test_small_changes_chain_on_until_their_bytes_add_up(store: mmcore.ModelStore) -> None:
    """Only the bias (32 of 2080 elements) moves each version: recovery through ten such
    deltas costs far less than a second whole read, so nothing is stored whole."""
    models = _fleet()
    vids, sets = [store.save(models)], [models]
    for i in range(10):
        models = _step(models, i + 1, keys=("b",))
        vids.append(store.save(models, approach="update", parent=vids[-1]))
        sets.append(models)
    assert sum(store.info(v).changes["keyframes"] for v in vids[1:]) == 0
    assert chain.model_index(store.storage, vids[-1])["m0"].depth == 10
    assert_sets_equal(store.load(vids[-1]), sets[-1])


@pytest.mark.parametrize("bad", [0.5, 0, -1, math.inf, math.nan, True, "2", [2]])
def test_a_bad_max_recovery_is_refused_before_anything_is_written(
    store: mmcore.ModelStore, bad: object
) -> None:
    base = store.save(_fleet())
    with pytest.raises(InvalidArgumentError, match=r"max_recovery must be a number >= 1"):
        store.save(_step(_fleet(), 1), approach="update", parent=base, max_recovery=bad)  # type: ignore[arg-type]
    assert len(store.versions()) == 1


def test_recovery_reads_no_model_a_keyframe_superseded(
    store: mmcore.ModelStore, store_path: Path
) -> None:
    """The baseline's bytes of the models stored whole again later are never read: the
    last version loads (verified) even with them destroyed, and check() finds it."""
    vids, sets = _chain(store, 2)  # v1 deltas, v2 keyframes of every model
    base = store.manifest(vids[0])
    rec = store.storage.content(base.groups[0].blob)
    offset, _count = rec.extents[0]
    store.close()
    pack = next(p for p in (store_path / "packs").rglob("*") if p.name.startswith(rec.pack))
    with open(pack, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    with mmcore.open(store_path) as again:
        assert_sets_equal(again.load(vids[2]), sets[2])
        assert again.check().problems != []
