"""A store's storage: what the save paths, the readers and the lifecycle verbs talk to.

A ``Storage`` is a catalog (the records: manifests, content, packs, refs, datasets;
``get``, ``scan``, ``transaction`` and one atomic ``commit``) and a payload tier (the
pack bytes: create, read, map, delete), plus what every reader of them shares (the
blob reader with the hash pages it keeps, the manifest and delta-table caches, the
reader thread). It has two implementations:

- ``LocalStorage``: a RocksDB catalog and pack files in a directory (one writer
  process, any number of readers);
- ``ObjectStorage``: a commit log and packs on S3-compatible object storage (any
  number of writers and readers, on any number of machines).

``mmcore.ModelStore`` is the facade over one: argument checks, the verbs, progress.
Layers, lowest first: ``mmcore.store`` (the catalogs and tiers), this module,
``mmcore.paths`` (save paths, recovery, loads), ``mmcore.api``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import _args
from .errors import CorruptRecordError, InvalidArgumentError, VersionNotFoundError
from .manifest import ContentRecord, GroupRecord, Manifest, decode_pack_record
from .paths.reader import BlobReader
from .record import ref_target
from .store import Catalog, LocalPackTier, StoreLayout
from .store.packs import PayloadTier
from .store.remote import LogCatalog, ObjectPackTier, RangeCache, is_url, open_remote

if TYPE_CHECKING:
    from .paths.delta_blob import DeltaTable

GC_GRACE_S = 3600.0  # object storage: gc leaves a pack this young (a save may commit it yet)
_MANIFEST_CACHE = 64  # a chain of updates is walked whole on every load
_HEX = frozenset("0123456789abcdef")


class Records(Protocol):
    """A catalog: ``mmcore.store.Catalog`` (RocksDB) or ``mmcore.store.remote.LogCatalog``
    (a commit log on object storage)."""

    def get(self, cf: str, key: bytes) -> bytes | None: ...
    def scan(self, cf: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def commit(self, puts: Sequence[tuple[str, bytes, bytes]] = (),
               deletes: Sequence[tuple[str, bytes]] = ()) -> None: ...  # fmt: skip
    def refresh(self) -> None: ...
    def approximate_bytes(self) -> int: ...
    def close(self) -> None: ...


class Storage:
    """A catalog and a payload tier, and the caches their readers share."""

    remote = False  # on object storage (any number of writers)
    gc_grace_s = 0.0  # how young a pack gc leaves by default (see ModelStore.gc)

    def __init__(self, catalog: Records, tier: PayloadTier, path: Path | str,
                 readonly: bool) -> None:  # fmt: skip
        self.catalog = catalog
        self.tier = tier
        self.path = path
        self.readonly = readonly
        self.reader = BlobReader(tier, self.content)
        self.manifests: OrderedDict[str, Manifest] = OrderedDict()
        self.delta_tables: dict[tuple[Any, ...], DeltaTable] = {}  # paths.chain.delta_table's
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmcore-reader")
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.shutdown()
            self.tier.close()
            self.catalog.close()

    def refresh(self) -> None:
        """Catches up with the other writers (or, read-only, with the writer): every
        cache dropped (mappings already handed out stay valid)."""
        raise NotImplementedError

    def forget(self) -> None:
        self.manifests.clear()
        self.delta_tables.clear()

    # -- lookups -----------------------------------------------------------
    def content(self, key: bytes) -> ContentRecord:
        raw = self.catalog.get("content", key)
        if raw is None:
            raise CorruptRecordError(
                f"content record {key.hex()[:16]} is missing: the store's catalog is damaged"
            )
        return ContentRecord.decode(raw)

    def stored(self, key: bytes) -> bool:
        """Whether the store holds blob ``key``."""
        return self.catalog.get("content", key) is not None

    def compression(self, groups: Sequence[GroupRecord],
                    memo: dict[bytes, tuple[int, int]] | None = None) -> tuple[int, int]:  # fmt: skip
        """(plain bytes, stored bytes) of the coded blobs (``compress=True``) among
        these groups' blobs, each blob counted once. ``memo`` keeps each blob's pair
        across calls (a caller asking for many versions reads each record once)."""
        memo = {} if memo is None else memo
        seen: set[bytes] = set()
        plain = coded = 0
        for g in groups:
            pairs = [(g.blob, g.record_schema.stride)]
            if g.shared is not None:
                pairs.append((g.shared.blob, g.row_schema.stride))
            for key, stride in pairs:
                if key in seen:
                    continue
                seen.add(key)
                got = memo.get(key)
                if got is None:
                    rec = self.content(key)
                    got = memo[key] = ((rec.payload_length(stride), rec.coded_length())
                                       if rec.chunks is not None else (0, 0))  # fmt: skip
                plain += got[0]
                coded += got[1]
        return plain, coded

    def pack_size(self, pack_id: str) -> int | None:
        """A pack's size from its catalog record (no request to the payload tier)."""
        raw = self.catalog.get("packs", pack_id.encode())
        return None if raw is None else int(decode_pack_record(raw)["size"])

    def resolve(self, version_or_ref: str) -> str:
        """The full version id for an id, a unique id prefix (>= 4 hex digits), or a ref."""
        _args.version(version_or_ref)
        key = version_or_ref.encode()
        if self.catalog.get("manifests", key) is not None:
            return version_or_ref
        head = self.catalog.get("refs", key)
        if head is not None:
            vid = ref_target(version_or_ref, head)
            if self.catalog.get("manifests", vid.encode()) is None:
                raise CorruptRecordError(
                    f"ref {version_or_ref!r} points to version {vid}, which is not in the store: "
                    "the store's catalog is damaged"
                )
            return vid
        if len(version_or_ref) >= 4 and set(version_or_ref) <= _HEX:
            matches = [k.decode() for k, _ in self.catalog.scan("manifests", key)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise VersionNotFoundError(
                    f"version prefix {version_or_ref!r} is ambiguous ({len(matches)} versions); give more digits"
                )
        raise VersionNotFoundError(
            f"no version or ref {version_or_ref!r} in {self.path}; `mmcore log {self.path}` lists them"
        )

    def manifest(self, version_or_ref: str) -> Manifest:
        vid = self.resolve(version_or_ref)
        cached = self.manifests.get(vid)
        if cached is not None:
            self.manifests.move_to_end(vid)
            return cached
        raw = self.catalog.get("manifests", vid.encode())
        if raw is None:
            raise VersionNotFoundError(f"version {vid} vanished while reading it")
        manifest = Manifest.decode(raw)
        self.manifests[vid] = manifest
        if len(self.manifests) > _MANIFEST_CACHE:
            self.manifests.popitem(last=False)
        return manifest

    def refs(self) -> dict[str, str]:
        out = {}
        for k, v in self.catalog.scan("refs"):
            name = k.decode("utf-8", errors="replace")
            out[name] = ref_target(name, v)
        return out


class LocalStorage(Storage):
    """A RocksDB catalog and pack files in directory ``path``."""

    catalog: Catalog

    def __init__(self, path: Path, *, readonly: bool, create: bool) -> None:
        self.layout = StoreLayout(path)
        created = self.layout.check_or_create(create=create and not readonly)
        catalog = Catalog(self.layout.catalog, readonly=readonly)
        if created is not None:
            try:
                self.layout.make_durable(created)
            except BaseException:
                catalog.close()
                raise
        super().__init__(catalog, LocalPackTier(self.layout.packs), path, readonly)

    def refresh(self) -> None:
        """A read-only store catches up with its writer: the catalog reopened, every
        cache and open pack dropped."""
        assert self.readonly
        self.catalog.close()
        try:
            self.catalog = Catalog(self.layout.catalog, readonly=True)
        except BaseException:
            self.closed = True  # no catalog to read: closed, not half-open
            raise
        self.forget()
        self.tier.close()


class ObjectStorage(Storage):
    """A commit log and packs under ``s3://bucket/prefix``."""

    remote = True
    gc_grace_s = GC_GRACE_S
    catalog: LogCatalog

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None, *, readonly: bool,
                 create: bool, cache: Path | None) -> None:  # fmt: skip
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise InvalidArgumentError(
                f"storage_options must be a mapping, got {type(storage_options).__name__}"
            )
        client, catalog = open_remote(
            url, dict(storage_options or {}), readonly=readonly, create=create
        )
        ranges = None if cache is None else RangeCache(cache, client.url)
        tier = ObjectPackTier(client, self.pack_size, ranges)
        super().__init__(catalog, tier, client.url, readonly)

    def refresh(self) -> None:
        """Reads the commits other writers made since."""
        self.catalog.refresh()
        self.forget()


def open_storage(
    path: str | os.PathLike[str],
    *,
    readonly: bool,
    create: bool,
    storage_options: Mapping[str, Any] | None,
    cache: str | os.PathLike[str] | None,
) -> Storage:
    """The storage at ``path``: a directory, or ``s3://bucket/prefix``."""
    if is_url(path):
        where = None if cache is None else Path(_args.path(cache))
        return ObjectStorage(str(path), storage_options, readonly=readonly, create=create,
                             cache=where)  # fmt: skip
    if storage_options is not None or cache is not None:
        raise InvalidArgumentError("storage_options and cache are for s3:// stores only")
    return LocalStorage(Path(_args.path(path)), readonly=readonly, create=create)
