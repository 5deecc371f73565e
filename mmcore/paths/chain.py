"""Versions along a chain: what a version holds per model (schema, hashes, delta
depth), and recovery of a whole set or of some models.

Recovery walks the chain once, from the baseline forward: the baseline's groups
are mapped (or, for a few models, read one by one), then each update drops its
removed models, reads its whole-stored models and queues its deltas. The queued
deltas are then decoded in waves (the first delta of every model, then the
second...), one batched call per encoding and wave. Every tensor decoded from a
delta is hashed and checked against the hash recorded at save time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from .. import codec, dtypes, kernels
from .._gc import gc_paused
from ..codec.records import segment_table
from ..errors import CorruptRecordError, IntegrityError, InvalidArgumentError
from ..kernels._segments import FLOAT_KINDS, plane_width
from ..kernels.delta import quantize_decode, xor_planes_decode
from ..kernels.quantized import quantize_decode_table
from ..kernels.xor_planes import xor_planes_decode_table
from ..manifest import ContentRecord, GroupRecord, Manifest
from ..modelset import Schema
from .delta_blob import DeltaTable, decode_tables
from .delta_blob import blob_key as delta_blob_key
from .reader import LooseState, StateDict, record_views

if TYPE_CHECKING:
    from ..storage import Storage

_DELTA_CACHE = 64
# Below this share of a group's models, read them one by one instead of mapping the group.
_FEW = 8


@dataclass
class ModelInfo:
    schema: Schema
    table: torch.Tensor  # (rows, 32) hash table holding this model's rows
    first: int  # its first row: one row per tensor, BLAKE3 of the tensor as recovery produces it
    depth: int  # deltas since the model was last stored whole, along the chain as it is now
    order: list[str] | None = None  # its tensor names as the user saved them (None: the schema's)
    cost: int = 0  # bytes recovering it through its deltas reads and decodes beyond its base:
    #                per delta since it was last stored whole, its stored and plain bytes

    @property
    def hashes(self) -> torch.Tensor:
        return self.table[self.first : self.first + len(self.schema.tensors)]


def chain_of(store: Storage, vid: str) -> list[Manifest]:
    """[the version, its parent, ..., the baseline]."""
    chain = [store.manifest(vid)]
    while chain[-1].update is not None:
        parent = chain[-1].parent
        if parent is None or len(chain) > 1_000_000:
            raise CorruptRecordError(
                f"update version {chain[-1].id} has no parent: the catalog is damaged"
            )
        chain.append(store.manifest(parent))
    return chain


def _group_names(manifest: Manifest, group: GroupRecord) -> list[str]:
    if group.names is not None:
        return group.names
    return [manifest.models[i] for i in group.positions()]


def delta_table(store: Storage, manifest: Manifest) -> DeltaTable:
    """The parsed delta tables of an update version (cached per store, keyed by where
    the blob is: a blob deleted and stored again, or moved by compaction, is another
    entry, so no commit can leave a cached table pointing at the wrong bytes)."""
    assert manifest.update is not None and manifest.update.delta_blob is not None
    blob = manifest.update.delta_blob
    rec = store.content(blob)
    if rec.table is None:
        raise CorruptRecordError(f"version {manifest.id}: its delta blob has no table record")
    key = (blob, rec.pack, *rec.table, rec.hashes_offset, rec.shift)
    cache = store.delta_tables
    cached = cache.get(key)
    if cached is not None:
        return cached
    data, hashes = read_delta_blob(store, manifest, rec)
    table = decode_tables(data, len(manifest.update.changed), hashes, f"version {manifest.id}")
    if rec.shift:  # moved by compaction: the model blobs are where the table says, plus shift
        table.rows = [(row[0] + rec.shift, *row[1:]) for row in table.rows]
    store.reader.check_in_pack(rec, [(row[0], row[1]) for row in table.rows])  # read trusts it
    if len(cache) >= _DELTA_CACHE:
        cache.pop(next(iter(cache)))
    cache[key] = table
    return table


def read_delta_blob(
    store: Storage, manifest: Manifest, rec: ContentRecord | None = None
) -> tuple[bytes, torch.Tensor]:
    """An update version's delta tables and hash table, read from its pack and checked
    against the blob's content address (which covers both: a flipped bit in a depth,
    an offset or a hash is found here, before anything is decoded)."""
    assert manifest.update is not None and manifest.update.delta_blob is not None
    blob = manifest.update.delta_blob
    rec = rec or store.content(blob)
    if rec.table is None:
        raise CorruptRecordError(f"version {manifest.id}: its delta blob has no table record")
    offset, length = rec.table
    store.reader.check_in_pack(rec, [rec.table])  # before a buffer of a damaged length
    data = bytearray(length)
    if length:
        buf = torch.frombuffer(data, dtype=torch.uint8)
        store.tier.read_into(rec.pack, offset, length, buf.data_ptr())
    hashes = store.reader.stored_hashes(rec)
    if delta_blob_key(bytes(data), hashes) != blob:
        raise IntegrityError(
            f"version {manifest.id}: its delta tables or their hashes do not match the blob's "
            "content address: the stored bytes are corrupted"
        )
    return bytes(data), hashes


def model_index(store: Storage, vid: str) -> dict[str, ModelInfo]:
    """Every model of a version, in its order, with its schema, hashes and delta depth."""
    with gc_paused():
        return _model_index(store, vid)


def _model_index(store: Storage, vid: str) -> dict[str, ModelInfo]:
    chain = chain_of(store, vid)
    base = chain[-1]
    index: dict[str, ModelInfo] = {}
    for group in base.groups:
        _index_group(store, base, group, index)
    index = {name: index[name] for name in base.models}
    for name, order in base.orders.items():  # a baseline written by a rebase
        if name in index:
            index[name].order = checked_order(base, name, order, index[name].schema)
    for m in reversed(chain[:-1]):
        assert m.update is not None
        for name, source in m.update.derived.items():  # before removals: the parent's models
            before = index.get(source)
            if before is None or name in index:
                raise _bad_derivation(m, name, source)
            index[name] = ModelInfo(before.schema, before.table, before.first, before.depth,
                                    before.order, before.cost)  # fmt: skip
        for name in m.update.removed:
            index.pop(name, None)
        fresh = set(m.update.added)
        if fresh & index.keys() or not fresh <= {n for g in m.groups for n in g.names or ()}:
            raise CorruptRecordError(
                f"version {m.id} adds models its parent has, or does not store them: "
                "the store's catalog is damaged"
            )
        for group in m.groups:
            _index_group(store, m, group, index)
        if m.update.changed:
            table = delta_table(store, m)
            for name, row in zip(m.update.changed, table.rows):
                if name not in index:
                    raise CorruptRecordError(
                        f"version {m.id} holds a delta for {name!r}, which its parent does not have: "
                        "the store's catalog is damaged"
                    )
                before = index[name]
                if row[4] != len(before.schema.tensors):
                    raise IntegrityError(
                        f"version {m.id}, model {name!r}: {row[4]} tensor entries for a model of "
                        f"{len(before.schema.tensors)} tensors"
                    )
                # the depth counted along the chain, not the one recorded at save time: a
                # rebase of an ancestor changes it without rewriting this version
                index[name] = ModelInfo(before.schema, table.hashes, row[3], before.depth + 1,
                                        before.order, before.cost + row[1] + row[2])  # fmt: skip
        for name, order in m.update.orders.items():
            if name in index:
                index[name].order = checked_order(m, name, order, index[name].schema)
        new = [*m.update.added, *m.update.derived]
        order = [n for n in index if n not in set(new)] + new
        index = {name: index[name] for name in _model_order(m, order)}
    return index


def _model_order(m: Manifest, derived: list[str]) -> list[str]:
    """The version's models in the order they were saved: its recorded order, which
    must name exactly the models it holds, or the one derived from its parent's."""
    assert m.update is not None
    saved = m.update.model_order
    if saved is None:
        return derived
    if len(saved) != len(derived) or set(saved) != set(derived):
        raise CorruptRecordError(
            f"version {m.id}: its recorded model order does not name its models: the "
            "store's catalog is damaged"
        )
    return saved


