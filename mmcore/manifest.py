"""Version manifests and content records: msgpack maps with a format number.

Decoding checks the format number first, so a record written by a newer mmcore
fails with FormatVersionError instead of being misread. See docs/FORMAT.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import CorruptRecordError, FormatVersionError
from .modelset import Schema
from .record import DAMAGED, Record

MANIFEST_FORMAT = 1
CONTENT_FORMAT = 1
APPROACHES = ("baseline",)


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
class GroupRecord:
    """Models of one schema, stored model after model in one blob."""

    schema: Schema
    count: int
    blob: bytes  # content key of the blob (see ContentRecord)
    members: list[int] | None = None  # indices into Manifest.models; None: all, in order

    def positions(self) -> list[int]:
        return list(range(self.count)) if self.members is None else self.members

    def encode(self) -> dict[str, Any]:
        members = None
        if self.members is not None:
            members = struct.pack(f"<{len(self.members)}I", *self.members)
        return {
            "schema": self.schema.encode(),
            "count": self.count,
            "blob": self.blob,
            "members": members,
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
        return cls(Schema.decode(rec.submap("schema")), count, blob, decoded)


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
    _index: dict[str, tuple[int, int]] | None = field(default=None, repr=False)

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
        return _pack({
            "format": MANIFEST_FORMAT,
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
        models = rec.text_list("models")
        groups = [GroupRecord.decode(g) for g in rec.map_list("groups")]
        _check_membership(rec, models, groups)
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
    blob's group at byte ``offset`` of the pack, ``stride`` bytes apart.
    """

    pack: str
    extents: list[list[int]]
    hashes_offset: int
    hashes_length: int
    refs: int

    def payload_length(self, stride: int) -> int:
        return sum(count for _, count in self.extents) * stride

    def locate(self, position: int) -> tuple[int, int]:
        """(pack offset of the extent, index inside it) of the model at ``position``."""
        for offset, count in self.extents:
            if position < count:
                return offset, position
            position -= count
        raise IndexError(position)

    def encode(self) -> bytes:
        return _pack({
            "format": CONTENT_FORMAT,
            "pack": self.pack,
            "extents": self.extents,
            "hashes": [self.hashes_offset, self.hashes_length],
            "refs": self.refs,
        })  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> ContentRecord:
        rec = _unpack(data, "content", CONTENT_FORMAT)
        extents = [list(pair) for pair in rec.integer_pairs("extents")]
        hashes_offset, hashes_length = rec.integer_pair("hashes")
        if hashes_length % 32:
            raise rec.corrupt(f"a hash table of {hashes_length} bytes, not a multiple of 32")
        return cls(rec.pack_id("pack"), extents, hashes_offset, hashes_length, rec.integer("refs"))


def pack_record(size: int, created: float) -> bytes:
    return _pack({"format": 1, "size": size, "created": created})


def decode_pack_record(data: bytes) -> dict[str, Any]:
    rec = _unpack(data, "pack", 1)
    return {"format": 1, "size": rec.integer("size"), "created": rec.number("created")}
