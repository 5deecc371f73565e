"""The payload tier: where the bytes of tensors live.

``PayloadTier`` is the interface a second tier (an S3-compatible object store)
will implement; ``LocalPackTier`` keeps append-only pack files in one directory.
A pack is written once, synced, and only then referenced by a catalog commit.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import secrets
import struct
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from .._native import core
from ..errors import IntegrityError, PackMissingError, StoreError
from .layout import fsync_dir

PACK_MAGIC = b"MMCPACK\x00"
PACK_VERSION = 1
HEADER_SIZE = 64
SECTION_ALIGN = 4096
_HEADER = struct.Struct("<8sII16s")  # magic, version, header size, pack id


def align_up(value: int, alignment: int = SECTION_ALIGN) -> int:
    return -(-value // alignment) * alignment


class PackWriter(ABC):
    pack_id: str

    @abstractmethod
    def write_ptr(self, address: int, length: int, offset: int) -> None:
        """Writes ``length`` bytes from memory at ``address`` to ``offset`` in the pack."""

    def write_segments(
        self,
        offset: int,
        ptrs: torch.Tensor,
        lens: torch.Tensor,
        dst_offsets: torch.Tensor,
        total: int,
    ) -> None:
        """Writes segment i (address ptrs[i], lens[i] bytes) at offset + dst_offsets[i];
        everything else in [offset, offset + total) becomes zeros."""
        buf = torch.zeros(total, dtype=torch.uint8)
        from .. import kernels

        kernels.gather(buf, ptrs, lens, dst_offsets, threads=1)
        self.write_ptr(buf.data_ptr(), total, offset)

    @abstractmethod
    def finish(self) -> int:
        """Makes the pack durable and returns its size; only then may a commit reference it."""

    @abstractmethod
    def abort(self) -> None:
        """Discards a pack that will never be committed."""


class PayloadTier(ABC):
    """Where payload bytes live. Capabilities: ``local_files`` (memory-mappable paths)."""

    local_files: bool = False

    def __init__(self) -> None:
        self.bytes_read = 0
        self.bytes_written = 0

    @abstractmethod
    def create(self) -> PackWriter: ...

    @abstractmethod
    def read_into(self, pack_id: str, offset: int, length: int, address: int) -> None:
        """Reads exactly ``length`` bytes at ``offset`` into memory at ``address``."""

    def populate(self, buf: torch.Tensor, start: int, length: int) -> None:
        """Brings bytes [start, start + length) of a buffer from ``map_range(...,
        populate=False)`` in: pages of a mapped pack faulted in (``populate_range``), or,
        for a tier that reads over a network, the parts of the read covering them awaited."""
        populate_range(buf, start, length)

    def read_many(self, pack_id: str, ranges: list[tuple[int, int, int]]) -> None:
        """``read_into`` of each (offset, length, address) of ``ranges``; a tier whose
        reads wait on a network runs them at once."""
        for offset, length, address in ranges:
            self.read_into(pack_id, offset, length, address)

    def map_range(
        self, pack_id: str, offset: int, length: int, *, populate: bool = True
    ) -> torch.Tensor:
        """A writable (copy-on-write where possible) uint8 CPU tensor of the range.

        The default reads into fresh memory; tiers with local files map them instead,
        with every page faulted in unless ``populate`` is False (then
        ``populate_range`` brings pieces in, or pages fault in on first touch).
        """
        buf = torch.empty(length, dtype=torch.uint8)
        self.read_into(pack_id, offset, length, buf.data_ptr())
        return buf

    @abstractmethod
    def delete(self, pack_id: str) -> None: ...

    @abstractmethod
    def list(self) -> list[str]: ...

    @abstractmethod
    def size(self, pack_id: str) -> int: ...

    def ages(self) -> dict[str, float]:
        """Every pack and the seconds since it was written, for gc's grace period. A
        tier only this store's one writer writes to has no save in flight elsewhere:
        every pack counts as old."""
        return dict.fromkeys(self.list(), math.inf)

    def total_bytes(self) -> int:
        """The bytes of every pack."""
        return sum(self.size(p) for p in self.list())

    @abstractmethod
    def close(self) -> None:
        """Drops what the tier holds open (files, connections)."""


# Smaller ranges are read, not mapped: Python's mmap holds a duplicate file
# descriptor per mapping, so a set of thousands of small groups (one small extent
# each) would otherwise run out of descriptors ("Too many open files").
MIN_MAP_BYTES = 1 << 20

# Linux >= 5.14: fault every page in for reading (page-cache pages are mapped,
# not copied; a later write copies just that page). MAP_POPULATE would instead
# copy every page of a private writable mapping.
_MADV_POPULATE_READ = 22


def _populate_read(mapped: mmap.mmap) -> None:
    try:
        mapped.madvise(_MADV_POPULATE_READ)
    except OSError:  # older kernel: read ahead instead, pages fault in on first touch
        mapped.madvise(mmap.MADV_WILLNEED)


def populate_range(buf: torch.Tensor, start: int, length: int) -> None:
    """Faults in bytes [start, start + length) of a tensor from ``map_range`` (pages of
    a mapped pack come from the page cache or the disk; memory that was read already
    is resident and this costs a system call). Whole pages around the range."""
    page = mmap.PAGESIZE
    lo = (buf.data_ptr() + start) // page * page
    hi = buf.data_ptr() + start + length
    if hi <= lo:
        return
    libc = _libc()
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_POPULATE_READ) != 0:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_WILLNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class _Syncer:
    """A thread that fdatasyncs a file whenever new bytes were written to it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._wake = threading.Event()
        self._stopping = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="mmcore-sync", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:  # reported by stop(); the final fsync fails too
                self.error = exc
                return

    def stop(self, *, check: bool = True) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        if check and self.error is not None:
            raise self.error


