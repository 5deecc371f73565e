"""The provenance save path and datasets in the store.

A dataset is stored like a model set (``baseline.write_set``: names, groups of
one schema, content-addressed blobs) under a ``datasets`` record whose id is
the BLAKE3 of its names and blob keys, so the same bytes stored twice are one
dataset. A provenance version stores no parameters: its recipe, the trainer's
code hash, the environment, and per retrained model the BLAKE3 over its
tensors' BLAKE3 hashes (its *root*, 32 bytes per model). Recovery loads the
parent, runs the registered trainer on the recipe's models (seeded,
deterministic, batched as the trainer does it) and checks every root.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import torch

from .. import kernels, provenance
from ..errors import (
    CorruptRecordError,
    DatasetNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    InvalidModelSetError,
    ProvenanceError,
    ProvenanceMismatchError,
)
from ..manifest import ContentRecord, DatasetRecord, Manifest, ProvenanceInfo
from ..modelset import _rows_contiguous, iter_models, row_addresses
from ..stacked import StackedSet, stack_sets
from ..store.packs import HEADER_SIZE, PackWriter, align_up
from . import baseline
from .commit import Blobs, content_records
from .reader import stacked_groups

if TYPE_CHECKING:
    from ..storage import Storage

StateDicts = dict[str, dict[str, torch.Tensor]]
LoadParent = Callable[[torch.device], StackedSet]  # the parent version, loaded on a device


class EnvironmentWarning(UserWarning):
    """A provenance version is recovered in another environment than it was saved in."""


# -- datasets ---------------------------------------------------------------


def dataset_id(names: list[str], blob_keys: list[bytes]) -> str:
    head = b"mmcore-dataset-v1" + bytes(msgpack.packb(names, use_bin_type=True))
    return kernels.blake3_bytes(head + b"".join(blob_keys)).hex()


def put_dataset(store: Storage, data: Any, progress: Any, compress: bool = False) -> str:
    """Stores ``data`` ({name: {tensor name: tensor}}) and returns its id; data stored
    before (same names, same bytes) is not stored again."""
    writer = store.tier.create()
    try:
        written = baseline.write_set(writer, data, progress, compress=compress)
        pack_size = writer.finish()
    except BaseException:
        writer.abort()
        raise
    did = dataset_id(written.names, [g.blob for g in written.groups])
    with store.catalog.transaction():  # (object storage: ConflictError if another writer
        if store.catalog.get("datasets", did.encode()) is not None:  # changed these records)
            store.tier.delete(writer.pack_id)
            return did
        now = time.time()
        puts, live, new_bytes = content_records(store.catalog, list(written.blobs),
                                                writer.pack_id, pack_size, now)  # fmt: skip
        rec = DatasetRecord(did, written.names, written.groups, written.logical_bytes, new_bytes,
                            now)  # fmt: skip
        puts.append(("datasets", did.encode(), rec.encode()))
        store.catalog.commit(puts)  # the pack stays from here on (see Storage.save)
    if not live:
        store.tier.delete(writer.pack_id)
    return did


def dataset(store: Storage, did: str) -> DatasetRecord:
    if not isinstance(did, str) or not did:
        raise InvalidArgumentError(f"a dataset id is a string from store.put_dataset, got {did!r}")
    raw = store.catalog.get("datasets", did.encode())
    if raw is None:
        raise DatasetNotFoundError(
            f"no dataset {did[:16]!r}... in {store.path}; store.datasets() lists them"
        )
    return DatasetRecord.decode(raw)


def _as_manifest(rec: DatasetRecord) -> Manifest:
    """The dataset seen as a manifest, for the blob reader (and its error messages)."""
    return Manifest(id=f"dataset {rec.id[:16]}", approach="dataset", created=rec.created,
                    models=rec.names, groups=rec.groups, logical_bytes=rec.logical_bytes)  # fmt: skip


def load_dataset(
    store: Storage, did: str, device: torch.device
) -> dict[str, dict[str, torch.Tensor]]:
    """Every entry of a dataset, hash-checked, in its order."""
    rec = dataset(store, did)
    m = _as_manifest(rec)
    out: list[dict[str, torch.Tensor] | None] = [None] * len(rec.names)
    for group in rec.groups:
        states = store.reader.read_group(m, group, verify=True, device=device, pool=store.pool)
        for pos, state in zip(group.positions(), states):
            out[pos] = state
    return {name: state for name, state in zip(rec.names, out) if state is not None}


def load_dataset_stacked(store: Storage, did: str, device: torch.device) -> StackedSet:
    """A stored dataset as stacks (one per shape of its entries), hash-checked."""
    rec = dataset(store, did)
    return stacked_groups(
        store.reader, _as_manifest(rec), verify=True, device=device, pool=store.pool
    )


def verify_dataset(store: Storage, did: str) -> int:
    rec = dataset(store, did)
    m = _as_manifest(rec)
    for group in rec.groups:
        store.reader.verify_group(m, group)
    return sum(g.count * len(g.schema.tensors) for g in rec.groups)


def users(store: Storage, did: str) -> list[str]:
    """The versions whose recipe reads dataset ``did``."""
    found = []
    for key, raw in store.catalog.scan("manifests"):
        m = Manifest.decode(raw)
        if m.provenance is not None and m.provenance.recipe.get("data") == did:
            found.append(key.decode())
    return found


def delete_dataset(store: Storage, did: str) -> None:
    rec = dataset(store, did)
    using = users(store, did)
    if using:
        raise InvalidArgumentError(
            f"dataset {did[:16]}... is the data of version(s) {', '.join(using[:5])}; "
            "delete those versions first"
        )
    puts, deletes = [], [("datasets", did.encode())]
    for group in rec.groups:
        content = store.content(group.blob)
        content.refs -= 1
        if content.refs > 0:
            puts.append(("content", group.blob, content.encode()))
        else:
            deletes.append(("content", group.blob))
    store.catalog.commit(puts, deletes)


# -- provenance versions ------------------------------------------------------


@dataclass
class WrittenProvenance:
    info: ProvenanceInfo
    blobs: Blobs
    logical_bytes: int


def roots(models: StateDicts, names: list[str]) -> torch.Tensor:
    """(models, 32): per model, BLAKE3 over the BLAKE3 hashes of its tensors in order."""
    tensors = [t for n in names for t in models[n].values()]
    hashes = kernels.blake3_tensors(tensors).cpu().contiguous()  # (an empty list: (0, 32))
    return _roots_of(hashes, torch.tensor([len(models[n]) for n in names], dtype=torch.int64))


def _roots_of(hashes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per model, BLAKE3 over its ``counts[i]`` consecutive rows of ``hashes`` (host)."""
    starts = torch.cumsum(counts, 0) - counts
    ptrs = starts * kernels.HASH_SIZE + hashes.data_ptr()
    return kernels.blake3_segments(ptrs, counts * kernels.HASH_SIZE)