def checked_order(m: Manifest, name: str, order: list[str], schema: Schema) -> list[str]:
    """A recorded tensor order, which must name exactly the model's tensors."""
    if len(order) != len(schema.tensors) or set(order) != {s.name for s in schema.tensors}:
        raise CorruptRecordError(
            f"version {m.id}: the tensor order recorded for model {name!r} does not name its "
            "tensors: the store's catalog is damaged"
        )
    return order


def _in_order(state: StateDict, order: list[str] | None) -> StateDict:
    return state if order is None else {key: state[key] for key in order}


def _index_group(store: Storage, m: Manifest, group: GroupRecord,
                 index: dict[str, ModelInfo]) -> None:  # fmt: skip
    hashes = store.reader.group_hashes(m, group)
    n = len(group.schema.tensors)
    for pos, name in enumerate(_group_names(m, group)):
        index[name] = ModelInfo(group.schema, hashes, pos * n, 0)


def recover(
    store: Storage,
    vid: str,
    wanted: set[str] | None,
    *,
    verify: bool,
    device: torch.device | None = None,
) -> dict[str, StateDict]:
    """The models of a version (or those in ``wanted``), in the version's order, on the
    CPU; or, given a ``device``, recovered on the CPU and moved there in large pieces.

    The GC stays paused from the first table read to the last view made, and what
    recovery built is dropped before it resumes: a pause per step let a collection
    between them walk every view and record made so far, and again as they aged."""
    with gc_paused():
        names, states, schemas, orders = _recover(store, vid, wanted, verify=verify,
                                                  records=None)  # fmt: skip
        if device is not None:
            moved = move_states({n: states[n] for n in names}, schemas, device)
            del states
            return {n: _in_order(moved[n], orders.get(n)) for n in names}
        plain = _state_dicts(states, names)
        del states
        return {n: _in_order(plain[n], orders.get(n)) for n in names}


def _state_dicts(states: dict[str, StateDict], names: list[str]) -> dict[str, StateDict]:
    """The models ``names`` as state dicts. Those recovery left as records (a group read,
    a wave of deltas decoded) get their views per buffer: by one unbind of its columns
    where at least half its records are wanted, else record by record. So no view is
    made for a record that a later delta replaced."""
    out: dict[str, StateDict] = {}
    buffers: dict[tuple[int, int], tuple[RecordState, list[tuple[str, int]]]] = {}
    for name in names:
        state = states[name]
        kind: type = type(state)
        if kind is RecordState:
            record = cast(RecordState, state)
            key = (id(record.buf), id(record.schema))
            buffers.setdefault(key, (record, []))[1].append((name, record.index))
        else:  # views already, or assembled tensor by tensor
            out[name] = dict(state) if kind is _LooseState else state
    for first, members in buffers.values():
        schema = first.schema
        count = first.buf.numel() // schema.stride if schema.stride else 0
        count = max(count, 1 + max(i for _, i in members))
        if 2 * len(members) >= count:
            views = record_views(first.buf, schema, count)
            for name, i in members:
                out[name] = views[i]
        else:
            for name, _ in members:
                out[name] = _plain_dict(states[name])
    return out


