"""faultfs: an in-memory FUSE filesystem that records what a power cut would leave on disk.

Run as its own process, in the foreground, until unmounted (``fusermount3 -u MOUNTPOINT``)::

    python tests/powerloss/faultfs.py MOUNTPOINT OUTDIR

The mount is ready when ``os.path.ismount(MOUNTPOINT)`` is true. Setting ``FAULTFS_DEBUG=1``
turns on libfuse's request trace (stderr), which also shows requests this FS leaves unanswered.

Model (after RocksDB's FaultInjectionTestFS and LazyFS): the whole tree lives in this process.
Every inode has a *current* state, which all reads see, and a separate *durable* state, which is
what a disk would hold after a power cut that drops everything not yet fsynced:

- a file's ``durable`` bytes are its content as of its last fsync/fdatasync (``b""`` before);
- a directory's ``durable_entries`` are its entries as of its last fsyncdir (empty before).

Only fsync, fdatasync and fsyncdir change durable state: close, rename and sync_file_range (for
which the kernel sends no request) do not. The durable snapshot is the tree reached from the root
through ``durable_entries``, with each file's ``durable`` bytes. It changes only at sync ops, so one
is recorded after each of them; snapshots share the immutable bytes objects, nothing is copied.

Every mutating op gets an index (from 1). An op on a path under the top-level ``/marks/`` directory
(one the workload touches to say where it is) records ``[index, mark name]``, and ``/marks`` is left
out of snapshots. At unmount OUTDIR receives ``blobs/<n>`` (each bytes object any snapshot holds,
once), ``states.json`` (``[[op_index, {"files": {relpath: n}, "dirs": [relpath]}], ...]``, one per
sync op, after the empty root at index 0), ``marks.json``, ``ops.txt`` and finally ``DONE``.
Hard links, symlinks, xattrs and special files are not supported. Unlinked files stay usable
through open handles, but fstat of one fails with ESTALE (libfuse gives no path for it).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import mfusepy as fuse

MARKS = "marks"
FALLOC_FL_KEEP_SIZE = 0x01
UTIME_NOW = (1 << 30) - 1  # libfuse passes tv_sec 0 with these, so use_ns times equal them
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1


class Node:
    def __init__(self, ino: int, mode: int) -> None:
        now = time.time_ns()
        try:  # the caller's ids; the root is made before the mount, outside any request
            uid, gid, _pid = fuse.fuse_get_context()
        except ValueError:  # NULL context
            uid, gid = os.getuid(), os.getgid()
        self.ino, self.mode, self.uid, self.gid = ino, mode, uid, gid
        self.atime = self.mtime = self.ctime = now

    def touch(self) -> None:
        self.mtime = self.ctime = time.time_ns()


class File(Node):
    def __init__(self, ino: int, mode: int) -> None:
        super().__init__(ino, stat.S_IFREG | (mode & 0o7777))
        self.data = bytearray()
        self.durable = b""
        self.dirty = False  # written since `durable` was taken

    def resize(self, length: int) -> None:
        if length < len(self.data):
            del self.data[length:]
        elif length > len(self.data):
            self.data.extend(bytes(length - len(self.data)))
        self.dirty = True
        self.touch()


class Dir(Node):
    def __init__(self, ino: int, mode: int) -> None:
        super().__init__(ino, stat.S_IFDIR | (mode & 0o7777))
        self.entries: dict[str, Node] = {}
        self.durable_entries: dict[str, Node] = {}


Snapshot = tuple[dict[str, bytes], list[str]]


_err = fuse.FuseOSError


def _split(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


class FaultFS(fuse.Operations):  # type: ignore[misc]  # mfusepy is untyped
    use_ns = True

    def __init__(self, outdir: str) -> None:
        self.outdir = Path(outdir)
        self.inos, self.fhs = itertools.count(1), itertools.count(1)
        self.root = Dir(next(self.inos), 0o755)
        self.handles: dict[int, Node] = {}
        self.op_count = 0
        self.events: list[tuple[int, str, str]] = []
        self.marks: list[tuple[int, str]] = []
        self.states: list[tuple[int, Snapshot]] = [(0, ({}, []))]

    def _lookup(self, path: str) -> Node:
        node: Node = self.root
        for part in _split(path):
            if not isinstance(node, Dir):
                raise _err(errno.ENOTDIR)
            child = node.entries.get(part)
            if child is None:
                raise _err(errno.ENOENT)
            node = child
        return node

    def _node(self, path: str | None, fh: int | None) -> Node:
        if fh is not None and fh in self.handles:
            return self.handles[fh]
        if path is None:
            raise _err(errno.ESTALE)
        return self._lookup(path)

    def _file(self, path: str | None, fh: int | None) -> File:
        node = self._node(path, fh)
        if isinstance(node, Dir):
            raise _err(errno.EISDIR)
        assert isinstance(node, File)
        return node

    def _parent(self, path: str) -> tuple[Dir, str]:
        parts = _split(path)
        if not parts:
            raise _err(errno.EBUSY)  # the root has no parent entry
        parent = self._lookup("/" + "/".join(parts[:-1]))
        if not isinstance(parent, Dir):
            raise _err(errno.ENOTDIR)
        return parent, parts[-1]

    def _op(self, name: str, *paths: str | None) -> int:
        self.op_count += 1
        index = self.op_count
        self.events.append((index, name, " ".join(p or "<unlinked>" for p in paths)))
        for path in paths:
            parts = _split(path or "")
            if len(parts) > 1 and parts[0] == MARKS:
                self.marks.append((index, parts[1]))
        return index

    def _handle(self, node: Node) -> int:
        fh = next(self.fhs)
        self.handles[fh] = node
        return fh

    def _snapshot(self) -> Snapshot:
        files: dict[str, bytes] = {}
        dirs: list[str] = []
        # A directory moved between two unsynced parents may show up under both, as files do;
        # only a cycle (possible through such moves) is cut, by tracking the ancestors.
        stack: list[tuple[str, Dir, frozenset[int]]] = [("", self.root, frozenset([self.root.ino]))]
        while stack:
            prefix, folder, ancestors = stack.pop()
            for name, node in folder.durable_entries.items():
                if not prefix and name == MARKS:
                    continue
                rel = prefix + name
                if isinstance(node, Dir):
                    if node.ino not in ancestors:
                        dirs.append(rel)
                        stack.append((rel + "/", node, ancestors | {node.ino}))
                elif isinstance(node, File):
                    files[rel] = node.durable
        dirs.sort()
        return files, dirs

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if config_3 is not None:
            # Unlink of an open file: no .fuse_hidden rename; later ops on it come with its
            # handle and no path (libfuse passes NULL for a stale path).
            config_3.hard_remove = 1
            config_3.use_ino = 1

    def destroy(self, path: str) -> None:
        out = self.outdir
        (out / "blobs").mkdir(parents=True, exist_ok=True)
        blob_of: dict[int, int] = {}  # id() of a bytes object (all kept alive by self.states)
        states: list[Any] = []
        for index, (files, dirs) in self.states:
            numbered: dict[str, int] = {}
            for rel, data in files.items():
                number = blob_of.get(id(data))
                if number is None:
                    number = blob_of[id(data)] = len(blob_of)
                    (out / "blobs" / str(number)).write_bytes(data)
                numbered[rel] = number
            states.append([index, {"files": numbered, "dirs": dirs}])
        (out / "states.json").write_text(json.dumps(states))
        (out / "marks.json").write_text(json.dumps([list(mark) for mark in self.marks]))
        with open(out / "ops.txt", "w") as log:
            log.writelines(f"{index} {name} {where}\n" for index, name, where in self.events)
        (out / "DONE").touch()

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        node = self._node(path, fh)
        if isinstance(node, Dir):
            size = 4096
            nlink = 2 + sum(isinstance(child, Dir) for child in node.entries.values())
        else:
            assert isinstance(node, File)
            size, nlink = len(node.data), 1
        ids = {"st_ino": node.ino, "st_mode": node.mode, "st_uid": node.uid, "st_gid": node.gid}
        times = {"st_atime": node.atime, "st_mtime": node.mtime, "st_ctime": node.ctime}
        sizes = {"st_size": size, "st_blocks": -(-size // 512), "st_blksize": 4096}
        return {**ids, **times, **sizes, "st_nlink": nlink}

    def access(self, path: str, amode: int) -> int:
        self._lookup(path)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        stats = dict.fromkeys(("f_blocks", "f_bfree", "f_bavail"), 1 << 30)  # 4 TiB of 4 KiB
        stats.update(dict.fromkeys(("f_files", "f_ffree", "f_favail"), 1 << 24))
        return {**stats, "f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def chmod(self, path: str | None, mode: int) -> int:
        node = self._node(path, None)
        self._op("chmod", path)
        node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        node.ctime = time.time_ns()
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        node = self._node(path, None)
        self._op("utimens", path)
        now = time.time_ns()
        atime, mtime = times if times is not None else (now, now)
        if atime != UTIME_OMIT:
            node.atime = now if atime == UTIME_NOW else atime
        if mtime != UTIME_OMIT:
            node.mtime = now if mtime == UTIME_NOW else mtime
        node.ctime = now
        return 0

    def _add(self, op: str, path: str, kind: type[File | Dir], mode: int) -> Any:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise _err(errno.EEXIST)
        self._op(op, path)
        node = parent.entries[name] = kind(next(self.inos), mode)
        parent.touch()
        return node

    def mkdir(self, path: str, mode: int) -> int:
        self._add("mkdir", path, Dir, mode)
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise _err(errno.EPERM)
        self._add("mknod", path, File, mode)
        return 0

    def unlink(self, path: str) -> int:
        parent, name = self._parent(path)
        node = self._lookup(path)
        if isinstance(node, Dir):
            raise _err(errno.EISDIR)
        self._op("unlink", path)
        del parent.entries[name]
        parent.touch()
        node.ctime = time.time_ns()
        return 0

    def rmdir(self, path: str) -> int:
        parent, name = self._parent(path)
        node = self._lookup(path)
        if not isinstance(node, Dir):
            raise _err(errno.ENOTDIR)
        if node.entries:
            raise _err(errno.ENOTEMPTY)
        self._op("rmdir", path)
        del parent.entries[name]
        parent.touch()
        return 0

    def rename(self, old: str, new: str, noreplace: bool = False) -> int:
        old_parent, old_name = self._parent(old)
        node = self._lookup(old)
        new_parent, new_name = self._parent(new)
        target = new_parent.entries.get(new_name)
        if noreplace and target is not None:
            raise _err(errno.EEXIST)
        if target is node:
            return 0
        if isinstance(node, Dir):
            if (new.rstrip("/") + "/").startswith(old.rstrip("/") + "/"):
                raise _err(errno.EINVAL)  # into its own subtree
            if target is not None and not isinstance(target, Dir):
                raise _err(errno.ENOTDIR)
            if isinstance(target, Dir) and target.entries:
                raise _err(errno.ENOTEMPTY)
        elif isinstance(target, Dir):
            raise _err(errno.EISDIR)
        self._op("rename", old, new)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node
        old_parent.touch()
        new_parent.touch()
        node.ctime = time.time_ns()
        return 0

    def link(self, target: str, source: str) -> int:
        raise _err(errno.EPERM)  # no hard links

    def opendir(self, path: str) -> int:
        node = self._lookup(path)
        if not isinstance(node, Dir):
            raise _err(errno.ENOTDIR)
        return self._handle(node)

    def readdir(self, path: str | None, fh: int) -> list[Any]:
        node = self._node(path, fh)
        if not isinstance(node, Dir):
            raise _err(errno.ENOTDIR)
        # With use_ino, st_ino is the entry's d_ino, and glibc's readdir skips d_ino 0.
        items = [(".", node), ("..", node), *node.entries.items()]
        return [(name, {"st_mode": c.mode, "st_ino": c.ino}, 0) for name, c in items]

    def releasedir(self, path: str | None, fh: int) -> int:
        self.handles.pop(fh, None)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        node = self._node(path, fh)
        if not isinstance(node, Dir):
            raise _err(errno.ENOTDIR)
        index = self._op("fsyncdir", path)
        node.durable_entries = dict(node.entries)
        self.states.append((index, self._snapshot()))
        return 0

    def create(self, path: str, mode: int, flags: int) -> int:
        parent, name = self._parent(path)
        if name in parent.entries and not flags & os.O_EXCL:
            return self.open(path, flags)
        return self._handle(self._add("create", path, File, mode))

    def open(self, path: str, flags: int) -> int:
        node = self._lookup(path)
        if isinstance(node, Dir) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise _err(errno.EISDIR)
        if flags & os.O_TRUNC and isinstance(node, File) and node.data:
            self._op("truncate", path)
            node.resize(0)
        return self._handle(node)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        node = self._file(path, fh)
        return bytes(node.data[offset : offset + size])

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        node = self._file(path, fh)
        self._op("write", path)
        buf = node.data
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
        node.dirty = True
        node.touch()
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        node = self._file(path, fh)
        self._op("truncate", path)
        node.resize(length)
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        node = self._file(path, fh)
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise _err(errno.EOPNOTSUPP)  # punch hole, zero/collapse/insert range
        self._op("fallocate", path)
        if not mode & FALLOC_FL_KEEP_SIZE and offset + size > len(node.data):
            node.resize(offset + size)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        node = self._file(path, fh)  # directories get fsyncdir
        index = self._op("fdatasync" if datasync else "fsync", path)
        if node.dirty:  # else keep sharing the last copy
            node.durable = bytes(node.data)
            node.dirty = False
        self.states.append((index, self._snapshot()))
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def release(self, path: str | None, fh: int) -> int:
        self.handles.pop(fh, None)
        return 0


class _FUSE(fuse.FUSE):  # type: ignore[misc]
    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        # mfusepy drops renameat2's flags: honour NOREPLACE, refuse EXCHANGE and WHITEOUT
        if flags & ~RENAME_NOREPLACE:
            return -errno.EINVAL
        decode = [path.decode(self.encoding, self.errors) for path in (old, new)]
        return int(self.operations.rename(*decode, noreplace=bool(flags)))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: faultfs.py MOUNTPOINT OUTDIR", file=sys.stderr)
        return 2
    mountpoint, outdir = argv
    debug = os.environ.get("FAULTFS_DEBUG") == "1"
    _FUSE(
        FaultFS(outdir), mountpoint, foreground=True, nothreads=True, debug=debug, fsname="faultfs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
