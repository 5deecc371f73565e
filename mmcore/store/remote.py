"""A store on S3-compatible object storage: ``mmcore.open("s3://bucket/prefix")``.

Everything lives in the bucket under the prefix, with no second server:

- ``packs/<id>.pack``: pack files, as on a local store, written once (a create-only
  PUT, multipart when large) and read by ranged GETs;
- ``catalog/log/<seq>``: the catalog as a log of commits. Commit ``n`` is one small
  object holding the puts and deletes of one ``Catalog.commit`` (a WriteBatch on a
  local store), created with ``If-None-Match: *``: of two writers racing for ``n``,
  exactly one wins. The loser reads what won, and commits at ``n + 1`` when nothing
  it read or wrote was changed; else it raises ``ConflictError`` (``RefConflictError``
  where both moved one ref), and nothing of it is visible;
- ``catalog/snap/<seq>``: the whole catalog as of commit ``seq``, written every
  ``SNAPSHOT_EVERY`` commits, so an open reads one snapshot and the commits after it.

A process holds the catalog in memory and catches up (one GET of the next commit's
object, a 404 when there is none) at most every ``refresh_s`` seconds, and whenever a
lookup of a version or a ref misses. Reads of payload never touch the catalog objects.
"""

from __future__ import annotations

import mmap
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import msgpack
import torch

from .._native import core
from ..errors import (
    ConflictError,
    CorruptRecordError,
    FormatVersionError,
    IntegrityError,
    InvalidArgumentError,
    NotAStoreError,
    PackMissingError,
    ReadOnlyStoreError,
    RefConflictError,
    RemoteStoreError,
    StoreError,
)
from .catalog import COLUMN_FAMILIES, Delete, Put
from .packs import _HEADER, HEADER_SIZE, PACK_MAGIC, PACK_VERSION, PackWriter, PayloadTier

SCHEME = "s3://"
SNAPSHOT_EVERY = 32  # commits between two snapshots of the whole catalog
RANGE_PART = 16 << 20  # a large read is this many bytes per concurrent ranged GET
PARALLEL_PARTS = 8  # ranged GETs of one read in flight at once
MULTIPART_CHUNK = 16 << 20  # a pack larger than this is uploaded in parts of this size
_LOG = "catalog/log/"
_SNAP = "catalog/snap/"
_PACKS = "packs/"
_MARKER = "mmcore-store"
_MARKER_VALUE = b"mmcore object store\nformat 1\n"
_ENTRY_FORMAT = 1

# storage_options: the S3 settings a user may give (else the AWS_* environment variables)
_CONFIG_KEYS = ("endpoint", "region", "access_key_id", "secret_access_key", "session_token",
                "skip_signature", "virtual_hosted_style_request", "conditional_put")  # fmt: skip
_CLIENT_KEYS = ("allow_http", "timeout_s", "max_retries", "retry_timeout_s")  # read here
_SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")


