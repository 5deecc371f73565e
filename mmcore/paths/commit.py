"""The catalog records that commit a new version: content records (new, or
existing ones referenced once more), the pack record, the manifest and the ref.
Every save path builds its commit here; ``Catalog.commit`` applies it as one
synced WriteBatch."""

from __future__ import annotations

from ..errors import VersionNotFoundError
from ..manifest import ContentRecord, Manifest, pack_record
from ..record import ref_target
from ..store import Catalog
from ..store.remote import LogCatalog

Put = tuple[str, bytes, bytes]


def content_records(catalog: Catalog | LogCatalog, blobs: list[tuple[bytes, ContentRecord]], pack_id: str,
                    pack_size: int, created: float) -> tuple[list[Put], int, int]:  # fmt: skip
    """The puts of ``blobs`` (a blob stored already gets one more reference instead)
    and of the new pack when any blob lives in it; how many do, and the new bytes."""
    puts: list[Put] = []
    live_in_pack = 0
    for key, rec in blobs:
        existing = catalog.get("content", key)
        if existing is not None:  # identical bytes already stored: reference them
            rec = ContentRecord.decode(existing)
            rec.refs += 1
        else:
            live_in_pack += 1
        puts.append(("content", key, rec.encode()))
    new_bytes = 0
    if live_in_pack:
        puts.append(("packs", pack_id.encode(), pack_record(pack_size, created)))
        new_bytes = pack_size
    return puts, live_in_pack, new_bytes


def version_records(
    catalog: Catalog | LogCatalog,
    manifest: Manifest,
    blobs: list[tuple[bytes, ContentRecord]],
    pack_id: str,
    pack_size: int,
) -> tuple[list[Put], int]:
    """The puts that commit ``manifest`` (its ``stored_bytes`` filled in here) and its
    blobs, and how many blobs live in the new pack (0: every blob was stored already,
    and the new pack can go). ``manifest.prev`` is set from the ref's current head."""
    if manifest.parent is not None and catalog.get("manifests", manifest.parent.encode()) is None:
        raise VersionNotFoundError(
            f"version {manifest.parent}, the parent of this save, was deleted by another "
            "writer while it ran: nothing of the save is visible"
        )
    ref = manifest.ref
    prev = None if ref is None else catalog.get("refs", ref.encode())
    manifest.prev = None if prev is None or ref is None else ref_target(ref, prev)
    puts, live_in_pack, new_bytes = content_records(catalog, blobs, pack_id, pack_size,
                                                    manifest.created)  # fmt: skip
    manifest.stored_bytes = new_bytes + len(manifest.encode())
    puts.append(("manifests", manifest.id.encode(), manifest.encode()))
    if ref is not None:
        puts.append(("refs", ref.encode(), manifest.id.encode()))
    return puts, live_in_pack


def version_blobs(manifest: Manifest) -> list[bytes]:
    """Every blob a version references (one reference each)."""
    blobs = [g.blob for g in manifest.groups]
    if manifest.update is not None and manifest.update.delta_blob is not None:
        blobs.append(manifest.update.delta_blob)
    if manifest.provenance is not None:
        blobs.append(manifest.provenance.hashes_blob)
    return blobs


Delete = tuple[str, bytes]


def swap_references(
    catalog: Catalog | LogCatalog,
    added: list[tuple[bytes, ContentRecord]],
    removed: list[bytes],
    pack_id: str,
    pack_size: int,
    manifest: Manifest,
) -> tuple[list[Put], list[Delete], int]:
    """The records that replace a version's manifest by ``manifest`` (same id): its new
    blobs referenced once more (or created), its old ones once less (deleted at zero),
    the pack recorded when a new blob lives in it. Refs are not touched."""
    records: dict[bytes, ContentRecord] = {}
    live_in_pack = 0
    for key, rec in added:
        existing = catalog.get("content", key)
        if key in records:
            records[key].refs += 1
        elif existing is not None:
            records[key] = ContentRecord.decode(existing)
            records[key].refs += 1
        else:
            records[key] = rec
            live_in_pack += 1
    for key in removed:
        if key not in records:
            raw = catalog.get("content", key)
            if raw is None:
                continue
            records[key] = ContentRecord.decode(raw)
        records[key].refs -= 1
    puts: list[Put] = []
    deletes: list[Delete] = []
    for key, rec in records.items():
        if rec.refs > 0:
            puts.append(("content", key, rec.encode()))
        else:
            deletes.append(("content", key))
    new_bytes = 0
    if live_in_pack:
        puts.append(("packs", pack_id.encode(), pack_record(pack_size, manifest.created)))
        new_bytes = pack_size
    manifest.stored_bytes = new_bytes + len(manifest.encode())
    puts.append(("manifests", manifest.id.encode(), manifest.encode()))
    return puts, deletes, live_in_pack
