"""The catalog records that commit a new version: content records (new, or
existing ones referenced once more), the pack record, the manifest and the ref.
Every save path builds its commit here; ``Catalog.commit`` applies it as one
synced WriteBatch."""

from __future__ import annotations

import time

from ..manifest import ContentRecord, Manifest, pack_record
from ..record import ref_target
from ..store import Catalog
from .baseline import WrittenSet

Put = tuple[str, bytes, bytes]


def version_records(
    catalog: Catalog,
    vid: str,
    approach: str,
    parent: str | None,
    ref: str | None,
    message: str | None,
    written: WrittenSet,
    pack_id: str,
    pack_size: int,
) -> tuple[list[Put], int]:
    """The puts of a new version, and how many of its blobs live in the new pack
    (0: every blob was stored already, and the new pack can go)."""
    prev = None if ref is None else catalog.get("refs", ref.encode())
    puts: list[Put] = []
    live_in_pack = 0
    for key, rec in written.blobs:
        existing = catalog.get("content", key)
        if existing is not None:  # identical bytes already stored: reference them
            rec = ContentRecord.decode(existing)
            rec.refs += 1
        else:
            live_in_pack += 1
        puts.append(("content", key, rec.encode()))
    now = time.time()
    manifest = Manifest(
        id=vid, approach=approach, created=now, models=written.names, groups=written.groups,
        logical_bytes=written.logical_bytes, parent=parent,
        prev=None if prev is None else ref_target(str(ref), prev), ref=ref, message=message,
    )  # fmt: skip
    new_bytes = 0
    if live_in_pack:
        puts.append(("packs", pack_id.encode(), pack_record(pack_size, now)))
        new_bytes = pack_size
    manifest.stored_bytes = new_bytes + len(manifest.encode())
    puts.append(("manifests", vid.encode(), manifest.encode()))
    if ref is not None:
        puts.append(("refs", ref.encode(), vid.encode()))
    return puts, live_in_pack
