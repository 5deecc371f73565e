"""Version manifests and content records: msgpack maps with a format number.

Decoding checks the format number first, so a record written by a newer mmcore
fails with FormatVersionError instead of being misread. See docs/FORMAT.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import FormatVersionError, StoreError
from .modelset import Schema

MANIFEST_FORMAT = 1
CONTENT_FORMAT = 1
APPROACHES = ("baseline",)


def _pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def _unpack(data: bytes, what: str, newest: int) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise StoreError(f"{what} record is not valid msgpack: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("format"), int):
        raise StoreError(f"{what} record has no format number")
    if obj["format"] > newest:
        raise FormatVersionError(
            f"{what} record has format {obj['format']}, newer than this mmcore reads "
            f"({newest}); upgrade mmcore"
        )
    return obj


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
    def decode(cls, raw: dict[str, Any]) -> GroupRecord:
        members = raw.get("members")
        decoded = (
            None if members is None else list(struct.unpack(f"<{len(members) // 4}I", members))
        )
        return cls(Schema.decode(raw["schema"]), int(raw["count"]), bytes(raw["blob"]), decoded)


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
        raw = _unpack(data, "manifest", MANIFEST_FORMAT)
        return cls(
            id=raw["id"],
            approach=raw["approach"],
            created=float(raw["created"]),
            models=list(raw["models"]),
            groups=[GroupRecord.decode(g) for g in raw["groups"]],
            logical_bytes=int(raw["logical_bytes"]),
            stored_bytes=int(raw["stored_bytes"]),
            parent=raw.get("parent"),
            prev=raw.get("prev"),
            ref=raw.get("ref"),
            message=raw.get("message"),
            extra=dict(raw.get("extra") or {}),
        )


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
        raw = _unpack(data, "content", CONTENT_FORMAT)
        ho, hl = raw["hashes"]
        extents = [[int(o), int(c)] for o, c in raw["extents"]]
        return cls(raw["pack"], extents, int(ho), int(hl), int(raw["refs"]))


def pack_record(size: int, created: float) -> bytes:
    return _pack({"format": 1, "size": size, "created": created})


def decode_pack_record(data: bytes) -> dict[str, Any]:
    return _unpack(data, "pack", 1)