def is_url(path: object) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/") (prefix "" for none)."""
    rest = url[len(SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not bucket or "//" in f"/{prefix}" or any(c in bucket for c in " \\?#"):
        raise InvalidArgumentError(
            f"an object store is named s3://BUCKET or s3://BUCKET/PREFIX, got {url!r}"
        )
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def _copy(dst: int, src: int, length: int) -> None:
    """``length`` bytes from address ``src`` to ``dst``, natively (the GIL released)."""
    table = torch.tensor([src, length, 0], dtype=torch.int64)
    core().gather(dst, table.data_ptr(), table.data_ptr() + 8, table.data_ptr() + 16, 1, 1)


def _seq_key(base: str, seq: int) -> str:
    return f"{base}{seq:016d}"


class ObjectClient:
    """The few object operations the store needs, over obstore's S3 client (its own
    connection pool and retries of 5xx, resets and timeouts, with backoff). Counts
    requests (``requests``) and keeps credentials out of every message."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            import obstore
            from obstore.store import S3Store as _S3Store
        except ImportError as exc:  # pragma: no cover - the s3 extra is not installed
            raise StoreError(
                "an s3:// store needs the obstore package: pip install 'mmcore-models[s3]'"
            ) from exc
        self._obs: Any = obstore
        self.bucket, self.prefix = parse_url(url)
        self.url = f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")
        options = dict(storage_options or {})
        known = {*_CONFIG_KEYS, *_CLIENT_KEYS}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown storage_options {unknown}; known: {sorted(known)}")
        self._secrets = [str(options[k]) for k in _SECRET_KEYS if options.get(k)]
        config = {k: options[k] for k in _CONFIG_KEYS if k in options}
        client: dict[str, Any] = {"timeout": f"{int(options.get('timeout_s', 60))}s",
                                  "connect_timeout": "5s"}  # fmt: skip
        if "allow_http" in options:
            client["allow_http"] = bool(options["allow_http"])
        elif os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes"):
            client["allow_http"] = True  # (client options given here replace the environment's)
        retry = {
            "max_retries": int(options.get("max_retries", 8)),
            "retry_timeout": timedelta(seconds=float(options.get("retry_timeout_s", 120))),
            "backoff": {
                "init_backoff": timedelta(milliseconds=50),
                "max_backoff": timedelta(seconds=5),
                "base": 2.0,
            },
        }
        self.requests = 0
        self._lock = threading.Lock()
        try:
            s3: Any = _S3Store
            self._store = s3(self.bucket, prefix=self.prefix or None, config=config or None,
                                  client_options=client, retry_config=retry)  # fmt: skip
        except Exception as exc:
            raise RemoteStoreError(f"cannot configure {self.url}: {self._scrub(exc)}") from None

    # -- errors ----------------------------------------------------------
    def _scrub(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text.splitlines()[0] if text else text

    def _fail(self, what: str, key: str, exc: BaseException) -> RemoteStoreError:
        return RemoteStoreError(f"{what} {self.url}/{key} failed: {self._scrub(exc)}")

    def _count(self, n: int = 1) -> None:
        with self._lock:
            self.requests += n

    # -- operations ------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None where there is none."""
        self._count()
        try:
            return bytes(self._obs.get(self._store, key).bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail("GET", key, exc) from None

    def get_ranges(self, key: str, starts: list[int], lengths: list[int]) -> list[Any]:
        """Ranged GETs of one object in one call, concurrent (nearby ranges coalesced);
        buffers of the bytes each range holds."""
        self._count(len(starts))
        try:
            return list(self._obs.get_ranges(self._store, key, starts=starts, lengths=lengths))
        except FileNotFoundError:
            raise
        except Exception as exc:
            if _unsatisfiable(exc):  # one starts past the object's end: each on its own
                return [self.get_range(key, a, n) for a, n in zip(starts, lengths)]
            raise self._fail("ranged GETs of", key, exc) from None

    def get_range(self, key: str, start: int, length: int) -> Any:
        """A ranged GET: a buffer of the bytes the range holds (shorter where the object
        ends first). FileNotFoundError where there is no object."""
        self._count()
        try:
            return self._obs.get_range(self._store, key, start=start, length=length)
        except FileNotFoundError:
            raise
        except Exception as exc:
            if _unsatisfiable(exc):  # the range starts past the object's end: no bytes
                return b""
            raise self._fail("ranged GET of", key, exc) from None

    def put(self, key: str, data: bytes | memoryview | Iterator[bytes], *,
            create: bool = False) -> bool:  # fmt: skip
        """Writes the object: a buffer (in parts where large), or the parts an iterator
        gives while it gives them. With ``create``, only where no object has the key:
        False where one does."""
        self._count()
        try:
            self._obs.put(self._store, key, data, mode="create" if create else "overwrite",
                          chunk_size=MULTIPART_CHUNK, max_concurrency=8)  # fmt: skip
            return True
        except Exception as exc:
            if create and _exists_error(self._obs, exc):
                return False
            raise self._fail("PUT", key, exc) from None

    def head(self, key: str) -> dict[str, Any] | None:
        self._count()
        try:
            return dict(self._obs.head(self._store, key))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail("HEAD", key, exc) from None

    def list(self, prefix: str) -> list[dict[str, Any]]:
        """Every object under ``prefix``: its path (relative to the store), size and
        last_modified."""
        self._count()
        try:
            return [dict(m) for batch in self._obs.list(self._store, prefix=prefix)
                    for m in batch]  # fmt: skip
        except Exception as exc:
            raise self._fail("LIST", prefix, exc) from None

    def delete(self, key: str) -> None:
        self._count()
        try:
            self._obs.delete(self._store, key)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._fail("DELETE", key, exc) from None


def _unsatisfiable(exc: BaseException) -> bool:
    """A 416 reply: the range begins past the end of the object (a truncated pack)."""
    return "416 Range Not Satisfiable" in str(exc)


def _exists_error(obs: Any, exc: BaseException) -> bool:
    return isinstance(exc, (obs.exceptions.AlreadyExistsError, obs.exceptions.PreconditionError))


# -- the catalog ----------------------------------------------------------------------


def _encode_entry(token: str, puts: Sequence[Put], deletes: Sequence[Delete]) -> bytes:
    entry = {
        "format": _ENTRY_FORMAT,
        "token": token,
        "time": time.time(),
        "puts": [list(p) for p in puts],
        "deletes": [list(d) for d in deletes],
    }
    return bytes(msgpack.packb(entry, use_bin_type=True))


def _decode_entry(raw: bytes, what: str) -> tuple[str, list[Any], list[Any]]:
    try:
        entry = msgpack.unpackb(raw, raw=False)
        if entry["format"] != _ENTRY_FORMAT:
            raise CorruptRecordError(f"{what}: format {entry['format']} is not known here")
        puts = [(str(cf), bytes(k), bytes(v)) for cf, k, v in entry["puts"]]
        deletes = [(str(cf), bytes(k)) for cf, k in entry["deletes"]]
        if any(cf not in COLUMN_FAMILIES for cf, *_ in [*puts, *deletes]):
            raise CorruptRecordError(f"{what}: an unknown record kind")
        return str(entry["token"]), puts, deletes
    except CorruptRecordError:
        raise
    except Exception as exc:
        raise CorruptRecordError(f"{what} cannot be decoded ({type(exc).__name__}): the "
                                 "store's catalog is damaged") from None  # fmt: skip


class LogCatalog:
    """``Catalog``'s interface over the commit log in the bucket (see the module's
    docstring). Not thread-safe, like the store that owns it."""

    def __init__(self, client: ObjectClient, *, readonly: bool, refresh_s: float = 1.0) -> None:
        self.readonly = readonly
        self.refresh_s = refresh_s
        self._client = client
        self._data: dict[str, dict[bytes, bytes]] = {cf: {} for cf in COLUMN_FAMILIES}
        self._seq = 0
        self._checked = 0.0
        self._tx: tuple[set[tuple[str, bytes]], set[tuple[str, bytes]]] | None = None
        self._load()

    # -- reading the log ---------------------------------------------------------
    def _load(self) -> None:
        snaps = sorted(int(m["path"].rsplit("/", 1)[1]) for m in self._client.list(_SNAP)
                       if m["path"].rsplit("/", 1)[1].isdigit())  # fmt: skip
        if snaps:
            raw = self._client.get(_seq_key(_SNAP, snaps[-1]))
            if raw is not None:
                what = f"catalog snapshot {snaps[-1]} of {self._client.url}"
                _, puts, _ = _decode_entry(raw, what)
                for cf, key, value in puts:
                    self._data[cf][key] = value
                self._seq = snaps[-1]
        self._catch_up()

    def _catch_up(self) -> set[tuple[str, bytes]]:
        """Applies every commit after the last one applied; returns the keys they wrote,
        and the tokens of the commits (as ("", token)) so a writer finds its own."""
        touched: set[tuple[str, bytes]] = set()
        while True:
            raw = self._client.get(_seq_key(_LOG, self._seq + 1))
            if raw is None:
                break
            token, puts, deletes = _decode_entry(
                raw, f"catalog commit {self._seq + 1} of {self._client.url}"
            )
            self._apply(puts, deletes)
            touched.update((cf, key) for cf, key, _ in puts)
            touched.update(deletes)
            touched.add(("", token.encode()))
            self._seq += 1
        self._checked = time.monotonic()
        return touched

    def _apply(self, puts: Sequence[Put], deletes: Sequence[Delete]) -> None:
        for cf, key in deletes:
            self._data[cf].pop(key, None)
        for cf, key, value in puts:
            self._data[cf][key] = value

    def refresh(self) -> None:
        """Catches up with every commit made so far (not inside a transaction)."""
        if self._tx is None:
            self._catch_up()

    def _maybe_refresh(self) -> None:
        if self._tx is None and time.monotonic() - self._checked >= self.refresh_s:
            self._catch_up()

    @property
    def seq(self) -> int:
        """The last commit applied."""
        return self._seq

    # -- Catalog's interface -------------------------------------------------
    def get(self, cf: str, key: bytes) -> bytes | None:
        self._maybe_refresh()
        if self._tx is not None:
            self._tx[0].add((cf, key))
        value = self._data[cf].get(key)
        if value is None and self._tx is None and cf in ("manifests", "refs"):
            self._catch_up()  # a miss: maybe made since
            value = self._data[cf].get(key)
        return value

    def scan(self, cf: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        self._maybe_refresh()
        if self._tx is not None:
            self._tx[1].add((cf, prefix))
        table = self._data[cf]
        for key in sorted(k for k in table if k.startswith(prefix)):
            value = table.get(key)
            if value is not None:
                yield key, value

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Records what is read from here to the commit (caught up first, and not
        caught up again meanwhile): a commit that finds another writer changed any of
        it raises ``ConflictError``."""
        if self._tx is not None:  # nested: the outer one records
            yield
            return
        self._catch_up()
        self._tx = (set(), set())
        try:
            yield
        finally:
            self._tx = None

    def commit(self, puts: Sequence[Put] = (), deletes: Sequence[Delete] = ()) -> None:
        """Appends one commit (all or nothing) at the next free place of the log."""
        if self.readonly:
            raise ReadOnlyStoreError(
                "this store was opened read-only; reopen it with readonly=False"
            )
        token = secrets.token_hex(16)
        entry = _encode_entry(token, puts, deletes)
        writes = {(cf, key) for cf, key, _ in puts} | set(deletes)
        reads, scans = self._tx if self._tx is not None else (set(), set())
        while True:
            seq = self._seq + 1
            try:
                won = self._client.put(_seq_key(_LOG, seq), entry, create=True)
            except RemoteStoreError:
                # the PUT may have landed before the error: ours if the log holds it
                touched = self._catch_up()
                if ("", token.encode()) in touched:
                    return
                raise
            if won:
                self._apply(puts, deletes)
                self._seq = seq
                if seq % SNAPSHOT_EVERY == 0:
                    self._snapshot()
                return
            touched = self._catch_up()
            if ("", token.encode()) in touched:  # a retried PUT of ours had landed
                return
            self._check_conflict(touched, writes, reads, scans)

    def _check_conflict(self, touched: set[tuple[str, bytes]], writes: set[tuple[str, bytes]],
                        reads: set[tuple[str, bytes]], scans: set[tuple[str, bytes]]) -> None:  # fmt: skip
        refs = sorted(key for cf, key in touched & writes if cf == "refs")
        if refs:
            ref = refs[0].decode()
            raw = self._data["refs"].get(refs[0])
            head = None if raw is None else raw.decode()
            raise RefConflictError(
                f"ref {ref!r} was moved by another writer (to {head}) while this save ran: "
                f"nothing of it is visible; save against {head} to retry",
                ref=ref, head=head,
            )  # fmt: skip
        clash = touched & (writes | reads)
        clash |= {(cf, key) for cf, key in touched
                  if any(cf == c and key.startswith(p) for c, p in scans)}  # fmt: skip
        if clash:
            cf, key = sorted(clash)[0]
            raise ConflictError(
                f"another writer changed the store's {cf} records ({key[:16]!r}) this operation "
                "read or wrote: nothing of it is visible; run it again"
            )

    def _snapshot(self) -> None:
        """The whole catalog as of the last commit, for opens to start from (best
        effort: a failed snapshot only means a longer replay)."""
        puts = [
            (cf, key, value) for cf, table in self._data.items() for key, value in table.items()
        ]
        with suppress(RemoteStoreError):
            self._client.put(_seq_key(_SNAP, self._seq), _encode_entry("", puts, []), create=True)

    def approximate_bytes(self) -> int:
        return sum(int(m["size"]) for m in self._client.list("catalog/"))

    def close(self) -> None:
        self._data = {cf: {} for cf in COLUMN_FAMILIES}


# -- the payload tier --------------------------------------------------------------------


class _Stale(Exception):
    """A write landed in bytes a streamed upload had already sent."""


class _ObjectPackWriter(PackWriter):
    """Spools the pack to a local file (the writers write at offsets), and uploads it
    create-only. A pack that grows past ``2 * MULTIPART_CHUNK`` is streamed while it is
    written: a thread hands the upload every part below the start of the last write
    done (the writers write front to back), so the save's work and the transfer
    overlap. A write that lands in bytes already sent (a writer that went back) stops
    the stream (its multipart upload is never completed) and ``finish`` uploads the
    whole file instead."""

    def __init__(self, tier: ObjectPackTier) -> None:
        self._tier = tier
        self.pack_id = secrets.token_hex(8)
        fd, self._path = tempfile.mkstemp(prefix=f"mmcore-{self.pack_id}-", suffix=".pack",
                                          dir=tier.spool_dir)  # fmt: skip
        self._fd = fd
        header = _HEADER.pack(PACK_MAGIC, PACK_VERSION, HEADER_SIZE, bytes.fromhex(self.pack_id))
        os.pwrite(self._fd, header.ljust(HEADER_SIZE, b"\0"), 0)
        self._size = HEADER_SIZE
        self._cond = threading.Condition()
        self._writing: list[int] = []  # the start of every write in progress
        self._last = HEADER_SIZE  # the start of the furthest write done
        self._sent = 0  # bytes handed to the streamed upload
        self._end: int | None = None  # the pack's size, once finish() began
        self._stale = False
        self._stream: threading.Thread | None = None
        self._streamed: BaseException | bool | None = None  # the stream's put: created?

    # -- writes ----------------------------------------------------------------
    def _begin(self, offset: int) -> None:
        with self._cond:
            if offset < self._sent:
                self._stale = True
                self._cond.notify_all()
            self._writing.append(offset)

    def _done(self, offset: int, end: int) -> None:
        with self._cond:
            self._writing.remove(offset)
            self._last = max(self._last, offset)
            self._size = max(self._size, end)
            self._cond.notify_all()
            start = self._stream is None and not self._stale and self._tier.streaming
            if start and self._final() >= 2 * MULTIPART_CHUNK:
                stream = self._stream = threading.Thread(target=self._upload, daemon=True,
                                                         name="mmcore-upload")  # fmt: skip
            else:
                stream = None
        if stream is not None:
            stream.start()

    def _final(self) -> int:
        """Bytes below this will not change (writes so far went front to back)."""
        return min([self._last, *self._writing])

    def write_ptr(self, address: int, length: int, offset: int) -> None:
        self._begin(offset)
        try:
            core().pwrite(self._fd, address, length, offset)
        finally:
            self._done(offset, offset + length)
        self._tier.bytes_written += length

    def write_segments(self, offset: int, ptrs: Any, lens: Any, dst_offsets: Any,
                       total: int) -> None:  # fmt: skip
        self._begin(offset)
        try:
            core().pwrite_segments(self._fd, offset, ptrs.data_ptr(), lens.data_ptr(),
                                   dst_offsets.data_ptr(), ptrs.numel(), total)  # fmt: skip
        finally:
            self._done(offset, offset + total)
        self._tier.bytes_written += total

    # -- the streamed upload ---------------------------------------------------
    def _parts(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                while True:
                    if self._stale:
                        raise _Stale
                    if self._end is not None:
                        stop = self._end
                        break
                    ready = (self._final() - self._sent) // MULTIPART_CHUNK * MULTIPART_CHUNK
                    if ready:
                        stop = self._sent + ready
                        break
                    self._cond.wait()
                start, self._sent = self._sent, stop  # (a write below ``stop`` is stale now)
            if stop > start:
                data = os.pread(self._fd, stop - start, start)
                yield data + bytes(stop - start - len(data))  # (a gap at the end: zeros)
            if self._end is not None and stop >= self._end:
                return

    def _upload(self) -> None:
        try:
            self._streamed = self._tier.client.put(self._tier.key(self.pack_id), self._parts(),
                                                   create=True)  # fmt: skip
        except BaseException as exc:  # (a stale stream, or the transfer failed)
            self._streamed = exc

    def _stop_stream(self) -> None:
        if self._stream is None:
            return
        with self._cond:
            if self._end is None:
                self._end = self._size
            self._cond.notify_all()
        self._stream.join()

    # -- the end ---------------------------------------------------------------
    def finish(self) -> int:
        try:
            if os.fstat(self._fd).st_size < self._size:  # (an empty write last: zeros to its end)
                os.ftruncate(self._fd, self._size)
            self._stop_stream()
            if self._stream is not None and not self._stale:
                if isinstance(self._streamed, BaseException):
                    raise self._streamed
                created = bool(self._streamed)
            else:  # uploaded from a mapping of the file (from a path, obstore reads slower)
                mapped = mmap.mmap(self._fd, self._size, prot=mmap.PROT_READ)
                view = memoryview(mapped)
                try:
                    key = self._tier.key(self.pack_id)
                    created = self._tier.client.put(key, view, create=True)
                finally:
                    view.release()
                    mapped.close()
            if not created:
                raise StoreError(f"pack {self.pack_id} exists already in {self._tier.client.url}")
        finally:
            os.close(self._fd)
            self._fd = -1
            os.unlink(self._path)
        self._tier.sizes[self.pack_id] = self._size
        return self._size

    def abort(self) -> None:
        with self._cond:
            self._stale = True  # a stream stops, its upload never completed
            self._cond.notify_all()
        if self._stream is not None:
            self._stream.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with suppress(FileNotFoundError):
            os.unlink(self._path)


class RangeCache:
    """A local cache of byte ranges read from packs: packs never change and their ids
    are never reused, so a (pack, offset, length) is the same bytes for ever. Each
    range is a file of its bytes and their BLAKE3 hash, checked on every read: a
    damaged or truncated file is dropped and the range fetched again. Files are
    written whole and renamed into place (readers in other processes never see
    part of one)."""

    def __init__(self, root: Path, location: str) -> None:
        import hashlib

        tag = hashlib.sha256(location.encode()).hexdigest()[:16]
        self.root = root.expanduser() / tag
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, pack_id: str, offset: int, length: int) -> Path:
        return self.root / pack_id / f"{offset}-{length}"

    @staticmethod
    def _digest(address: int, length: int) -> bytes:
        from .. import kernels

        got = kernels.blake3_segments(kernels.int64_table([address]), kernels.int64_table([length]))
        return bytes(got[0].tolist())

    def read_into(self, pack_id: str, offset: int, length: int, address: int) -> bool:
        path = self._path(pack_id, offset, length)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.misses += 1
            return False
        try:
            got = core().pread(fd, address, length, 0)
            tail = os.pread(fd, 33, length)  # its hash, and nothing after it
        finally:
            os.close(fd)
        if got != length or tail != self._digest(address, length):
            with suppress(OSError):
                path.unlink()
            self.misses += 1
            return False
        self.hits += 1
        return True

    def store(self, pack_id: str, offset: int, length: int, address: int) -> None:
        path = self._path(pack_id, offset, length)
        digest = self._digest(address, length)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
            try:
                core().pwrite(fd, address, length, 0)
                os.pwrite(fd, digest, length)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk: reads go on without the cache
            if tmp is not None:
                with suppress(OSError):
                    os.unlink(tmp)

    def drop(self, pack_id: str) -> None:
        import shutil

        shutil.rmtree(self.root / pack_id, ignore_errors=True)


class ObjectPackTier(PayloadTier):
    """Packs as objects ``packs/<id>.pack``, read by ranged GETs (concurrent parts of
    ``RANGE_PART`` bytes for a large read), through a ``RangeCache`` where the store
    was opened with one. Packs never change, so their sizes are remembered (from the
    catalog's pack records where it has them: no HEAD)."""

    local_files = False

    def __init__(self, client: ObjectClient, size_hint: Callable[[str], int | None],
                 cache: RangeCache | None = None) -> None:  # fmt: skip
        super().__init__()
        self.client = client
        self.cache = cache
        self.sizes: dict[str, int] = {}
        self._size_hint = size_hint
        self.spool_dir: str | None = None
        self.streaming = True  # large packs uploaded while written (see _ObjectPackWriter)
        self._parts: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # buffers of map_range(populate=False) still downloading: address -> their parts
        self._pending: dict[int, list[tuple[int, Future[None]]]] = {}

    @staticmethod
    def key(pack_id: str) -> str:
        return f"{_PACKS}{pack_id}.pack"

    def create(self) -> PackWriter:
        return _ObjectPackWriter(self)

    def read_into(self, pack_id: str, offset: int, length: int, address: int) -> None:
        if length <= 0:
            return
        if self.cache is not None and self.cache.read_into(pack_id, offset, length, address):
            return
        self._fetch_into(pack_id, offset, length, address)
        if self.cache is not None:
            self.cache.store(pack_id, offset, length, address)

    def map_range(
        self, pack_id: str, offset: int, length: int, *, populate: bool = True
    ) -> torch.Tensor:
        """A buffer of the range. Without ``populate`` (and without a cache) it comes back
        at once while its parts download; ``populate`` waits for those covering a piece
        (a reader hashes and views what arrived while the rest is on its way)."""
        buf = torch.empty(length, dtype=torch.uint8)
        if populate or self.cache is not None or length <= RANGE_PART:
            self.read_into(pack_id, offset, length, buf.data_ptr())
            return buf
        parts = [(start - offset, self._pool().submit(self._part, pack_id, offset, length,
                                                      buf, start))
                 for start in range(offset, offset + length, RANGE_PART)]  # fmt: skip
        key = buf.data_ptr()
        with self._lock:
            self._pending[key] = parts
        for _, done in parts:  # (the entry goes once every part is in)
            done.add_done_callback(lambda _: self._settled(key))
        self.bytes_read += length
        return buf

    def _settled(self, key: int) -> None:
        with self._lock:
            parts = self._pending.get(key)
            if parts is not None and all(done.done() for _, done in parts):
                del self._pending[key]

    def populate(self, buf: torch.Tensor, start: int, length: int) -> None:
        with self._lock:
            parts = self._pending.get(buf.data_ptr())
        for at, done in parts or ():
            if at < start + length and start < at + RANGE_PART:
                done.result()  # (a part that failed raises here, in the reader)

    def read_many(self, pack_id: str, ranges: list[tuple[int, int, int]]) -> None:
        """The ranges at once: one call of the client, its requests concurrent (one round
        trip of the network, not one per range), none through the cache's files."""
        ranges = [r for r in ranges if r[1] > 0]  # (an empty tensor's record: nothing to read)
        if len(ranges) <= 1 or self.cache is not None or any(n > RANGE_PART for _, n, _ in ranges):
            super().read_many(pack_id, ranges)
            return
        try:
            parts = self.client.get_ranges(self.key(pack_id), [o for o, _, _ in ranges],
                                           [n for _, n, _ in ranges])  # fmt: skip
        except FileNotFoundError:
            raise self._missing(pack_id) from None
        for (offset, length, address), got in zip(ranges, parts):
            with memoryview(got) as view:
                if view.nbytes != length:
                    raise self._truncated(pack_id, offset, length)
            _copy(address, core().buffer_address(got), length)
        self.bytes_read += sum(n for _, n, _ in ranges)

    def _missing(self, pack_id: str) -> PackMissingError:
        return PackMissingError(
            f"pack {pack_id} is missing from {self.client.url}: a writer's gc removed "
            "it (its version was deleted), or the store is damaged"
        )

    def _truncated(self, pack_id: str, offset: int, length: int) -> IntegrityError:
        return IntegrityError(
            f"pack {pack_id} ends before the {length} bytes recorded at offset {offset}; "
            "the pack is truncated"
        )

    def _fetch_into(self, pack_id: str, offset: int, length: int, address: int) -> None:
        """Ranged GETs of ``RANGE_PART`` bytes each, concurrent; each part copied into
        place (natively, the GIL released) as it arrives, while others download."""
        starts = list(range(offset, offset + length, RANGE_PART))
        if len(starts) == 1:
            self._part(pack_id, offset, length, address, offset)
        else:
            for done in [self._pool().submit(self._part, pack_id, offset, length, address, start)
                         for start in starts]:  # fmt: skip
                done.result()
        self.bytes_read += length

    def _part(self, pack_id: str, offset: int, length: int, into: int | torch.Tensor,
              start: int) -> None:  # fmt: skip
        """The part of read (``offset``, ``length``) that begins at ``start``, into the
        memory at address ``into`` (or a buffer, held alive by this call until done)."""
        want = min(RANGE_PART, offset + length - start)
        try:
            got = self.client.get_range(self.key(pack_id), start, want)
        except FileNotFoundError:
            raise self._missing(pack_id) from None
        with memoryview(got) as view:
            if view.nbytes != want:
                raise self._truncated(pack_id, offset, length)
        address = into if isinstance(into, int) else into.data_ptr()
        _copy(address + start - offset, core().buffer_address(got), want)

    def _pool(self) -> ThreadPoolExecutor:
        if self._parts is None:
            self._parts = ThreadPoolExecutor(PARALLEL_PARTS, thread_name_prefix="mmcore-get")
        return self._parts

    def delete(self, pack_id: str) -> None:
        self.sizes.pop(pack_id, None)
        if self.cache is not None:
            self.cache.drop(pack_id)
        self.client.delete(self.key(pack_id))

    def list(self) -> list[str]:
        return sorted(self.ages())

    def ages(self) -> dict[str, float]:
        """Every pack and the seconds since it was written."""
        now = time.time()
        out = {}
        for m in self.client.list(_PACKS):
            name = m["path"].rsplit("/", 1)[1]
            if name.endswith(".pack"):
                out[name[: -len(".pack")]] = now - m["last_modified"].timestamp()
        return out

    def size(self, pack_id: str) -> int:
        got = self.sizes.get(pack_id)
        if got is None:
            got = self._size_hint(pack_id)
        if got is None:
            meta = self.client.head(self.key(pack_id))
            if meta is None:
                raise StoreError(f"pack {pack_id} is missing")
            got = int(meta["size"])
        self.sizes[pack_id] = got
        return got

    def total_bytes(self) -> int:
        return sum(int(m["size"]) for m in self.client.list(_PACKS))

    def close(self) -> None:
        if self._parts is not None:
            self._parts.shutdown()
            self._parts = None


def open_remote(url: str, storage_options: dict[str, Any] | None, *, readonly: bool,
                create: bool) -> tuple[ObjectClient, LogCatalog]:  # fmt: skip
    """The client and catalog of the store at ``url``: created (its marker object)
    where there is none and ``create``; refused where the prefix holds something else."""
    client = ObjectClient(url, storage_options)
    marker = client.get(_MARKER)
    if marker is None:
        if not create:
            raise NotAStoreError(f"{client.url} holds no mmcore store (open it with create=True)")
        if client.list("")[:1]:
            raise NotAStoreError(
                f"{client.url} holds other objects and no mmcore store; give an empty prefix"
            )
        client.put(_MARKER, _MARKER_VALUE, create=True)  # (another opener may have made it)
    elif marker != _MARKER_VALUE:
        raise FormatVersionError(f"{client.url}: its store marker is not one this mmcore knows")
    if not readonly and client.put(_MARKER, _MARKER_VALUE, create=True):
        # (the same bytes: overwriting the marker harms nothing, but commits would be lost)
        raise StoreError(
            f"{client.url}: the server ignores If-None-Match on PUT (it overwrote an existing "
            "object), so two writers could overwrite each other's commits; open the store "
            "read-only, or use a server with conditional writes (see the README)"
        )
    return client, LogCatalog(client, readonly=readonly)