class _LocalPackWriter(PackWriter):
    def __init__(self, tier: LocalPackTier) -> None:
        self._tier = tier
        self.pack_id = secrets.token_hex(8)
        self.path = tier.path_of(self.pack_id)
        self._fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        header = _HEADER.pack(PACK_MAGIC, PACK_VERSION, HEADER_SIZE, bytes.fromhex(self.pack_id))
        os.pwrite(self._fd, header.ljust(HEADER_SIZE, b"\0"), 0)
        self._size = HEADER_SIZE
        self._syncer = _Syncer(self._fd)

    def _flush_behind(self, native: Any, offset: int, length: int) -> None:
        """Starts write-back of this range and wakes the syncer thread.

        The syncer makes what is written durable (fdatasync) while the caller
        prepares later batches, so the final fsync finds little left to do.
        Measured on a 200 MB set: the final fsync drops from ~0.2 s to a few ms,
        and the device's flushes overlap the caller's work.
        """
        native.start_writeback(self._fd, offset, length)
        self._syncer.kick()

    def write_ptr(self, address: int, length: int, offset: int) -> None:
        native = core()
        native.pwrite(self._fd, address, length, offset)
        self._flush_behind(native, offset, length)
        self._size = max(self._size, offset + length)
        self._tier.bytes_written += length

    def write_segments(
        self,
        offset: int,
        ptrs: torch.Tensor,
        lens: torch.Tensor,
        dst_offsets: torch.Tensor,
        total: int,
    ) -> None:
        native = core()
        native.pwrite_segments(
            self._fd,
            offset,
            ptrs.data_ptr(),
            lens.data_ptr(),
            dst_offsets.data_ptr(),
            ptrs.numel(),
            total,
        )
        self._flush_behind(native, offset, total)
        self._size = max(self._size, offset + total)
        self._tier.bytes_written += total

    def finish(self) -> int:
        self._syncer.stop()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        fsync_dir(self.path.parent)
        return self._size

    def abort(self) -> None:
        self._syncer.stop(check=False)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


class LocalPackTier(PayloadTier):
    local_files = True

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def path_of(self, pack_id: str) -> Path:
        return self.directory / f"{pack_id}.pack"

    def create(self) -> PackWriter:
        return _LocalPackWriter(self)

    def _fd(self, pack_id: str) -> int:
        with self._lock:
            fd = self._fds.get(pack_id)
            if fd is None:
                try:
                    fd = os.open(self.path_of(pack_id), os.O_RDONLY)
                except FileNotFoundError:
                    raise PackMissingError(
                        f"pack {pack_id} is missing from {self.directory}; the store is damaged"
                    ) from None
                self._fds[pack_id] = fd
            return fd

    def read_into(self, pack_id: str, offset: int, length: int, address: int) -> None:
        got = core().pread(self._fd(pack_id), address, length, offset)
        self.bytes_read += got
        if got != length:
            raise IntegrityError(
                f"pack {pack_id} ends at byte {offset + got}, before the {length} bytes recorded "
                f"at offset {offset}; the pack is truncated"
            )

    def map_range(
        self, pack_id: str, offset: int, length: int, *, populate: bool = True
    ) -> torch.Tensor:
        """Maps the range privately (copy-on-write) and pre-faults it (``populate``).

        Writes to the tensor never reach the pack. The mapping lives as long as
        the tensor (or any view of it) does.
        """
        if length < MIN_MAP_BYTES or offset % mmap.ALLOCATIONGRANULARITY:
            return super().map_range(pack_id, offset, length)
        fd = self._fd(pack_id)
        size = os.fstat(fd).st_size
        if size < offset + length:  # mapping past the end would SIGBUS on access
            raise IntegrityError(
                f"pack {pack_id} is {size} bytes, shorter than the {offset + length} recorded; "
                "the pack is truncated"
            )
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        mapped = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=prot, offset=offset)
        if populate:
            _populate_read(mapped)
        self.bytes_read += length
        return torch.frombuffer(mapped, dtype=torch.uint8)

    def delete(self, pack_id: str) -> None:
        with self._lock:
            fd = self._fds.pop(pack_id, None)
        if fd is not None:
            os.close(fd)
        self.path_of(pack_id).unlink(missing_ok=True)

    def list(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.pack"))

    def size(self, pack_id: str) -> int:
        try:
            return self.path_of(pack_id).stat().st_size
        except FileNotFoundError:
            raise StoreError(f"pack {pack_id} is missing") from None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
