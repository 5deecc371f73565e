"""``push``/``pull``: versions copied from one store to another (local or s3://, either
way), content-addressed: a blob the destination holds already (the same key) is
referenced once more, and only the others travel, copied range by range into one new
pack of the destination (laid out as compaction lays out a pack: ``store.compact``).
Then ONE commit adds their content records, the versions, the datasets their
provenance versions use, and the ref; before it nothing of the copy is visible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._progress import progress_bar
from .errors import ConflictError, StoreError, VersionNotFoundError
from .manifest import ContentRecord, DatasetRecord, Manifest, pack_record
from .paths.commit import version_blobs
from .store import compact

if TYPE_CHECKING:
    from .storage import Storage


@dataclass
class TransferReport:
    """What a push or pull did."""

    versions: int  # versions copied (those the destination had already are not counted)
    datasets: int
    blobs_copied: int
    blobs_shared: int  # held by the destination already: referenced, not copied
    bytes_copied: int  # payload bytes read from the source and written to the destination
    ref: str | None
    head: str | None  # the version ``ref`` points at now, in both stores


def _needed(src: Storage, ref: str | None) -> list[Manifest]:
    """The versions to copy, parents first: every version, or the one ``ref`` names and
    every version it is stored against."""
    if ref is None:
        out = [Manifest.decode(raw) for _, raw in src.catalog.scan("manifests")]
        by_id = {m.id: m for m in out}
        order: list[Manifest] = []
        seen: set[str] = set()
        for m in out:  # each version after its parents (a loop: chains may be long)
            line: list[Manifest] = []
            at: Manifest | None = m
            while at is not None and at.id not in seen:
                seen.add(at.id)
                line.append(at)
                at = by_id.get(at.parent) if at.parent is not None else None
            order += line[::-1]
        return order
    chain = [src.manifest(ref)]
    while chain[-1].parent is not None:
        chain.append(src.manifest(chain[-1].parent))
    return chain[::-1]


def transfer(src: Storage, dst: Storage, ref: str | None = None, *,
             progress: bool | None = None) -> TransferReport:  # fmt: skip
    """Copies into ``dst`` the versions of ``src`` it lacks (all, or those ``ref``
    needs) and moves ``ref`` there to the same version (every ref without one)."""
    head = None if ref is None else src.resolve(ref)
    wanted = _needed(src, ref)
    with dst.catalog.transaction():
        todo = [m for m in wanted if dst.catalog.get("manifests", m.id.encode()) is None]
        datasets: dict[str, DatasetRecord] = {}
        for m in todo:
            if m.provenance is not None:
                did = str(m.provenance.recipe["data"])
                if did not in datasets and dst.catalog.get("datasets", did.encode()) is None:
                    raw = src.catalog.get("datasets", did.encode())
                    if raw is None:
                        raise VersionNotFoundError(f"dataset {did} of version {m.id} is missing")
                    datasets[did] = DatasetRecord.decode(raw)
        uses: dict[bytes, int] = {}  # blob -> references the copy adds
        for m in todo:
            for blob in version_blobs(m):
                uses[blob] = uses.get(blob, 0) + 1
        for ds in datasets.values():
            for g in ds.groups:
                uses[g.blob] = uses.get(g.blob, 0) + 1
        shared: dict[bytes, ContentRecord] = {}
        missing: list[bytes] = []
        for blob in uses:
            raw = dst.catalog.get("content", blob)
            if raw is None:
                missing.append(blob)
            else:
                shared[blob] = ContentRecord.decode(raw)
        moved, pack_id, pack_size, copied = _copy_blobs(src, dst, todo, datasets, missing,
                                                        progress)  # fmt: skip
        puts = []
        for blob, old in shared.items():
            old.refs += uses[blob]
            puts.append(("content", blob, old.encode()))
        for blob, new in moved.items():
            new.refs = uses[blob]
            puts.append(("content", blob, new.encode()))
        if moved:
            puts.append(("packs", pack_id.encode(), pack_record(pack_size, time.time())))
        puts += [("manifests", m.id.encode(), m.encode()) for m in todo]
        puts += [("datasets", did.encode(), ds.encode()) for did, ds in datasets.items()]
        refs = {ref: head} if ref is not None else src.refs()
        puts += [("refs", name.encode(), vid.encode()) for name, vid in refs.items()
                 if vid is not None]  # fmt: skip
        try:
            dst.catalog.commit(puts)
        except ConflictError:  # (another writer changed these records: nothing went in)
            if moved:
                dst.tier.delete(pack_id)
            raise
    return TransferReport(len(todo), len(datasets), len(moved), len(shared), copied, ref, head)


def _copy_blobs(src: Storage, dst: Storage, versions: list[Manifest],
                datasets: dict[str, DatasetRecord], missing: list[bytes],
                progress: bool | None) -> tuple[dict[bytes, ContentRecord], str, int, int]:  # fmt: skip
    """The ``missing`` blobs' bytes copied from ``src``'s packs into one new pack of
    ``dst``: their relocated records, the pack's id and size, and the bytes copied."""
    if not missing:
        return {}, "", 0, 0
    kinds = compact.blob_kinds(versions, datasets.values())
    items = []
    for key in missing:
        item = compact.live_item(src, key, src.content(key), kinds)
        if item is None:
            raise StoreError(f"blob {key.hex()[:16]} of {src.path} is of no kind a copy knows")
        items.append(item)
    placed, _ = compact.layout(items)
    total = sum(length for item in items for _, length in item.ranges)
    writer = dst.tier.create()
    records: dict[bytes, ContentRecord] = {}
    try:
        copies = []
        for item, targets in placed:
            copies += [(to, item.rec.pack, offset, length)
                       for (offset, length), to in zip(item.ranges, targets) if length]  # fmt: skip
            moved = {offset: to for (offset, _), to in zip(item.ranges, targets)}
            records[item.key] = compact.relocated(item, moved, writer.pack_id)
        with progress_bar(total, "copying blobs", progress, unit="B", min_total=64 << 20) as bar:
            for to, pack, offset, length in sorted(copies):
                compact.copy_range(src, pack, offset, length, writer, to)
                bar(length)
        size = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return records, writer.pack_id, size, total
