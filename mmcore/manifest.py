"""Version manifests and content records: msgpack maps with a format number.

Decoding checks the format number first, so a record written by a newer mmcore
fails with FormatVersionError instead of being misread. See docs/FORMAT.md.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import CorruptRecordError, FormatVersionError, InvalidArgumentError
from .modelset import Schema, laid_out
from .recipe import Recipe
from .record import DAMAGED, Record

MANIFEST_FORMAT = 6  # newest read; baselines are written as 1 (4 with tensor orders, from a
# rebase), updates 2 (4 with tensor or model orders: a reader of 2 would return them in
# another order; 5 with models derived from others: a reader of 4 would not find them),
# provenance 3; any version whose groups share tensors 6 (a reader of 5 would read the
# group's blob as whole records)
CONTENT_FORMAT = 3  # newest read; 2 for a delta blob moved by compaction ("shift"), 3 coded
DATASET_FORMAT = 1
APPROACHES = ("baseline", "update", "provenance")


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _unpack(data: bytes, what: str, newest: int) -> Record:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptRecordError(f"{what} record is not valid msgpack ({exc}); {DAMAGED}") from exc
    if not isinstance(obj, dict):
        raise CorruptRecordError(f"{what} record is not a map; {DAMAGED}")
    rec = Record(obj, what)
    fmt = rec.integer("format", minimum=1)
    if fmt > newest:
        raise FormatVersionError(
            f"{what} record has format {fmt}, newer than this mmcore reads ({newest}); "
            "upgrade mmcore"
        )
    return rec


@dataclass
class SharedTensors:
    """Tensors of a group stored once per distinct value (docs/FORMAT.md, "Shared
    tensors"): the group's blob holds the other tensors of each model; the *row blob*
    ``blob`` holds ``count`` rows of these tensors, and model ``i`` of the group (group
    order) has row ``rows[i]``."""

    tensors: list[int]  # indices into the group's schema, ascending
    count: int
    blob: bytes
    rows: list[int]

    def encode(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "count": self.count, "blob": self.blob,
                "rows": struct.pack(f"<{len(self.rows)}I", *self.rows)}  # fmt: skip

    @classmethod
    def decode(cls, rec: Record, schema: Schema, models: int) -> SharedTensors:
        tensors = [rec.check_integer(t, "tensors") for t in rec.array("tensors")]
        if not tensors or tensors != sorted(set(tensors)) or tensors[-1] >= len(schema.tensors):
            raise rec.corrupt(
                f"field 'tensors' should be ascending indices below {len(schema.tensors)}"
            )
        count = rec.integer("count", minimum=1)
        blob = rec.binary("blob")
        raw = rec.binary("rows")
        if len(blob) != 32:
            raise rec.corrupt(f"blob key of {len(blob)} bytes, not 32")
        if len(raw) != 4 * models or count > max(models, 1):
            raise rec.corrupt(f"{len(raw)} bytes of rows, {count} rows, for {models} models")
        rows = list(struct.unpack(f"<{models}I", raw))
        if rows and max(rows) >= count:
            raise rec.corrupt(f"a model's row {max(rows)} is past the {count} rows")
        return cls(tensors, count, blob, rows)


@dataclass
class GroupRecord:
    """Models of one schema, stored model after model in one blob (and, where some of
    their tensors are shared, those in a row blob: ``shared``)."""

    schema: Schema
    count: int
    blob: bytes  # content key of the blob (see ContentRecord)
    members: list[int] | None = None  # indices into Manifest.models; None: all, in order
    names: list[str] | None = field(
        default=None, compare=False
    )  # update versions: UpdateInfo.whole
    shared: SharedTensors | None = None
    _parts: tuple[Schema, Schema] | None = field(default=None, repr=False, compare=False)

    def positions(self) -> list[int]:
        return list(range(self.count)) if self.members is None else self.members

    def _split(self) -> tuple[Schema, Schema]:
        if self._parts is None:
            assert self.shared is not None
            self._parts = split_schema(self.schema, self.shared.tensors)
        return self._parts

    @property
    def record_schema(self) -> Schema:
        """The layout of the records in the group's blob: its schema, less shared tensors."""
        return self.schema if self.shared is None else self._split()[0]

    @property
    def row_schema(self) -> Schema:
        """The layout of the rows of the row blob (only with ``shared``)."""
        return self._split()[1]

    def blobs(self) -> list[bytes]:
        return [self.blob] if self.shared is None else [self.blob, self.shared.blob]

    def payload_bytes(self) -> int:
        """Bytes of its records in its blob, and of its rows in its row blob."""
        own = self.count * self.record_schema.stride
        return own if self.shared is None else own + self.shared.count * self.row_schema.stride

    def shared_saved(self) -> int:
        """Parameter bytes its shared tensors did not store: one row per distinct value,
        not one per model."""
        if self.shared is None:
            return 0
        return (self.count - self.shared.count) * sum(s.nbytes for s in self.row_schema.tensors)

    def hash_bytes(self) -> int:
        """Bytes of its blobs' hash tables."""
        n = self.count * len(self.record_schema.tensors)
        if self.shared is not None:
            n += self.shared.count * len(self.row_schema.tensors)
        return n * 32

    def encode(self) -> dict[str, Any]:
        members = None
        if self.members is not None:
            members = struct.pack(f"<{len(self.members)}I", *self.members)
        return {
            "schema": self.schema.encode(),
            "count": self.count,
            "blob": self.blob,
            "members": members,
            **({} if self.shared is None else {"shared": self.shared.encode()}),
        }

    @classmethod
    def decode(cls, rec: Record) -> GroupRecord:
        count = rec.integer("count")
        blob = rec.binary("blob")
        if len(blob) != 32:
            raise rec.corrupt(f"blob key of {len(blob)} bytes, not 32")
        members = rec.optional_binary("members")
        decoded = None
        if members is not None:
            if len(members) != 4 * count:
                raise rec.corrupt(f"{len(members)} bytes of members for {count} models")
            decoded = list(struct.unpack(f"<{count}I", members))
        schema = Schema.decode(rec.submap("schema"))
        for spec in schema.tensors:  # the group's models of it stacked: one torch shape
            if count * math.prod(d or 1 for d in spec.shape) >> 63:
                raise rec.corrupt(f"{count} models of tensor {spec.name!r} are too large to stack")
        shared = None
        if rec.raw.get("shared") is not None:
            shared = SharedTensors.decode(rec.submap("shared"), schema, count)
        return cls(schema, count, blob, decoded, shared=shared)


def split_schema(schema: Schema, shared: list[int]) -> tuple[Schema, Schema]:
    """The record layouts of a group whose tensors at ``shared`` are shared: the other
    tensors, then those, each laid out as a writer lays out records."""
    return (laid_out([schema.tensors[i] for i in unshared(len(schema.tensors), shared)]),
            laid_out([schema.tensors[i] for i in shared]))  # fmt: skip


def unshared(count: int, shared: list[int]) -> list[int]:
    """The indices below ``count`` not in ``shared``: a group's tensors in its records."""
    chosen = set(shared)
    return [i for i in range(count) if i not in chosen]


@dataclass
class UpdateInfo:
    """What an update version records beyond a baseline's (docs/FORMAT.md).

    The version's models are the parent's, less ``removed``, then ``added``, then
    the keys of ``derived``. A model is stored whole (in ``Manifest.groups``;
    ``whole[g]`` names group g's models in order), as a delta (``changed``, in the
    order of the delta blob's tables), or not at all: then it is the parent's. A
    model of ``derived`` is new here and stored as a delta (it is in ``changed``) of
    the parent's model its value names, not of one of its own name.

    A model's tensors come back in its stored order (its schema's where it is stored
    whole here, else its order in the parent version), unless ``orders`` names the
    order the user saved them in: tensors are matched by name, not by position.
    """

    depth: int  # versions back to the baseline
    tolerance: float | None  # None: lossless
    max_chain: int
    removed: list[str]
    added: list[str]
    whole: list[list[str]]
    changed: list[str]
    delta_blob: bytes | None  # content key of the delta tables and model blobs
    stats: dict[str, int]
    orders: dict[str, list[str]] = field(default_factory=dict)  # model -> its tensor names
    model_order: list[str] | None = None  # the version's models as saved, where that differs
    max_recovery: float | None = None  # the keyframe bound it was saved with (None: max_chain only)
    derived: dict[str, str] = field(
        default_factory=dict
    )  # new model -> the parent's it is a delta of

    def encode(self) -> dict[str, Any]:
        return {
            "depth": self.depth, "tolerance": self.tolerance, "max_chain": self.max_chain,
            "removed": self.removed, "added": self.added, "whole": self.whole,
            "changed": self.changed, "delta_blob": self.delta_blob, "stats": self.stats,
            **({"orders": _grouped(self.orders)} if self.orders else {}),
            **({"model_order": self.model_order} if self.model_order is not None else {}),
            **({"max_recovery": self.max_recovery} if self.max_recovery is not None else {}),
            **({"derived": [[k, v] for k, v in self.derived.items()]} if self.derived else {}),
        }  # fmt: skip

    @classmethod
    def decode(cls, rec: Record, groups: list[GroupRecord]) -> UpdateInfo:
        tolerance = rec.raw.get("tolerance")
        if tolerance is not None:
            tolerance = rec.number("tolerance")
        whole = [rec.check_text_list(names, "whole") for names in rec.array("whole")]
        if [len(w) for w in whole] != [g.count for g in groups]:
            raise rec.corrupt("the whole-model name lists do not match the groups")
        for group, names in zip(groups, whole):
            group.names = names
        blob = rec.optional_binary("delta_blob")
        if blob is not None and len(blob) != 32:
            raise rec.corrupt(f"delta blob key of {len(blob)} bytes, not 32")
        changed = rec.text_list("changed")
        if (blob is None) != (not changed):
            raise rec.corrupt("changed models without a delta blob, or the reverse")
        stats = rec.optional_map("stats")
        model_order = None
        if rec.raw.get("model_order") is not None:
            model_order = rec.text_list("model_order")
            if len(set(model_order)) != len(model_order):
                raise rec.corrupt("field 'model_order' names a model twice")
        max_recovery = None
        if rec.raw.get("max_recovery") is not None:
            max_recovery = rec.number("max_recovery")
        orders = decode_orders(rec)
        derived = _decode_derived(rec, changed)
        added = rec.text_list("added")
        if derived.keys() & set(added):
            raise rec.corrupt("a model is both added whole and derived from another")
        return cls(
            depth=rec.integer("depth", minimum=1), tolerance=tolerance,
            max_chain=rec.integer("max_chain", minimum=1), removed=rec.text_list("removed"),
            added=added, whole=whole, changed=changed, delta_blob=blob,
            stats={str(k): rec.check_integer(v, "stats") for k, v in stats.items()},
            orders=orders, model_order=model_order, max_recovery=max_recovery, derived=derived,
        )  # fmt: skip


def _decode_derived(rec: Record, changed: list[str]) -> dict[str, str]:
    """The optional ``derived`` field: [new model, parent's model] pairs, each new model
    one of ``changed`` (stored as a delta), named once."""
    derived: dict[str, str] = {}
    pairs = rec.raw.get("derived") or []
    for pair in pairs if isinstance(pairs, list) else [None]:
        if not isinstance(pair, list) or len(pair) != 2:
            raise rec.corrupt("field 'derived' should hold [model, parent's model] pairs")
        new, source = rec.check_text_list(pair, "derived")
        if new in derived:
            raise rec.corrupt(f"field 'derived' names model {new!r} twice")
        derived[new] = source
    if derived and not derived.keys() <= set(changed):
        raise rec.corrupt("field 'derived' names a model the version does not store as a delta")
    return derived


def decode_orders(rec: Record) -> dict[str, list[str]]:
    """The optional ``orders`` field: [tensor names, model names] pairs, as a map."""
    orders: dict[str, list[str]] = {}
    pairs = rec.raw.get("orders") or []
    for pair in pairs if isinstance(pairs, list) else [None]:
        if not isinstance(pair, list) or len(pair) != 2:
            raise rec.corrupt("field 'orders' should hold [tensor names, model names] pairs")
        order, names = (rec.check_text_list(v, "orders") for v in pair)
        if len(set(order)) != len(order):
            raise rec.corrupt("a tensor order names a tensor twice")
        orders.update(dict.fromkeys(names, order))
    return orders


def _grouped(orders: dict[str, list[str]]) -> list[list[list[str]]]:
    """Tensor orders as [order, [models saved in it]] pairs: a set rebuilt in one order
    costs that order once and each model's name."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, order in orders.items():
        groups.setdefault(tuple(order), []).append(name)
    return [[list(order), names] for order, names in groups.items()]


@dataclass
class ProvenanceInfo:
    """What a provenance version records (docs/FORMAT.md, "Provenance versions").

    The version's models are its parent's, in the parent's order; ``retrained``
    (in that order) are re-created by running ``recipe`` on the parent's models
    and the dataset ``recipe["data"]``; ``hashes_blob`` holds, per retrained
    model, the BLAKE3 over its tensors' BLAKE3 hashes (its *root*).
    """

    recipe: dict[str, Any]  # Recipe.encode(): trainer, data, params, seed, models
    code_hash: str  # the trainer's code hash at save time (hex)
    environment: dict[str, Any]
    retrained: list[str]
    hashes_blob: bytes  # content key of the roots table
    depth: int  # provenance versions back to the nearest stored version
    stats: dict[str, int]

    def encode(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "code_hash": self.code_hash, "environment": self.environment,
                "retrained": self.retrained, "hashes_blob": self.hashes_blob, "depth": self.depth,
                "stats": self.stats}  # fmt: skip

    @classmethod
    def decode(cls, rec: Record) -> ProvenanceInfo:
        raw = rec.submap("recipe")
        models = raw.raw.get("models")
        try:
            recipe = Recipe(trainer=raw.text("trainer"), data=raw.text("data"),
                            params=raw.optional_map("params"), seed=raw.integer("seed"),
                            models=None if models is None else raw.text_list("models"))  # fmt: skip
        except InvalidArgumentError as exc:
            raise rec.corrupt(f"its recipe is not valid ({exc})") from None
        blob = rec.binary("hashes_blob")
        if len(blob) != 32:
            raise rec.corrupt(f"hashes blob key of {len(blob)} bytes, not 32")
        stats = rec.optional_map("stats")
        return cls(
            recipe=recipe.encode(), code_hash=rec.text("code_hash"),
            environment=rec.optional_map("environment"), retrained=rec.text_list("retrained"),
            hashes_blob=blob, depth=rec.integer("depth", minimum=1),
            stats={str(k): rec.check_integer(v, "stats") for k, v in stats.items()},
        )  # fmt: skip


@dataclass
class Manifest:
    id: str
    approach: str
    created: float
    models: list[str]
    groups: list[GroupRecord]
    logical_bytes: int
    stored_bytes: int = 0
    parent: str | None = None
    prev: str | None = None  # head of `ref` when this version was saved onto it
    ref: str | None = None
    message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    update: UpdateInfo | None = None
    provenance: ProvenanceInfo | None = None
    # a baseline's models whose tensors come back in another order than their schema's
    # (written by a rebase to a baseline: the schema stays what versions stored against
    # it were encoded with)
    orders: dict[str, list[str]] = field(default_factory=dict)
    _index: dict[str, tuple[int, int]] | None = field(default=None, repr=False)
    _group_of: dict[str, int] | None = field(default=None, repr=False, compare=False)
    _changed_of: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def num_tensors(self) -> int:
        return sum(g.count * len(g.schema.tensors) for g in self.groups)

    def locate(self, model: str) -> tuple[int, int] | None:
        """(group index, position in group) of a model, or None."""
        if self._index is None:
            index: dict[str, tuple[int, int]] = {}
            for gi, group in enumerate(self.groups):
                for pos, mi in enumerate(group.positions()):
                    index[self.models[mi]] = (gi, pos)
            self._index = index
        return self._index.get(model)

    def encode(self) -> bytes:
        fields: dict[str, Any] = {"update": self.update.encode()} if self.update is not None else {}
        if self.provenance is not None:
            fields = {"provenance": self.provenance.encode()}
        elif self.update is None and self.orders:
            fields = {"orders": _grouped(self.orders)}
        return _pack({
            "format": 3 if self.provenance is not None
            else 6 if any(g.shared is not None for g in self.groups)
            else (4 if self.orders else 1) if self.update is None
            else 5 if self.update.derived
            else 4 if self.update.orders or self.update.model_order is not None else 2,
            **fields,
            "id": self.id,
            "approach": self.approach,
            "created": self.created,
            "parent": self.parent,
            "prev": self.prev,
            "ref": self.ref,
            "message": self.message,
            "models": self.models,
            "groups": [g.encode() for g in self.groups],
            "logical_bytes": self.logical_bytes,
            "stored_bytes": self.stored_bytes,
            "extra": self.extra,
        })  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        rec = _unpack(data, "manifest", MANIFEST_FORMAT)
        vid = rec.raw.get("id")
        if isinstance(vid, str) and vid.isascii() and vid.isalnum() and len(vid) <= 64:
            rec = Record(rec.raw, f"version {vid}: manifest")  # its errors name the version
        models = rec.text_list("models")
        groups = [GroupRecord.decode(g) for g in rec.map_list("groups")]
        update = provenance = None
        orders: dict[str, list[str]] = {}
        if "update" in rec.raw:
            update = UpdateInfo.decode(rec.submap("update"), groups)
        elif "provenance" in rec.raw:
            provenance = ProvenanceInfo.decode(rec.submap("provenance"))
            if groups or models:
                raise rec.corrupt("a provenance version stores no models itself")
        else:
            _check_membership(rec, models, groups)
            orders = decode_orders(rec)
        return cls(
            id=rec.text("id"),
            approach=rec.text("approach"),
            created=rec.number("created"),
            models=models,
            groups=groups,
            logical_bytes=rec.integer("logical_bytes"),
            stored_bytes=rec.integer("stored_bytes"),
            parent=rec.optional_text("parent"),
            prev=rec.optional_text("prev"),
            ref=rec.optional_text("ref"),
            message=rec.optional_text("message"),
            extra=rec.optional_map("extra"),
            update=update,
            provenance=provenance,
            orders=orders,
        )


def _check_membership(rec: Record, models: list[str], groups: list[GroupRecord]) -> None:
    """Every model belongs to exactly one group, at one position."""
    if len(set(models)) != len(models):
        raise rec.corrupt("a model name appears twice")
    if len(groups) == 1 and groups[0].members is None:
        if groups[0].count != len(models):
            raise rec.corrupt(f"one group of {groups[0].count} models for {len(models)} names")
        return
    seen = bytearray(len(models))
    for group in groups:
        if group.members is None:
            raise rec.corrupt("a group without a member list in a set of several groups")
        for mi in group.members:
            if mi >= len(models) or seen[mi]:
                raise rec.corrupt(f"model index {mi} is out of range or in two groups")
            seen[mi] = 1
    if not all(seen):
        raise rec.corrupt("a model belongs to no group")


@dataclass
class ContentRecord:
    """Where one blob's bytes are: its extents and its per-tensor hash table.

    An extent ``[offset, count]`` holds ``count`` consecutive models of the
    blob's group at byte ``offset`` of the pack, ``stride`` bytes apart. A coded blob
    (``compress=True``) has ``chunks`` instead: ``[offset, length, count]``, ``count``
    consecutive models coded into ``length`` bytes at ``offset`` (``codec.records``).
    """

    pack: str
    extents: list[list[int]]
    hashes_offset: int
    hashes_length: int
    refs: int
    table: tuple[int, int] | None = None  # a delta blob's entry table: (offset, length)
    shift: int = 0  # a delta blob moved by compaction: add to the pack offsets its table holds
    chunks: list[list[int]] | None = None  # a coded blob's [offset, length, count], in order

    @property
    def held(self) -> int:
        """How many records (models, rows) the blob holds."""
        if self.chunks is not None:
            return sum(count for *_, count in self.chunks)
        return sum(count for _, count in self.extents)

    def payload_length(self, stride: int) -> int:
        return self.held * stride

    def coded_length(self) -> int:
        """Bytes its chunks take in the pack (0: not coded)."""
        return sum(length for _, length, _ in self.chunks or ())

    def locate(self, position: int) -> tuple[int, int]:
        """(pack offset of the extent, index inside it) of the model at ``position``."""
        for offset, count in self.extents:
            if position < count:
                return offset, position
            position -= count
        raise IndexError(position)

    def chunk_of(self, position: int) -> tuple[int, int]:
        """(index of the chunk, its first record) of the model at ``position``."""
        assert self.chunks is not None
        first = 0
        for i, (_, _, count) in enumerate(self.chunks):
            if position < first + count:
                return i, first
            first += count
        raise IndexError(position)

    def encode(self) -> bytes:
        # a reader of 1 would miss the shift, a reader of 2 the chunks: each refuses
        fmt = 3 if self.chunks is not None else 1 if self.shift == 0 else 2
        return _pack({
            "format": fmt,
            "pack": self.pack,
            "extents": self.extents,
            "hashes": [self.hashes_offset, self.hashes_length],
            "refs": self.refs,
            **({} if self.table is None else {"table": list(self.table)}),
            **({} if self.shift == 0 else {"shift": self.shift}),
            **({} if self.chunks is None else {"chunks": self.chunks}),
        })  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> ContentRecord:
        rec = _unpack(data, "content", CONTENT_FORMAT)
        extents = [list(pair) for pair in rec.integer_pairs("extents")]
        hashes_offset, hashes_length = rec.integer_pair("hashes")
        if hashes_length % 32:
            raise rec.corrupt(f"a hash table of {hashes_length} bytes, not a multiple of 32")
        table = rec.integer_pair("table") if "table" in rec.raw else None
        shift = rec.raw.get("shift", 0)
        if type(shift) is not int or abs(shift) >= 2**63 or (shift and table is None):
            raise rec.corrupt(f"shift {shift!r} is not an int of a delta blob")
        chunks = None
        if "chunks" in rec.raw:
            chunks = []
            for item in rec.array("chunks"):
                if not isinstance(item, list) or len(item) != 3:
                    raise rec.corrupt(f"a chunk {item!r} is not [offset, length, count]")
                chunks.append([rec.check_integer(v, "chunks") for v in item])
            if extents or table is not None:
                raise rec.corrupt("a coded blob (chunks) with extents or a delta table")
        return cls(rec.pack_id("pack"), extents, hashes_offset, hashes_length,
                   rec.integer("refs"), table, shift, chunks)  # fmt: skip


def pack_record(size: int, created: float) -> bytes:
    return _pack({"format": 1, "size": size, "created": created})


def decode_pack_record(data: bytes) -> dict[str, Any]:
    rec = _unpack(data, "pack", 1)
    return {"format": 1, "size": rec.integer("size"), "created": rec.number("created")}


@dataclass
class DatasetRecord:
    """A dataset in the store: named groups of tensors, stored like a model set
    (docs/FORMAT.md, "Datasets"), content-addressed by its id."""

    id: str
    names: list[str]
    groups: list[GroupRecord]
    logical_bytes: int
    stored_bytes: int
    created: float

    def encode(self) -> bytes:
        return _pack({"format": DATASET_FORMAT, "id": self.id, "names": self.names,
                      "groups": [g.encode() for g in self.groups], "logical_bytes": self.logical_bytes,
                      "stored_bytes": self.stored_bytes, "created": self.created})  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> DatasetRecord:
        rec = _unpack(data, "dataset", DATASET_FORMAT)
        names = rec.text_list("names")
        groups = [GroupRecord.decode(g) for g in rec.map_list("groups")]
        if any(g.shared is not None for g in groups):  # (written only for versions)
            raise rec.corrupt("a dataset group has shared tensors")
        _check_membership(rec, names, groups)
        return cls(rec.text("id"), names, groups, rec.integer("logical_bytes"),
                   rec.integer("stored_bytes"), rec.number("created"))  # fmt: skip
