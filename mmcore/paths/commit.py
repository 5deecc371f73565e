"""The catalog records that commit a new version: content records (new, or
existing ones referenced once more), the pack record, the manifest and the ref.
Every save path builds its commit here; ``Catalog.commit`` applies it as one
synced WriteBatch."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import ConflictError, RefConflictError, VersionNotFoundError
from ..manifest import ContentRecord, Manifest, pack_record
from ..record import ref_target

if TYPE_CHECKING:
    from ..storage import Records, Storage

COMMIT_ATTEMPTS = 8  # a save's commit, built again after another writer's commit

Put = tuple[str, bytes, bytes]


Blobs = list[tuple[bytes, ContentRecord | None]]  # None: a blob the writer found stored


def _referenced(catalog: Records, key: bytes, rec: ContentRecord | None,
                records: dict[bytes, ContentRecord]) -> bool:  # fmt: skip
    """Adds one reference to blob ``key`` in ``records`` (read from the catalog, or
    ``rec`` where the catalog has none); True where ``rec`` is new."""
    if key in records:  # referenced twice by one version (two groups' equal rows)
        records[key].refs += 1
        return False
    existing = catalog.get("content", key)
    if existing is not None:  # identical bytes already stored: reference them
        records[key] = ContentRecord.decode(existing)
        records[key].refs += 1
        return False
    if rec is None:
        raise ConflictError(
            f"blob {key.hex()[:16]}, which this save found stored and did not write again, "
            "was deleted meanwhile (a gc or delete in another process): save again"
        )
    records[key] = replace(rec)  # (a copy: a commit built again starts from the writer's)
    return True


def content_records(catalog: Records, blobs: Blobs, pack_id: str,
                    pack_size: int, created: float) -> tuple[list[Put], int, int]:  # fmt: skip
    """The puts of ``blobs`` (a blob stored already gets one more reference instead)
    and of the new pack when any blob lives in it; how many do, and the new bytes."""
    records: dict[bytes, ContentRecord] = {}
    live_in_pack = sum(_referenced(catalog, key, rec, records) for key, rec in blobs)
    puts: list[Put] = [("content", key, rec.encode()) for key, rec in records.items()]
    new_bytes = 0
    if live_in_pack:
        puts.append(("packs", pack_id.encode(), pack_record(pack_size, created)))
        new_bytes = pack_size
    return puts, live_in_pack, new_bytes


def version_records(
    catalog: Records,
    manifest: Manifest,
    blobs: Blobs,
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


def commit_version(store: Storage, manifest: Manifest, blobs: Blobs,
                   pack_id: str, pack_size: int) -> None:  # fmt: skip
    """Commits a saved version whose pack is written. On object storage, a commit
    whose records another writer changed meanwhile (a shared blob's reference
    count, say) is built again from the records as they are now, a few times; a
    ref another writer moved raises ``RefConflictError`` (and the pack goes)."""
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            with store.catalog.transaction():
                puts, live_in_pack = version_records(store.catalog, manifest, blobs, pack_id,
                                                     pack_size)  # fmt: skip
                # From here on the pack stays whatever happens: a commit that raised
                # (an interrupt arriving after the write, a failed WAL sync, a lost
                # response) may still be durable and reference it. An unreferenced
                # pack is reclaimed by gc().
                store.catalog.commit(puts)
            break
        except (RefConflictError, VersionNotFoundError):  # nothing references the pack
            store.tier.delete(pack_id)
            raise
        except ConflictError:
            if attempt == COMMIT_ATTEMPTS - 1:
                store.tier.delete(pack_id)
                raise
    if not live_in_pack:  # every blob was already stored: the new pack holds nothing
        store.tier.delete(pack_id)


def version_blobs(manifest: Manifest) -> list[bytes]:
    """Every blob a version references (one reference each)."""
    blobs = [key for g in manifest.groups for key in g.blobs()]
    if manifest.update is not None and manifest.update.delta_blob is not None:
        blobs.append(manifest.update.delta_blob)
    if manifest.provenance is not None:
        blobs.append(manifest.provenance.hashes_blob)
    return blobs


Delete = tuple[str, bytes]


def swap_references(
    catalog: Records,
    added: Blobs,
    removed: list[bytes],
    pack_id: str,
    pack_size: int,
    manifest: Manifest,
) -> tuple[list[Put], list[Delete], int]:
    """The records that replace a version's manifest by ``manifest`` (same id): its new
    blobs referenced once more (or created), its old ones once less (deleted at zero),
    the pack recorded when a new blob lives in it. Refs are not touched."""
    records: dict[bytes, ContentRecord] = {}
    live_in_pack = sum(_referenced(catalog, key, rec, records) for key, rec in added)
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