def stacked_roots(stacks: StackedSet, names: list[str]) -> torch.Tensor:
    """``roots`` of the models ``names`` held in ``stacks``, in that order: each tensor
    hashed where it lies in its stack (an address table from the strides)."""
    found: dict[str, torch.Tensor] = {}
    for g in stacks.groups:
        if g.device.type != "cpu":
            table = roots(g.state_dicts(), list(g.names))
        else:
            columns = [_rows_contiguous(t) for t in g.params.values()]
            lens = torch.tensor([t[0].numel() * t.element_size() for t in columns],
                                dtype=torch.int64).repeat(len(g))  # fmt: skip
            hashes = kernels.blake3_segments(row_addresses(columns, len(g)).reshape(-1), lens)
            table = _roots_of(hashes, torch.full((len(g),), len(columns), dtype=torch.int64))
        found.update(zip(g.names, table))
    if not names:
        return torch.empty((0, kernels.HASH_SIZE), dtype=torch.uint8)
    return torch.stack([found[n] for n in names])


def roots_key(table: torch.Tensor) -> bytes:
    return kernels.blake3_bytes(b"mmcore-provenance-roots-v1" + kernels.tensor_bytes(table))


def _mismatches(a: torch.Tensor, b: torch.Tensor, names: list[str]) -> list[str]:
    bad = (a != b).any(dim=1).nonzero().reshape(-1).tolist()
    return [names[i] for i in bad]


