"""Loads of a stored version, by its approach: a baseline's groups read (or mapped), an
update's chain recovered (``chain``), a provenance version retrained (``retrain``).
``ModelStore.load``, ``load_stacked`` and ``load_model`` check their arguments and
come here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ModelNotFoundError, decoding
from ..manifest import Manifest
from ..stacked import StackedSet
from . import chain, retrain
from .reader import StateDict, stack_of, stacked_groups

if TYPE_CHECKING:
    from ..storage import Storage


def load(store: Storage, manifest: Manifest, names: list[str] | None, device: torch.device,
         verify: bool, allow_code_change: bool) -> dict[str, StateDict]:  # fmt: skip
    """The models of ``manifest`` (or ``names`` of them), {name: {tensor name: tensor}}
    in saved order."""
    if manifest.provenance is not None:
        got = _provenance(store, manifest, device, allow_code_change).state_dicts()
        orders = tensor_orders(store, manifest)
        got = {n: {k: sd[k] for k in orders[n]} if n in orders else sd for n, sd in got.items()}
        if names is None:
            return got
        refuse_missing(manifest.id, [n for n in names if n not in got])
        return {n: got[n] for n in names}
    with decoding(manifest.id):
        if manifest.update is not None:
            return _load_update(store, manifest, names, device, verify)
        if names is not None:
            refuse_missing(manifest.id, [n for n in names if manifest.locate(n) is None])
            return {name: _baseline_model(store, manifest, name, device, verify) for name in names}
        out: list[StateDict | None] = [None] * len(manifest.models)
        for group in manifest.groups:
            states = store.reader.read_group(
                manifest, group, verify=verify, device=device, pool=store.pool
            )
            for mi, state in zip(group.positions(), states):
                out[mi] = state
        got = {name: state for name, state in zip(manifest.models, out) if state is not None}
        for name in manifest.orders:  # (a baseline written by a rebase)
            order = baseline_order(manifest, name)
            if order is not None and name in got:
                got[name] = {k: got[name][k] for k in order}
        return got


def load_model(store: Storage, manifest: Manifest, name: str, device: torch.device, verify: bool,
               allow_code_change: bool) -> StateDict:  # fmt: skip
    """One model of ``manifest``, reading only its bytes (and, for an update version,
    the deltas of its chain)."""
    if manifest.provenance is not None:
        return load(store, manifest, [name], device, True, allow_code_change)[name]
    if manifest.update is None and manifest.locate(name) is None:
        raise ModelNotFoundError(
            f"version {manifest.id} has no model {name!r} ({len(manifest.models)} models)"
        )
    with decoding(manifest.id):
        if manifest.update is not None:
            return _load_update(store, manifest, [name], device, verify)[name]
        return _baseline_model(store, manifest, name, device, verify)


def load_stacked(store: Storage, manifest: Manifest, device: torch.device, verify: bool,
                 allow_code_change: bool) -> StackedSet:  # fmt: skip
    """The models of ``manifest`` as stacks, per architecture group."""
    if manifest.provenance is not None:
        return _provenance(store, manifest, device, allow_code_change)
    with decoding(manifest.id):
        if manifest.update is not None:
            order, parts = chain.recover_records(store, manifest.id, verify=verify)
            return StackedSet([stack_of(names, buf, schema, device) for schema, names, buf in parts],
                              order)  # fmt: skip
        return stacked_groups(store.reader, manifest, verify=verify, device=device, pool=store.pool)


def parent_loader(store: Storage, parent: str, allow_code_change: bool) -> retrain.LoadParent:
    """What a provenance path loads its parent with, on a device of its choice."""

    def load_parent(device: torch.device) -> StackedSet:
        return load_stacked(store, store.manifest(parent), device, True, allow_code_change)

    return load_parent


def _provenance(store: Storage, manifest: Manifest, device: torch.device,
                allow_code_change: bool) -> StackedSet:  # fmt: skip
    assert manifest.parent is not None
    return retrain.recover(store, manifest, device=device, allow_code_change=allow_code_change,
                           load_parent=parent_loader(store, manifest.parent, allow_code_change))  # fmt: skip


def tensor_orders(store: Storage, manifest: Manifest) -> dict[str, list[str]]:
    """The tensor orders a provenance version's models keep: its nearest stored
    ancestor's, where they differ from their schema's (stacks come in that)."""
    while manifest.provenance is not None:
        assert manifest.parent is not None
        manifest = store.manifest(manifest.parent)
    if manifest.update is None:  # a baseline: its schemas' order, or its recorded one
        with decoding(manifest.id):
            found = {n: baseline_order(manifest, n) for n in manifest.orders}
        return {n: order for n, order in found.items() if order is not None}
    with decoding(manifest.id):
        index = chain.model_index(store, manifest.id)
    return {n: info.order for n, info in index.items() if info.order}


def baseline_order(manifest: Manifest, name: str) -> list[str] | None:
    """The tensor order a baseline recorded for a model, checked against its schema."""
    order = manifest.orders.get(name)
    where = manifest.locate(name)
    if order is None or where is None:
        return None
    return chain.checked_order(manifest, name, order, manifest.groups[where[0]].schema)


def _baseline_model(store: Storage, manifest: Manifest, name: str, device: torch.device,
                    verify: bool) -> StateDict:  # fmt: skip
    where = manifest.locate(name)
    assert where is not None
    gi, pos = where
    state = store.reader.read_model(
        manifest, manifest.groups[gi], pos, verify=verify, device=device
    )
    order = baseline_order(manifest, name)
    return state if order is None else {k: state[k] for k in order}


def _load_update(store: Storage, manifest: Manifest, names: list[str] | None,
                 device: torch.device, verify: bool) -> dict[str, StateDict]:  # fmt: skip
    got = chain.recover(store, manifest.id, None if names is None else set(names), verify=verify,
                        device=None if device.type == "cpu" else device)  # fmt: skip
    if names is not None:
        refuse_missing(manifest.id, [n for n in names if n not in got])
        got = {n: got[n] for n in names}
    return got


def refuse_missing(vid: str, missing: list[str]) -> None:
    if missing:
        raise ModelNotFoundError(
            f"version {vid} has no model(s) {', '.join(map(repr, missing[:5]))}; "
            "store.info(version) describes the version"
        )