def recover_records(store: Storage, vid: str, *, verify: bool
                    ) -> tuple[list[str], list[tuple[Schema, list[str], torch.Tensor]]]:  # fmt: skip
    """The version's model names in its order, and its models as record buffers, one
    per architecture (in order of first appearance): (schema, names, count x stride
    bytes, model after model), each gathered by one native call from wherever
    recovery left the models."""
    names, states, schemas, _ = _recover(store, vid, None, verify=verify, records=True)  # by name
    groups: dict[Any, tuple[Schema, list[str]]] = {}
    for name in names:
        schema = schemas[name]
        groups.setdefault(schema.layout_key(), (schema, []))[1].append(name)
    return names, [(schema, members, _gather_states(states, members, schema))
                   for schema, members in groups.values()]  # fmt: skip


def _gather_states(
    states: dict[str, StateDict], members: list[str], schema: Schema, *, pin: bool = False
) -> torch.Tensor:
    """The models ``members`` laid out as records of ``schema`` in one new buffer: one
    native gather over every tensor's address (a model that is one record: its record's
    address plus each tensor's offset; a model assembled tensor by tensor: its tensors)."""
    n, stride, t = len(members), schema.stride, len(schema.tensors)
    offsets = kernels.int64_table([s.offset for s in schema.tensors])
    addresses = [_record_address(states[name], schema) for name in members]
    ptrs = kernels.int64_table([a if a is not None else 0 for a in addresses])
    ptrs = (ptrs.unsqueeze(1) + offsets.unsqueeze(0)).reshape(-1)
    keep = []
    for i, (name, address) in enumerate(zip(members, addresses)):
        if address is None:  # loose: each tensor where it is
            for j, tensor in enumerate(states[name].values()):
                flat = tensor.contiguous()
                keep.append(flat)
                ptrs[i * t + j] = flat.data_ptr()
    dst, lens = segment_table(0, schema, n)
    out = torch.empty(n * stride, dtype=torch.uint8, pin_memory=pin)
    if stride and n:
        kernels.gather(out, ptrs, lens, dst)
    return out


def _recover(
    store: Storage,
    vid: str,
    wanted: set[str] | None,
    *,
    verify: bool,
    records: bool | None = False,
) -> tuple[list[str], dict[str, StateDict], dict[str, Schema], dict[str, list[str]]]:
    """The recovered states (record views where a model is one record, in schema
    order), their names in the version's order, each model's schema, and the tensor
    order of those the user saved in another order than their schema's. With
    ``records``, a model that is one record is a ``RecordState`` (its address; views
    made only if read): for callers that want addresses, not tensors. With
    ``records=None`` (a load, which makes the views at the end: ``_state_dicts``), so
    is every model a delta decodes, and every model of a group most of whose models a
    later delta replaces (a group read with views has them made while its hashes are
    checked, but a view of a replaced record is wasted)."""
    with gc_paused():  # tens of thousands of small objects (tables, views), no cycles
        return _recover_paused(store, vid, wanted, verify=verify, records=records)


def _recover_paused(
    store: Storage,
    vid: str,
    wanted: set[str] | None,
    *,
    verify: bool,
    records: bool | None,
) -> tuple[list[str], dict[str, StateDict], dict[str, Schema], dict[str, list[str]]]:
    chain = chain_of(store, vid)
    base = chain[-1]
    states: dict[str, StateDict] = {}
    # model -> hashes its tensors must have after its last delta: checked once, on the final
    # tensors (a wrong intermediate state can only matter through them)
    last_delta: dict[str, torch.Tensor] = {}
    schemas: dict[str, Schema] = {}  # model -> its schema (deltas keep it)
    pending: dict[str, list[_Queued]] = {}  # model -> its deltas since it was last read whole
    orders: dict[str, list[str]] = {}
    order = list(base.models)
    wanted_at = _wanted_along(chain, wanted)
    need, forks = _whole_sources(chain, wanted_at)
    replaced: set[str] = set()  # (records=None: the models some delta of the chain changes)
    if records is None:
        replaced = set().union(*[m.update.changed for m in chain[:-1] if m.update is not None])

    def as_records(names: set[str]) -> bool:
        return records is not False and (records is True or 2 * len(names & replaced) >= len(names))

    for gi, group in enumerate(base.groups):
        if need.get((base.id, gi)):
            mine = need[(base.id, gi)]
            _read_group(store, base, group, mine, states, schemas, verify, as_records(mine))
    for name, keys in base.orders.items():  # a baseline written by a rebase
        if name in states:
            orders[name] = checked_order(base, name, keys, schemas[name])
    for m in reversed(chain[:-1]):
        assert m.update is not None
        here = wanted_at[m.id]  # the models that matter once this version is applied
        for name, source in m.update.derived.items():  # a new model: its source's state as of
            if (m.id, name) in forks:  # the parent, and the deltas it has pending (unless it
                _fork(m, name, source, states, schemas, orders, pending)  # is stored whole later)
        removed = set(m.update.removed)
        for name in removed:
            states.pop(name, None)
            last_delta.pop(name, None)
        if wanted is None:  # (one model's load leaves the version's order alone)
            if removed:
                order = [n for n in order if n not in removed]
            order = _model_order(m, order + m.update.added + list(m.update.derived))
        for name in removed:
            pending.pop(name, None)
            orders.pop(name, None)
        for gi, group in enumerate(m.groups):  # stored whole here: verified as it is read
            if need.get((m.id, gi)):
                mine = need[(m.id, gi)]
                _read_group(store, m, group, mine, states, schemas, verify, as_records(mine))
            names = group.names or () if here is None else [
                n for n in here if _group_index(m).get(n) == gi
            ]  # fmt: skip
            for name in names:
                last_delta.pop(name, None)
                pending.pop(name, None)  # earlier deltas of it no longer matter
                orders.pop(name, None)
        recorded = m.update.orders
        for name in recorded if here is None else [n for n in here if n in recorded]:
            if name in states:
                orders[name] = checked_order(m, name, recorded[name], schemas[name])
        if m.update.changed:
            table = delta_table(store, m)
            assert m.update.delta_blob is not None
            pack = store.content(m.update.delta_blob).pack
            if here is None:
                rows = list(zip(m.update.changed, table.rows))
            else:
                at = _changed_index(m)
                rows = [(n, table.rows[at[n]]) for n in here if n in at]
            for name, row in rows:
                if name in states:
                    pending.setdefault(name, []).append(_Queued(name, m, table, row, pack))
    # Waves: the k-th delta of every model at once. Models changed in different versions
    # are independent, so a chain of 1% updates decodes in about one batched call.
    wave = 0
    while True:
        batch = [ops[wave] for ops in pending.values() if len(ops) > wave]
        if not batch:
            break
        rest = _apply_records(store, batch, states, schemas, last_delta, records is not False)
        _apply_deltas(store, rest, states, last_delta)
        wave += 1
    if verify and last_delta:
        _check_hashes(vid, last_delta, states, schemas)
    names = (
        [n for n in states if n in wanted]
        if wanted is not None
        else [n for n in order if n in states]
    )
    return names, states, schemas, orders