def write_provenance(store: Storage, writer: PackWriter, models: Any, parent: str,
                     recipe: provenance.Recipe, *, check: bool, progress: Any,
                     load_parent: LoadParent) -> WrittenProvenance:  # fmt: skip
    """Checks ``models`` against ``recipe`` run on ``parent`` (``load_parent(device)``
    loads it where the models are) and writes the table of their hashes."""
    if not isinstance(recipe, provenance.Recipe):
        raise InvalidArgumentError(
            f"a provenance save needs recipe=mmcore.Recipe(...), got {type(recipe).__name__}"
        )
    found = provenance.registered(recipe.trainer)
    data_rec = dataset(store, recipe.data)  # exists
    given: StateDicts = {}
    devices = set()
    for entry in iter_models(models, keep_cuda=True):
        given[entry.name] = dict(zip(entry.keys, entry.sources))
        if entry.sources:
            devices.add(entry.device)
        progress(1)
    # the recipe runs where the models are: one GPU, or else the CPU
    device = devices.pop() if len(devices) == 1 and None not in devices else None
    if device is None:
        given = {n: {k: t.cpu() for k, t in sd.items()} for n, sd in given.items()}
        device = torch.device("cpu")
    parent_set = load_parent(device)
    parent_models = parent_set.state_dicts()  # views of the stacks
    if set(given) != set(parent_models):
        extra = sorted(set(given) - set(parent_models))[:3]
        gone = sorted(set(parent_models) - set(given))[:3]
        raise InvalidModelSetError(
            "a provenance version holds its parent's models (the recipe's retrained, the rest "
            f"unchanged); not in the parent: {extra or 'none'}, missing here: {gone or 'none'}"
        )
    order = list(parent_models)
    subset = list(recipe.models) if recipe.models is not None else order
    unknown = [n for n in subset if n not in parent_models]
    if unknown:
        raise InvalidArgumentError(f"Recipe.models names {unknown[:3]}, not models of the parent")
    for name in order:
        want, got = parent_models[name], given[name]
        if {k: (t.dtype, t.shape) for k, t in want.items()} != {
            k: (t.dtype, t.shape) for k, t in got.items()
        }:
            raise InvalidModelSetError(
                f"model {name!r} has other tensors (names, dtypes or shapes) than in the parent: "
                "retraining keeps a model's architecture"
            )
        given[name] = {k: got[k] for k in want}  # matched by name; hashed in the parent's order
    chosen = set(subset)
    others = [n for n in order if n not in chosen]
    if others:
        differ = _mismatches(roots(given, others), roots(parent_models, others), others)
        if differ:
            raise InvalidModelSetError(
                f"model(s) {differ[:3]} are not retrained by the recipe but differ from the parent; "
                "list them in Recipe.models, or pass the parent's tensors"
            )
    table = roots(given, subset)  # on the host
    if check:
        again = _retrain(store, found, recipe, parent_set, subset, device)
        bad = _mismatches(stacked_roots(again, subset), table, subset)
        if bad:
            raise ProvenanceMismatchError(
                f"the recipe does not reproduce {len(bad)} of the {len(subset)} model(s) given, e.g. "
                f"{bad[:3]}: nothing was saved. Check the trainer is deterministic for this seed, "
                "or save with check=False to record the given models' hashes anyway",
                models=bad,
            )
    offset = align_up(HEADER_SIZE, 64)
    if table.numel():
        writer.write_ptr(table.data_ptr(), table.numel(), offset)
    key = roots_key(table)
    rec = ContentRecord(writer.pack_id, [], offset, table.numel(), refs=1)
    pm = store.manifest(parent)
    depth = 1 if pm.provenance is None else pm.provenance.depth + 1
    tensors = sum(len(sd) for sd in given.values())
    logical = sum(t.numel() * t.element_size() for sd in given.values() for t in sd.values())
    stats = {"models": len(order), "tensors": tensors, "retrained": len(subset),
             "unchanged": len(others), "roots_bytes": table.numel(),
             "dataset_bytes": data_rec.logical_bytes}  # fmt: skip
    info = ProvenanceInfo(recipe=recipe.encode(), code_hash=found.code_hash,
                          environment=provenance.environment(device), retrained=subset,
                          hashes_blob=key, depth=depth, stats=stats)  # fmt: skip
    return WrittenProvenance(info, [(key, rec)], logical)


