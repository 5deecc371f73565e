"""The catalog: RocksDB (through rocksdict) in raw-bytes mode, one column family
per record kind. Every change is one synced WriteBatch: all or nothing.

Known rocksdict traps, avoided here: values are never pickled (``raw_mode``),
and iterators are frozen at creation, so scans open a fresh one.

RocksDB's own files are bounded: each write-open starts a new info log (``LOG``,
about 90 KB, mostly a dump of the options) and by default keeps every earlier one
as ``LOG.old.*`` (up to 1000), so a store grew by about 100 KB per write-open
(fifteen ``gc`` runs left 3 MB beside 188 KB of packs). Only the current ``LOG``
is kept now, rolled at 1 MiB in a long-lived writer, and the MANIFEST rolls at
1 MiB; the catalog of a small store stays at about 200 KB however often it is opened.
A store that piled up ``LOG.old.*`` files loses them at its next write-open.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions

from ..errors import ReadOnlyStoreError, StoreError, StoreLockedError

COLUMN_FAMILIES = ("manifests", "refs", "content", "packs", "meta", "datasets")
INFO_LOGS_KEPT = 1  # RocksDB's LOG of the current open only: no LOG.old.* piles up
MAX_INFO_LOG_BYTES = 1 << 20  # a writer open for days rolls its LOG (and drops the old one)
MAX_MANIFEST_BYTES = 1 << 20  # the MANIFEST is rewritten compactly past this

Put = tuple[str, bytes, bytes]
Delete = tuple[str, bytes]


def _options() -> Options:
    opt = Options(raw_mode=True)
    opt.create_if_missing(True)
    opt.create_missing_column_families(True)
    opt.set_keep_log_file_num(INFO_LOGS_KEPT)
    opt.set_max_log_file_size(MAX_INFO_LOG_BYTES)
    opt.set_max_manifest_file_size(MAX_MANIFEST_BYTES)
    return opt


class Catalog:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.readonly = readonly
        cfs = {name: Options(raw_mode=True) for name in COLUMN_FAMILIES}
        access = AccessType.read_only() if readonly else AccessType.read_write()
        try:
            self._db = Rdict(str(path), _options(), column_families=cfs, access_type=access)
        except Exception as exc:  # rocksdict raises plain Exception
            text = str(exc)
            if "LOCK" in text or "lock" in text:
                raise StoreLockedError(
                    f"{path.parent} is open for writing in another process; close it there, "
                    "or open this one with mmcore.open(path, readonly=True)"
                ) from exc
            raise StoreError(f"cannot open the catalog at {path}: {text}") from exc
        self._cf = {name: self._db.get_column_family(name) for name in COLUMN_FAMILIES}
        self._handles = {name: self._db.get_column_family_handle(name) for name in COLUMN_FAMILIES}

    def get(self, cf: str, key: bytes) -> bytes | None:
        value = self._cf[cf].get(key)
        return None if value is None else bytes(value)

    def scan(self, cf: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        it = self._cf[cf].iter()
        it.seek(prefix)
        while it.valid():
            key = bytes(it.key())
            if not key.startswith(prefix):
                break
            yield key, bytes(it.value())
            it.next()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """What is read from here to the commit stays as read: one writer holds the
        store's lock, so nothing is to check (``remote.LogCatalog`` checks)."""
        yield

    def refresh(self) -> None:
        """Nothing to catch up with: a writer's catalog is the store's (a read-only
        store reopens its catalog instead: ``LocalStorage.refresh``)."""

    def commit(self, puts: Sequence[Put] = (), deletes: Sequence[Delete] = ()) -> None:
        """Applies every put and delete atomically and durably (synced WAL)."""
        if self.readonly:
            raise ReadOnlyStoreError(
                "this store was opened read-only; reopen it with readonly=False"
            )
        batch = WriteBatch(raw_mode=True)
        for cf, key in deletes:
            batch.delete(key, self._handles[cf])
        for cf, key, value in puts:
            batch.put(key, value, self._handles[cf])
        opts = WriteOptions()
        opts.sync = True
        self._db.write(batch, opts)

    def approximate_bytes(self) -> int:
        """Bytes of the catalog directory on disk: SST, WAL and RocksDB's own files
        (MANIFEST, OPTIONS, the info LOG), everything in it."""
        root = Path(self._db.path())
        total = 0
        for p in root.rglob("*"):
            try:
                if p.is_file():
                    total += p.stat().st_size
            except FileNotFoundError:  # removed by RocksDB while we looked (obsolete files)
                continue
        return total

    def close(self) -> None:
        # Column-family views keep the database (and its LOCK) alive: drop them first.
        self._cf.clear()
        self._handles.clear()
        self._db.close()
        del self._db