def _wanted_along(chain: list[Manifest], wanted: set[str] | None) -> dict[str, set[str] | None]:
    """Per version of ``chain``, the models that matter once it is applied: ``wanted``
    at the newest; before a version that derives a wanted model from another, that
    other instead (None: every model)."""
    out: dict[str, set[str] | None] = {}
    for m in chain:
        out[m.id] = wanted
        if wanted is not None and m.update is not None and m.update.derived:
            derived = m.update.derived
            wanted = {derived.get(n, n) for n in wanted}
    return out


def _whole_sources(
    chain: list[Manifest], wanted_at: dict[str, set[str] | None]
) -> tuple[dict[tuple[str, int], set[str]], set[tuple[str, str]]]:
    """Per (version, group) of ``chain``, the models recovery reads from it: those of
    the version (those that matter there: ``wanted_at``) last stored whole there. A
    model stored whole again later (a keyframe) is not read, nor are the deltas
    between. A model derived from another starts from what its source started from;
    also returned: the (version, model) derivations recovery must follow (those of
    models not stored whole again later). With a wanted set, only those names are
    looked up (a name index per manifest, built once)."""
    # model -> (where it was last stored whole, the name read there, the derivations since)
    source: dict[str, tuple[tuple[str, int], str, tuple[tuple[str, str], ...]]] = {}
    for m in reversed(chain):
        here = wanted_at[m.id]
        if m.update is not None:
            for name, origin in m.update.derived.items():
                if here is not None and name not in here:
                    continue
                if origin not in source:
                    raise _bad_derivation(m, name, origin)
                where, read, derivations = source[origin]
                source[name] = (where, read, (*derivations, (m.id, name)))
            for name in m.update.removed:
                source.pop(name, None)
        groups = _group_index(m)
        for name in groups if here is None else [n for n in here if n in groups]:
            source[name] = ((m.id, groups[name]), name, ())
    need: dict[tuple[str, int], set[str]] = {}
    forks: set[tuple[str, str]] = set()
    for where, name, derivations in source.values():
        need.setdefault(where, set()).add(name)
        forks.update(derivations)
    return need, forks


def _bad_derivation(m: Manifest, name: str, source: str) -> CorruptRecordError:
    return CorruptRecordError(
        f"version {m.id} derives model {name!r} from {source!r}, which its parent does not "
        "hold (or holds the model already): the store's catalog is damaged"
    )


def _fork(m: Manifest, name: str, source: str, states: dict[str, StateDict],
          schemas: dict[str, Schema], orders: dict[str, list[str]],
          pending: dict[str, list[_Queued]]) -> None:  # fmt: skip
    """Model ``name``, new in ``m`` as a delta of its parent's ``source``, starts as
    ``source`` is there: its state, schema, tensor order, and copies of the deltas
    ``source`` has pending. A state that is one record is shared (decoding it makes a
    new buffer); one assembled tensor by tensor is copied, since decoding keeps the
    tensors a delta leaves unchanged, and no two models may share a tensor."""
    if source not in states or name in states:
        raise _bad_derivation(m, name, source)
    state, schema = states[source], schemas[source]
    if _record_address(state, schema) is None:
        state = _LooseState({key: tensor.clone() for key, tensor in state.items()})
    states[name] = state
    schemas[name] = schema
    if source in orders:
        orders[name] = orders[source]
    queued = [_Queued(name, d.m, d.table, d.row, d.pack) for d in pending.get(source, [])]
    pending[name] = queued


def _changed_index(m: Manifest) -> dict[str, int]:
    """Model name -> its row in ``m``'s delta tables (cached on ``m``)."""
    assert m.update is not None
    if m._changed_of is None:
        m._changed_of = {name: i for i, name in enumerate(m.update.changed)}
    return m._changed_of