def _retrain(store: Storage, found: provenance.Trainer, recipe: provenance.Recipe,
             parent: StackedSet, subset: list[str], device: torch.device) -> StackedSet:  # fmt: skip
    """Runs the recipe on the models ``subset`` of ``parent``: a stacked trainer on the
    parent's stacks (and the dataset's) as they are; another on state dicts."""
    if found.stacked:
        chosen = set(subset)
        groups = [g.select([n for n in subset if n in set(g.names)]) for g in parent.groups
                  if chosen.intersection(g.names)]  # fmt: skip
        rows = load_dataset_stacked(store, recipe.data, device)
        return provenance.run_stacked(found, recipe, StackedSet(groups), rows)
    models = parent.state_dicts()
    data = load_dataset(store, recipe.data, device)
    return stack_sets(provenance.run(found, recipe, {n: models[n] for n in subset}, data))


def recover(store: Storage, m: Manifest, *, device: torch.device, allow_code_change: bool,
            load_parent: LoadParent) -> StackedSet:  # fmt: skip
    """The models of provenance version ``m`` as stacks: its parent's (``load_parent``
    loads them on a device), the recipe's retrained (their rows replaced in the
    parent's stacks)."""
    info = m.provenance
    assert info is not None and m.parent is not None
    found = provenance.registered(str(info.recipe["trainer"]))
    if found.code_hash != info.code_hash and not allow_code_change:
        raise ProvenanceError(
            f"version {m.id}: trainer {found.name!r} has changed since the save (code hash "
            f"{found.code_hash[:12]}, recorded {info.code_hash[:12]}); pass allow_code_change=True "
            "to retrain with the new code (the result is still checked against the recorded hashes)"
        )
    # retrain on the kind of device the save ran the recipe on (another kind gives other
    # bits), then move the result where it was asked for
    saved_on = info.environment.get("device")
    if saved_on == "cuda" and torch.cuda.is_available():
        train_on = device if device.type == "cuda" else torch.device("cuda")
    else:
        train_on = torch.device("cpu")
    differences = provenance.environment_differences(
        info.environment, provenance.environment(train_on)
    )
    if differences:
        warnings.warn(
            f"version {m.id} was saved in another environment ({'; '.join(differences)}); "
            "retraining may not reproduce it bit for bit",
            EnvironmentWarning,
            stacklevel=4,
        )
    recipe = provenance.Recipe(**info.recipe)  # validated when the manifest was decoded
    parent = load_parent(train_on)
    held = {n for g in parent.groups for n in g.names}
    missing = [n for n in info.retrained if n not in held]
    if missing:
        raise CorruptRecordError(
            f"version {m.id} retrains {missing[:3]}, which its parent does not hold"
        )
    trained = _retrain(store, found, recipe, parent, info.retrained, train_on)
    rec = store.content(info.hashes_blob)
    stored = store.reader.stored_hashes(rec)
    if roots_key(stored) != info.hashes_blob or stored.shape[0] != len(info.retrained):
        raise IntegrityError(f"version {m.id}: its table of recorded hashes is corrupted")
    bad = _mismatches(stacked_roots(trained, info.retrained), stored, info.retrained)
    if bad:
        raise ProvenanceMismatchError(
            f"version {m.id}: retraining did not reproduce {len(bad)} model(s), e.g. {bad[:3]} "
            "(another device kind, library version or trainer code gives other bits); the "
            "version cannot be recovered here",
            models=bad,
        )
    out = _replace_rows(parent, trained)
    return out.to(device) if train_on != device else out


def _replace_rows(parent: StackedSet, trained: StackedSet) -> StackedSet:
    """``parent`` with the models of ``trained`` replaced: a group retrained whole is the
    trainer's stack; otherwise its rows are written into the parent's stack."""
    new = {n: (g, i) for g in trained.groups for i, n in enumerate(g.names)}
    out = []
    for g in parent.groups:
        rows = [(i, new[n]) for i, n in enumerate(g.names) if n in new]
        if not rows:
            out.append(g)
            continue
        first = rows[0][1][0]
        if len(rows) == len(g) and first.names == g.names:
            out.append(first)
            continue
        for key, column in list(g.params.items()):
            if column.dim() and column.shape[0] > 1 and column.stride(0) == 0:
                column = g.params[key] = column.clone()  # a shared tensor, one row per model now
            for source in {id(src): src for _, (src, _) in rows}.values():
                at = [(i, j) for i, (src, j) in rows if src is source]
                dst = torch.tensor([i for i, _ in at], dtype=torch.int64, device=column.device)
                idx = torch.tensor([j for _, j in at], dtype=torch.int64, device=column.device)
                column.index_copy_(0, dst, source.params[key].index_select(0, idx))
        out.append(g)
    return StackedSet(out, parent.order)
