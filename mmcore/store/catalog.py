"""The catalog: RocksDB (through rocksdict) in raw-bytes mode, one column family
per record kind. Every change is one synced WriteBatch: all or nothing.

Known rocksdict traps, avoided here: values are never pickled (``raw_mode``),
and iterators are frozen at creation, so scans open a fresh one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions

from ..errors import ReadOnlyStoreError, StoreError, StoreLockedError

COLUMN_FAMILIES = ("manifests", "refs", "content", "packs", "meta", "datasets")

Put = tuple[str, bytes, bytes]
Delete = tuple[str, bytes]


def _options() -> Options:
    opt = Options(raw_mode=True)
    opt.create_if_missing(True)
    opt.create_missing_column_families(True)
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
        """Bytes of the catalog directory on disk (SST, WAL and metadata files)."""
        root = Path(self._db.path())
        return sum(p.stat().st_size for p in root.iterdir() if p.is_file())

    def close(self) -> None:
        # Column-family views keep the database (and its LOCK) alive: drop them first.
        self._cf.clear()
        self._handles.clear()
        self._db.close()
        del self._db