def _group_index(m: Manifest) -> dict[str, int]:
    """Model name -> index of the group storing it whole in ``m`` (cached on ``m``)."""
    if m._group_of is None:
        index: dict[str, int] = {}
        for gi, group in enumerate(m.groups):
            index.update(dict.fromkeys(_group_names(m, group), gi))
        m._group_of = index
    return m._group_of


def move_states(states: dict[str, StateDict], schemas: dict[str, Schema],
                device: torch.device) -> dict[str, StateDict]:  # fmt: skip
    """CPU states moved to ``device`` in a few large copies: per architecture, every
    model is gathered into one (pinned) buffer of records by one native call
    (``_gather_states``), copied once, and viewed there as the reader views a group.
    Bit-exact, in ``states``' order."""
    groups: dict[Any, tuple[Schema, list[str]]] = {}
    loose: list[str] = []
    for name in states:
        schema = schemas.get(name)
        if schema is None:
            loose.append(name)
        else:
            groups.setdefault(schema.layout_key(), (schema, []))[1].append(name)
    out: dict[str, StateDict] = {}
    for schema, members in groups.values():
        host = _gather_states(states, members, schema, pin=device.type == "cuda")
        for name, state in zip(members, record_views(host.to(device), schema, len(members))):
            out[name] = state
    for name in loose:
        out[name] = {k: t.to(device) for k, t in states[name].items()}
    return {name: out[name] for name in states}


def _plain_dict(state: StateDict) -> StateDict:
    if isinstance(state, RecordState):
        return state.views()
    return dict(state) if type(state) is _LooseState else state


class RecordState(Mapping[str, torch.Tensor]):
    """A recovered model that is record ``index`` of ``buf`` (laid out by ``schema``),
    its tensor views made only when it is read as a state dict."""

    __slots__ = ("_views", "buf", "index", "schema")

    def __init__(self, buf: torch.Tensor, index: int, schema: Schema) -> None:
        self.buf, self.index, self.schema = buf, index, schema
        self._views: StateDict | None = None

    @property
    def address(self) -> int:
        return self.buf.data_ptr() + self.index * self.schema.stride

    def views(self) -> StateDict:
        if self._views is None:
            stride = self.schema.stride
            record = self.buf[self.index * stride : (self.index + 1) * stride]
            self._views = record_views(record, self.schema, 1)[0]
        return self._views

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.views()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.views())

    def __len__(self) -> int:
        return len(self.schema.tensors)

    def as_state(self) -> StateDict:
        """Itself, typed as the states of a recovery are (each is read as a mapping)."""
        return cast(StateDict, self)


def _read_group(store: Storage, m: Manifest, group: GroupRecord, wanted: set[str] | None,
                states: dict[str, StateDict], schemas: dict[str, Schema], verify: bool,
                records: bool) -> None:  # fmt: skip
    cpu = torch.device("cpu")
    if wanted is not None and len(wanted) * _FEW < group.count:
        found = [(name, _position(m, group, name)) for name in wanted]
        hits = [(name, where) for name, where in found if where is not None]
        models = store.reader.read_models(m, group, [where for _, where in hits], verify=verify,
                                           device=cpu)  # fmt: skip
        for (name, _), state in zip(hits, models):
            states[name] = state
            schemas[name] = group.schema
        return
    names = _group_names(m, group)
    if records:  # one buffer of records: each model its address, no views
        buf = store.reader.read_records(m, group, verify=verify, pool=store.pool)
        for i, name in enumerate(names):
            if wanted is None or name in wanted:
                states[name] = RecordState(buf, i, group.schema).as_state()
                schemas[name] = group.schema
        return
    models = store.reader.read_group(m, group, verify=verify, device=cpu, pool=store.pool)
    for name, state in zip(names, models):
        if wanted is None or name in wanted:
            states[name] = state
            schemas[name] = group.schema


def _position(m: Manifest, group: GroupRecord, name: str) -> int | None:
    """The position of ``name`` in ``group``, or None."""
    if group.names is None:
        where = m.locate(name)
        return None if where is None or m.groups[where[0]] is not group else where[1]
    try:
        return group.names.index(name)
    except ValueError:
        return None


def _model_plain(
    store: Storage, m: Manifest, row: tuple[int, ...], name: str, pack: str
) -> torch.Tensor:
    return _plain_of(_read_blob(store, pack, row), row, f"version {m.id}, model {name!r}")


def _read_blob(store: Storage, pack: str, row: tuple[int, ...]) -> bytearray:
    """A model blob's stored bytes, read on their own."""
    raw = bytearray(row[1])
    if row[1]:
        store.tier.read_into(pack, row[0], row[1], kernels.buffer_address(raw))
    return raw


def _plain_of(raw: bytes | bytearray | memoryview, row: tuple[int, ...], what: str) -> torch.Tensor:
    """The plain model blob from its stored bytes (a tensor of its own)."""
    data = _plain_buffer(raw, row, what)
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if row[2]
        else torch.empty(0, dtype=torch.uint8)
    )


def _plain_buffer(raw: bytes | bytearray | memoryview, row: tuple[int, ...],
                  what: str) -> bytes | bytearray | memoryview:  # fmt: skip
    """The plain model blob from its stored bytes: decompressed, or (stored plain)
    ``raw`` itself, no copy."""
    plain = row[2]
    data = raw if row[6] == codec.NONE else codec.plain_bytes(raw, row[6], plain, what)
    got = memoryview(data).nbytes
    if got != plain:
        raise IntegrityError(f"{what}: {got} payload bytes, not the {plain} recorded")
    return data


def _model_plains(
    store: Storage, batch: list[_Queued]
) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
    """The plain model blobs of ``batch``: the objects holding them (kept alive by the
    caller while it reads them), and each blob's address and length (int64). The blobs
    of one version lie one after another in its pack: where most of a version's blobs
    are wanted, one read covers them, and blobs stored plain are used where they were read."""
    out: list[Any] = [None] * len(batch)
    keep: list[Any] = []
    by_version: dict[tuple[str, str], list[int]] = {}
    for i, d in enumerate(batch):
        by_version.setdefault((d.m.id, d.pack), []).append(i)
    for (_, pack), idx in by_version.items():
        lo = min(batch[i].row[0] for i in idx)
        hi = max(batch[i].row[0] + batch[i].row[1] for i in idx)
        wanted = sum(batch[i].row[1] for i in idx)
        if len(idx) < 4 or hi - lo > 2 * wanted:
            for i in idx:
                d = batch[i]
                raw = _read_blob(store, pack, d.row)
                out[i] = _plain_buffer(raw, d.row, f"version {d.m.id}, model {d.name!r}")
            continue
        region = torch.empty(hi - lo, dtype=torch.uint8)
        store.tier.read_into(pack, lo, hi - lo, region.data_ptr())
        keep.append(region)  # blobs stored plain are views of it
        view = kernels.tensor_view(region)
        idx = _decompress_many(batch, idx, view, lo, out, keep)

        def decode(part: list[int], view: memoryview = view, lo: int = lo) -> None:
            for i in part:
                d = batch[i]
                at = d.row[0] - lo
                out[i] = _plain_buffer(
                    view[at : at + d.row[1]], d.row, f"version {d.m.id}, model {d.name!r}"
                )

        # zstd releases the GIL: the reader thread takes every other model blob
        helper = store.pool.submit(decode, idx[1::2]) if len(idx) >= 64 else None
        try:
            decode(idx[0::2] if helper else idx)
        except BaseException:
            if helper is not None:
                helper.exception()  # waits, and keeps this thread's error the one raised
            raise
        if helper is not None:
            helper.result()
    keep.extend(out)
    at = kernels.int64_table([kernels.buffer_address(b) for b in out])
    length = kernels.int64_table([d.row[2] for d in batch])
    return keep, at, length


def _decompress_many(batch: list[_Queued], idx: list[int], view: memoryview, lo: int,
                     out: list[Any], keep: list[Any]) -> list[int]:  # fmt: skip
    """Decodes the zstd model blobs among ``batch[i] for i in idx`` (their bytes in
    ``view``, which starts at pack offset ``lo``) by one multi-frame call, into ``out``;
    returns the indices left to decode one by one (every one, where the call fails:
    decoding them one by one names the damage)."""
    many = [i for i in idx if batch[i].row[6] == codec.ZSTD]
    if len(many) < 64:
        return idx
    rows = torch.tensor([batch[i].row[:3] for i in many], dtype=torch.int64)
    if bool((rows[:, 2] > rows[:, 1] * codec.MAX_RATIO).any()):
        return idx  # a recorded length no frame of that size can produce: refused there
    segments = torch.stack([rows[:, 0] - lo, rows[:, 1]], dim=1)
    got = codec.decompress_segments(
        view, kernels.tensor_bytes(segments), kernels.tensor_bytes(rows[:, 2])
    )
    if got is None:
        return idx
    plains, holder = got
    keep.append(holder)
    for i, plain in zip(many, plains):
        out[i] = plain
    done = set(many)
    return [i for i in idx if i not in done]


_LooseState = LooseState  # a state assembled tensor by tensor: not one model record


def _record_address(state: StateDict, schema: Schema) -> int | None:
    """The address of the model record ``state``'s tensors are views of, or None for a
    state assembled tensor by tensor. Every other state of a recovery is built by
    ``record_views`` over one buffer, so one tensor's address locates the record."""
    if type(state) is _LooseState:
        return None
    if isinstance(state, RecordState):
        return state.address
    for spec in schema.tensors:
        if spec.nbytes:
            return state[spec.name].data_ptr() - spec.offset
    return 0 if schema.stride == 0 else None  # nothing to read; else not a record we know


def _apply_records(store: Storage, batch: list[_Queued], states: dict[str, StateDict],
                   schemas: dict[str, Schema], last_delta: dict[str, torch.Tensor],
                   records: bool) -> list[_Queued]:  # fmt: skip
    """Decodes whole model records: per schema, every model of ``batch`` whose parent is
    one record, in a few native calls over address tables (parent records copied, raw
    tensors gathered, xor-planes and quantized encodings decoded), then views as the
    reader builds them. Returns the deltas left for ``_apply_deltas``."""
    by_schema: dict[int, list[tuple[_Queued, int]]] = {}
    rest = []
    for d in batch:
        schema = schemas.get(d.name)
        count = d.row[4]
        address = None if schema is None else _record_address(states[d.name], schema)
        if address is None or schema is None or count != len(schema.tensors):
            rest.append(d)
        else:
            by_schema.setdefault(id(schema), []).append((d, address))
    for group in by_schema.values():
        _decode_records(store, group, schemas[group[0][0].name], states, last_delta, records)
    return rest


def _decode_records(store: Storage, group: list[tuple[_Queued, int]], schema: Schema,
                    states: dict[str, StateDict], last_delta: dict[str, torch.Tensor],
                    records: bool = False) -> None:  # fmt: skip
    """Decodes one delta of each model of ``group`` (all of ``schema``, each state one
    record at the given address) into one new buffer of records: unchanged tensors
    copied from the parent, raw ones from the payload, xor-planes and quantized
    encodings decoded against the parent straight into their place (a few native
    calls over address tables), then viewed as the reader views a group. (Decoding
    over the parent instead would write into a private mapping of the pack, page by
    copied page: measured 5x slower than a fresh buffer.)"""
    n, stride, t = len(group), schema.stride, len(schema.tensors)
    parents = kernels.int64_table([a for _, a in group])
    plains, plain_at, plain_len = _model_plains(store, [d for d, _ in group])
    kind, at, length = _entry_columns([d for d, _ in group], t).unbind(1)
    model = torch.arange(n, dtype=torch.int64).repeat_interleave(t)
    dst, nbytes = segment_table(0, schema, n)  # each tensor's offset in ``out``, and its length
    bad = (at + length > plain_len[model]) | ((kind == codec.RAW) & (length != nbytes))
    bad |= (kind != codec.SAME) & (kind != codec.RAW) & (kind != codec.XOR) & (kind != codec.QUANT)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        d = group[i // t][0]
        raise IntegrityError(
            f"version {d.m.id}, model {d.name!r}, tensor {schema.tensors[i % t].name!r}: "
            "its delta entry does not fit its payload or its tensor"
        )
    out = torch.empty(n * stride, dtype=torch.uint8)
    src = plain_at[model] + at
    parent = parents[model] + (dst - model * stride)  # each tensor's parent
    for code, source in ((codec.SAME, parent), (codec.RAW, src)):  # copied as they are
        rows = (kind == code).nonzero().reshape(-1)
        if rows.numel():
            kernels.gather(out, source[rows].contiguous(), nbytes[rows].contiguous(),
                           dst[rows].contiguous())  # fmt: skip
    dst = dst + out.data_ptr()
    xor = (kind == codec.XOR).nonzero().reshape(-1)
    if xor.numel():
        widths = torch.tensor([plane_width(dtypes.from_name(s.dtype)) for s in schema.tensors],
                              dtype=torch.int64).repeat(n)  # fmt: skip
        try:
            xor_planes_decode_table(src[xor].contiguous(), length[xor].contiguous(),
                                    parent[xor].contiguous(), dst[xor].contiguous(),
                                    nbytes[xor].contiguous(), widths[xor].contiguous())  # fmt: skip
        except InvalidArgumentError as exc:
            raise IntegrityError(
                f"a delta of {group[0][0].m.id}'s chain is damaged: {exc}"
            ) from None
    quant = (kind == codec.QUANT).nonzero().reshape(-1)
    if quant.numel():
        bad_at = _decode_quantized(schema, quant % t, src[quant], length[quant],
                                   parent[quant].contiguous(), dst[quant].contiguous())  # fmt: skip
        if bad_at is not None:
            i = int(quant[bad_at])
            d = group[i // t][0]
            raise IntegrityError(
                f"version {d.m.id}, model {d.name!r}, tensor {schema.tensors[i % t].name!r}: "
                "its quantized encoding does not fit its tensor"
            )
    del plains  # every decoded byte is in ``out`` now
    made = (
        [RecordState(out, i, schema).as_state() for i in range(n)]
        if records
        else record_views(out, schema, n)
    )
    for (d, _), state in zip(group, made):
        states[d.name] = state
        last_delta[d.name] = d.table.hashes[d.row[3] : d.row[3] + t]


def _entry_columns(batch: list[_Queued], t: int) -> torch.Tensor:
    """The (kind, offset, length) entries of the ``t`` tensors of each delta of ``batch``,
    (len(batch) * t, 3) int64, gathered from their tables' columns by one index."""
    # table -> (its first row in ``columns``, its columns)
    tables: dict[int, tuple[int, torch.Tensor]] = {}
    firsts = []
    for d in batch:
        where = tables.get(id(d.table))
        if where is None:
            first = sum(c.shape[0] for _, c in tables.values())
            where = tables[id(d.table)] = (first, d.table.columns)
        firsts.append(where[0] + d.row[3])
    parts = [c for _, c in tables.values()]
    columns = parts[0] if len(parts) == 1 else torch.cat(parts)
    index = torch.tensor(firsts, dtype=torch.int64).unsqueeze(1) + torch.arange(t)
    return columns[index.reshape(-1)]


def _decode_quantized(schema: Schema, spec: torch.Tensor, src: torch.Tensor, length: torch.Tensor,
                      parents: torch.Tensor, outs: torch.Tensor) -> int | None:  # fmt: skip
    """``quantize_decode_table`` of encodings of tensors ``spec`` of ``schema`` (their
    float kinds, element sizes and counts taken from it; 0: not a float, refused)."""
    kinds = torch.tensor([FLOAT_KINDS.get(dtypes.from_name(s.dtype), 0) for s in schema.tensors],
                         dtype=torch.int64)[spec]  # fmt: skip
    itemsize = torch.tensor([dtypes.from_name(s.dtype).itemsize for s in schema.tensors],
                            dtype=torch.int64)[spec]  # fmt: skip
    numel = torch.tensor([s.nbytes for s in schema.tensors], dtype=torch.int64)[spec] // itemsize
    return quantize_decode_table(src, length, parents, outs, kinds, itemsize, numel)


@dataclass
class _Queued:
    name: str
    m: Manifest
    table: DeltaTable
    row: tuple[int, ...]
    pack: str


def _apply_deltas(
    store: Storage,
    batch: list[_Queued],
    states: dict[str, StateDict],
    last_delta: dict[str, torch.Tensor],
) -> None:
    """Decodes one delta of each model in ``batch`` (all against ``states``), in place,
    with one call per encoding, and notes in ``last_delta`` the hashes they must have."""
    jobs: dict[int, list[tuple[StateDict, str, torch.Tensor, torch.Tensor]]] = {
        codec.XOR: [],
        codec.QUANT: [],
    }
    for d in batch:
        name, m, row = d.name, d.m, d.row
        state = states[name]
        first, count = row[3], row[4]
        if count != len(state):
            raise IntegrityError(
                f"version {m.id}, model {name!r}: {count} tensor entries for {len(state)} tensors"
            )
        plain = _model_plain(store, m, row, name, d.pack)
        new_state = _LooseState(state)
        for (key, parent), (kind, at, length) in zip(
            state.items(), d.table.entries[first : first + count]
        ):
            if kind == codec.SAME:
                continue
            if at + length > plain.numel():
                raise IntegrityError(
                    f"version {m.id}, model {name!r}, tensor {key!r}: entry past the payload"
                )
            piece = plain[at : at + length]
            if kind == codec.RAW:
                new_state[key] = _raw_tensor(piece, parent, m.id, name, key)
            elif kind in jobs:
                jobs[kind].append((new_state, key, piece, parent))
            else:
                raise IntegrityError(
                    f"version {m.id}, model {name!r}, tensor {key!r}: unknown kind {kind}"
                )
        states[name] = new_state
        last_delta[name] = d.table.hashes[first : first + count]
    for kind, decode in ((codec.XOR, xor_planes_decode), (codec.QUANT, quantize_decode)):
        if jobs[kind]:
            outs = decode([j[2] for j in jobs[kind]], [j[3] for j in jobs[kind]])
            for (target, key, _, _), out in zip(jobs[kind], outs):
                target[key] = out


def _raw_tensor(
    piece: torch.Tensor, like: torch.Tensor, vid: str, model: str, key: str
) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    if piece.numel() != nbytes:
        raise IntegrityError(
            f"version {vid}, model {model!r}, tensor {key!r}: {piece.numel()} raw bytes, not {nbytes}"
        )
    if nbytes == 0:
        return torch.empty_like(like)
    if piece.data_ptr() % like.element_size():
        # raw tensors lie back to back in a model blob: one after an odd-sized tensor
        # (three float16, then a float32) starts at any byte, and a view needs alignment
        piece = piece.clone()
    return (
        piece.view(like.dtype).view(like.shape)
        if like.dtype != torch.uint8
        else piece.view(like.shape)
    )


def tensor_table(states: dict[str, StateDict], names: list[str], schemas: dict[str, Schema]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """Where every tensor of the models ``names`` is, model after model: (addresses,
    byte lengths, each model's tensor count, the tensors made contiguous, which the
    caller holds while it reads the addresses). A model that is one record gives its
    record's address plus each tensor's offset, per schema in one step, in the
    schema's order; a model assembled tensor by tensor gives its tensors, in its order."""
    counts: list[int] = []
    loose: list[int] = []
    records: dict[int, tuple[Schema, list[int], list[int]]] = {}  # schema -> (models, addresses)
    for i, name in enumerate(names):
        state, schema = states[name], schemas.get(name)
        address = None if schema is None else _record_address(state, schema)
        if address is None or schema is None:
            counts.append(len(state))
            loose.append(i)
            continue
        counts.append(len(schema.tensors))
        entry = records.setdefault(id(schema), (schema, [], []))
        entry[1].append(i)
        entry[2].append(address)
    count_t = kernels.int64_table(counts)
    starts = count_t.cumsum(0) - count_t  # each model's first row
    ptrs = torch.zeros(sum(counts), dtype=torch.int64)
    lens = torch.zeros(sum(counts), dtype=torch.int64)
    keep: list[torch.Tensor] = []
    for i in loose:
        at = int(starts[i])
        for j, tensor in enumerate(states[names[i]].values()):
            flat = tensor.contiguous()
            keep.append(flat)
            ptrs[at + j] = flat.data_ptr()
            lens[at + j] = flat.numel() * flat.element_size()
    for schema, models, addresses in records.values():
        offsets = kernels.int64_table([s.offset for s in schema.tensors])
        rows = starts[kernels.int64_table(models)].unsqueeze(1) + torch.arange(len(offsets))
        ptrs[rows] = kernels.int64_table(addresses).unsqueeze(1) + offsets
        lens[rows] = kernels.int64_table([s.nbytes for s in schema.tensors])
    return ptrs, lens, count_t, keep


def _check_hashes(vid: str, expected: dict[str, torch.Tensor], states: dict[str, StateDict],
                  schemas: dict[str, Schema]) -> None:  # fmt: skip
    """One BLAKE3 call over every tensor decoded from a delta, against its recorded hash
    (the segment table from ``tensor_table``)."""
    ptrs, lens, counts, _held = tensor_table(states, list(expected), schemas)
    if counts.tolist() != [h.shape[0] for h in expected.values()]:
        raise IntegrityError(f"version {vid}: the recorded hashes do not match the models' tensors")
    got = kernels.blake3_segments(ptrs, lens)  # (``_held``: the loose tensors read)
    want = torch.cat(list(expected.values()))
    bad = (got != want).any(dim=1).nonzero()
    if bad.numel():  # the culprit's name, found by walking the rows again (errors only)
        where = [(name, key) for name in expected for key in states[name]]
        name, key = where[int(bad[0, 0])]
        raise IntegrityError(
            f"version {vid}: model {name!r}, tensor {key!r} does not match its recorded BLAKE3 "
            "hash after decoding its deltas: the stored bytes are corrupted",
            model=name,
            tensor=key,
        )
