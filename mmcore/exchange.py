"""Export to and import from the ecosystem's common format: one ``.safetensors``
file per model, named after it, tensor names kept (docs/FORMAT.md points to the
format: an 8-byte header length, a JSON header, the tensors' bytes).

The files are written and read here, not through the ``safetensors`` package:
one write or read per file and no copy beyond it, where the package's
``save_file`` / ``load_file`` cost 1.4-2x more per small model. The tests check
both directions against the package. Every header read is validated before a
byte of data is used (a file is untrusted input).
"""

from __future__ import annotations

import errno
import json
import os
import reprlib
import secrets
import stat
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import kernels
from .errors import InvalidArgumentError, MMCoreError

SUFFIX = ".safetensors"
ORDER_KEY = "mmcore.tensor_order"  # metadata: the state dict's tensor names in order (JSON)
MAX_HEADER = 100 << 20  # as the package: a longer header is not a safetensors file
StateDict = dict[str, torch.Tensor]

# The format's dtype names (those torch has).
CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}  # fmt: skip
DTYPES = {code: dtype for dtype, code in CODES.items()}


class ExchangeError(MMCoreError):
    """Export or import cannot go ahead (a dtype the format cannot hold, a file in the
    way, a file that is not valid safetensors)."""


def _supported(dtype: torch.dtype) -> bool:
    return dtype in CODES


# Error messages quote what a file or a caller gave, bounded in length and depth.
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlist = _SHOW.maxdict = 8
_SHOW.maxlevel = 3


def _show(value: object) -> str:
    return _SHOW.repr(value)


def file_name(model: str) -> str:
    """The file a model exports to; refuses names that are not one plain file name."""
    if (
        not model
        or model in (".", "..")
        or "/" in model
        or "\\" in model
        or "\0" in model
        or model != model.strip()
        or not _encodable(model)
    ):
        raise InvalidArgumentError(
            f"model {_show(model)} cannot be exported under its own name (it must be one plain "
            "file name: no '/', no leading or trailing spaces, not '.' or '..')"
        )
    return model + SUFFIX


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name_max(directory: Path) -> int:
    """The longest file name, in bytes, allowed where ``directory`` is or will be
    created (the file system of its nearest existing ancestor)."""
    for at in (directory, *directory.parents):
        try:
            limit = os.pathconf(at, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
        return limit if limit > 0 else sys.maxsize
    return 255


def check_exportable(models: dict[str, StateDict], directory: Path) -> None:
    """Every model has a plain file name that the file system holds and that is free,
    every dtype is one safetensors holds: checked for all before anything is written."""
    if "\0" in str(directory):
        raise InvalidArgumentError(f"{directory!r} is not a usable path (it holds a NUL)")
    limit = _name_max(directory)
    for name, sd in models.items():
        target = directory / file_name(name)
        if len(os.fsencode(target.name)) > limit:
            raise InvalidArgumentError(
                f"model {_show(name)} cannot be exported under its own name: "
                f"{len(os.fsencode(target.name))} bytes of file name where the file system of "
                f"{directory} allows {limit}; rename the model, or export the others with "
                "models=[...]"
            )
        if os.path.lexists(target):
            raise ExchangeError(
                f"{target} exists: export into an empty directory, or remove it first"
            )
        for key, t in sd.items():
            if not _supported(t.dtype):
                raise ExchangeError(
                    f"model {_show(name)}, tensor {_show(key)}: safetensors cannot hold dtype "
                    f"{t.dtype}; export the other models with models=[...], or convert this "
                    "tensor first"
                )


def encode_file(sd: StateDict) -> tuple[list[bytes | memoryview], list[torch.Tensor]]:
    """The pieces of one file: its header, then every tensor's bytes (views of the
    tensors' memory, valid while the returned tensors are held). Tensors go by
    element size, largest first (each stays aligned, as the package lays them out);
    the metadata keeps the state dict's order."""
    keep = {k: t.detach().cpu().contiguous() for k, t in sd.items()}
    order = sorted(keep, key=lambda k: -keep[k].element_size())
    entries: dict[str, object] = {"__metadata__": {ORDER_KEY: json.dumps(list(sd))}}
    pieces: list[bytes | memoryview] = []
    at = 0
    for key in order:
        t = keep[key]
        n = t.numel() * t.element_size()
        entries[key] = {
            "dtype": CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [at, at + n],
        }
        if n:
            pieces.append(kernels.tensor_view(t))
        at += n
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    pieces.insert(0, struct.pack("<Q", len(head)) + head)
    return pieces, list(keep.values())


def export_models(
    models: dict[str, StateDict], directory: Path, progress: Callable[[int], None]
) -> list[Path]:
    """Writes each model to ``directory/<name>.safetensors``, creating the directory if
    need be. Each file is written under a fresh temporary name, then given its own
    name only if that is still free: a crash leaves whole files (and at worst a
    temporary one, which never ends in SUFFIX), and no file the export did not
    create is written to or replaced. Any error removes every file the export
    wrote and every directory it created, then raises a typed error."""
    check_exportable(models, directory)
    made: list[Path] = []
    written: list[Path] = []
    try:
        _make_directory(directory, made)
        for name, sd in models.items():
            pieces, held = encode_file(sd)
            _write_new(directory / file_name(name), pieces, written)
            del pieces, held
            progress(1)
    except BaseException as exc:
        left = _undo(written, made)
        if isinstance(exc, OSError):
            raise _export_error(exc, directory, left) from None
        raise
    return written


TEMP_SUFFIX = ".mmcore-partial"  # not SUFFIX: what a crashed export leaves is never imported
_TEMP_TRIES = 16
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
# Where os.link fails so, the file system has no hard links: a rename must do.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def _temp_name() -> str:
    return f".mmcore-export-{secrets.token_hex(8)}{TEMP_SUFFIX}"


def _make_directory(directory: Path, made: list[Path]) -> None:
    """Creates ``directory`` and its missing parents, recording each one created."""
    missing = []
    at = directory
    while not os.path.isdir(at):  # a link to a directory is one
        if os.path.lexists(at):
            raise ExchangeError(
                f"cannot export into {directory}: {at} exists and is not a directory; "
                "export into a new or empty directory"
            )
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for at in reversed(missing):
        os.mkdir(at)
        made.append(at)


def _write_new(target: Path, pieces: list[bytes | memoryview], written: list[Path]) -> None:
    """Writes ``pieces`` to a file that did not exist (O_EXCL: never through a planted
    link, never into another's file; a taken name is passed over), then names it
    ``target``, recorded in ``written``."""
    for _ in range(_TEMP_TRIES):
        tmp = target.parent / _temp_name()
        try:
            fd = os.open(tmp, _FILE_FLAGS, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise ExchangeError(
            f"cannot export into {target.parent}: {_TEMP_TRIES} temporary names in a row were "
            f"taken; remove the *{TEMP_SUFFIX} files there, or export into a new directory"
        )
    try:
        try:
            total = sum(len(p) for p in pieces)
            done = os.writev(fd, pieces)
            if done != total:  # a short write: finish it piece by piece
                flat = b"".join(bytes(p) for p in pieces)
                while done < total:
                    done += os.write(fd, flat[done:])
        finally:
            os.close(fd)
        _place(tmp, target, written)
    except BaseException:
        _remove(tmp)
        raise


def _place(tmp: Path, target: Path, written: list[Path]) -> None:
    """Gives the written file its name only while that is free: a file put there since
    the check, or one whose name differs only in case on a file system blind to
    case, is never replaced."""
    try:
        os.link(tmp, target, follow_symlinks=False)
    except FileExistsError:
        raise ExchangeError(
            f"{target} exists (it appeared during the export, or another model's file has "
            "the same name on this file system): export into an empty directory"
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS or os.path.lexists(target):
            raise
        os.replace(tmp, target)
        written.append(target)
        return
    written.append(target)
    os.unlink(tmp)


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _undo(written: list[Path], made: list[Path]) -> list[Path]:
    """Removes what an export wrote and the directories it created (those still empty);
    returns what could not be removed."""
    left = [p for p in written if not _remove(p)]
    for at in reversed(made):
        try:
            at.rmdir()
        except OSError:
            left.append(at)
    return left


_HINTS = {
    errno.EACCES: "export into a directory you can write to",
    errno.EPERM: "export into a directory you can write to",
    errno.EROFS: "the file system is read-only: export elsewhere",
    errno.ENOSPC: "free some space, or export elsewhere",
    errno.EDQUOT: "free some space, or export elsewhere",
    errno.ENAMETOOLONG: "choose a shorter directory path (or shorter model names)",
    errno.ENOTDIR: "part of the path is a file: choose another directory",
    errno.EEXIST: "another process is writing there: export into a directory of your own",
}


def _export_error(exc: OSError, directory: Path, left: list[Path]) -> ExchangeError:
    hint = _HINTS.get(exc.errno or 0, "fix that and export again")
    where = f" ({exc.filename})" if exc.filename is not None else ""
    gone = (
        f"could not remove {', '.join(map(str, left))}"
        if left
        else "nothing the export wrote was left behind"
    )
    return ExchangeError(
        f"cannot export into {directory}: {exc.strerror or exc}{where}; {hint} ({gone})"
    )


def exported_files(directory: Path) -> list[Path]:
    """The files of ``directory`` to import: every name ending in SUFFIX, dot-files
    included (an export's temporary files end otherwise). Each must be a regular file
    or a link to one; anything else is refused before a byte is read."""
    if not directory.is_dir():
        raise InvalidArgumentError(f"{directory} is not a directory of .safetensors files")
    try:
        with os.scandir(directory) as entries:
            files = sorted(directory / e.name for e in entries if e.name.endswith(SUFFIX))
    except OSError as exc:
        raise ExchangeError(
            f"{directory} cannot be listed: {exc.strerror or exc}; import from a directory "
            "you can read"
        ) from None
    if not files:
        raise InvalidArgumentError(f"{directory} holds no .safetensors files to import")
    for path in files:
        if path.name == SUFFIX or not _encodable(path.name):
            raise ExchangeError(
                f"{path} names no model (its name before {SUFFIX} is empty or not valid "
                "text): rename it <model name>.safetensors, or move it out"
            )
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ExchangeError(f"{path} cannot be read: {exc.strerror or exc}") from None
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
    return files


def _not_regular(path: Path, mode: int) -> ExchangeError:
    kind = (
        "a FIFO" if stat.S_ISFIFO(mode)
        else "a directory" if stat.S_ISDIR(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )  # fmt: skip
    return ExchangeError(
        f"{path} is {kind}: only regular files are imported; move it out of the directory"
    )


def read_models(files: list[Path]) -> Iterator[tuple[str, StateDict]]:
    """(model name, state dict) per file, read one at a time as the save consumes them.
    Files of one architecture share their header byte for byte: it is parsed and
    checked once, then only looked up."""
    layouts: dict[bytes, Layout] = {}
    for path in files:
        yield path.name[: -len(SUFFIX)], read_file(path, layouts)


# Per tensor, in the state dict's order: name, dtype, shape, offset of its bytes in
# the file, their length; then the file's total length.
Layout = tuple[list[tuple[str, torch.dtype, list[int], int, int]], int]


def read_file(path: Path, layouts: dict[bytes, Layout] | None = None) -> StateDict:
    """One safetensors file, read with one read and checked whole before use. Only a
    regular file is read: opening never blocks (O_NONBLOCK, for a FIFO) and the
    opened file is checked before a byte is read."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(path, st.st_mode)
            buf = bytearray(st.st_size)
            if f.readinto(buf) != st.st_size:
                raise ExchangeError(f"{path} changed while it was read: import it again")
    except (OSError, ValueError) as exc:
        raise ExchangeError(f"{path} cannot be read: {exc}") from None
    except MemoryError:
        raise ExchangeError(
            f"{path} does not fit in memory: import it on a larger machine"
        ) from None
    return decode_file(buf, str(path), layouts)


def decode_file(buf: bytearray, what: str, layouts: dict[bytes, Layout] | None = None) -> StateDict:
    """The tensors of one file's bytes (views of ``buf``, or copies where a tensor's
    bytes are not aligned for its dtype)."""
    if len(buf) < 8:
        raise _bad(what, "shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", buf)
    if n > min(MAX_HEADER, len(buf) - 8):
        raise _bad(what, f"a header of {n} bytes in a file of {len(buf)}")
    head = bytes(buf[8 : 8 + n])
    layout = None if layouts is None else layouts.get(head)
    if layout is None:
        layout = _layout(head, 8 + n, what)
        if layouts is not None:
            layouts[head] = layout
    tensors, total = layout
    if total > len(buf):
        raise _bad(what, f"it ends {total - len(buf)} bytes before its last tensor does")
    if total < len(buf):
        raise _bad(what, f"{len(buf) - total} bytes after the last tensor")
    whole = torch.frombuffer(buf, dtype=torch.uint8)
    out: StateDict = {}
    for key, dtype, shape, at, length in tensors:
        raw = whole[at : at + length]
        if at % dtype.itemsize:  # a file laid out by another writer: realign
            raw = raw.clone()
        try:
            out[key] = raw.view(dtype).view(shape)
        except (RuntimeError, TypeError, ValueError) as exc:  # the checks above should prevent it
            raise _bad(what, f"tensor {_show(key)} cannot be laid out ({exc})") from None
    return out


def _bad(what: str, problem: str) -> ExchangeError:
    return ExchangeError(f"{what} is not a readable safetensors file: {problem}")


def _layout(head: bytes, body: int, what: str) -> Layout:
    """Parses and checks one header: every tensor's dtype, shape and bytes, the data
    contiguous from the end of the header (where the file must end is returned)."""
    try:
        header = json.loads(head.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _bad(what, f"its header is not JSON that can be read ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(what, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _bad(what, "__metadata__ is not a map of strings")
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise _bad(what, f"tensor {_show(key)} is not described by a map")
        code = info.get("dtype")
        dtype = DTYPES.get(code) if isinstance(code, str) else None
        given, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise _bad(
                what,
                f"tensor {_show(key)} has dtype {_show(code)}, which torch or mmcore does not know",
            )
        sized = _shape(given)
        if sized is None:
            raise _bad(
                what,
                f"tensor {_show(key)} has shape {_show(given)} (it must be a list of integers "
                "0 <= n < 2**63, whose product, zeros taken as ones, is below 2**63)",
            )
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        ):
            raise _bad(what, f"tensor {_show(key)} has data_offsets {_show(offsets)}")
        (shape, numel), (begin, end) = sized, offsets
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise _bad(
                what,
                f"tensor {_show(key)}: bytes {_show(begin)}..{_show(end)} do not hold "
                f"{_show(shape)} of {dtype}",
            )
        spans.append((begin, end, key, dtype, shape))
    spans.sort()
    at = 0
    for begin, end, key, _, _ in spans:
        if begin != at:
            raise _bad(
                what,
                f"tensor {_show(key)} starts at {_show(begin)}, not {at}: the data must be "
                "contiguous",
            )
        at = end
    by_name = {
        key: (key, dtype, shape, body + begin, end - begin)
        for begin, end, key, dtype, shape in spans
    }
    return [by_name[k] for k in _order(list(header), metadata)], body + at


def _shape(given: object) -> tuple[list[int], int] | None:
    """A header's shape and its element count, or None where it is not one torch can
    lay out: a list of ints 0 <= n < 2**63 whose extent (zeros counted as ones, as
    torch's strides count them) stays below 2**63. Stops at the first excess, so a
    long shape of huge numbers costs no big-number arithmetic."""
    if not isinstance(given, list):
        return None
    shape: list[int] = []
    extent = numel = 1
    for d in given:
        if type(d) is not int or d < 0:
            return None
        extent *= max(d, 1)
        numel *= d
        if extent >= 1 << 63:
            return None
        shape.append(d)
    return shape, numel


def _order(keys: list[str], metadata: dict[str, str] | None) -> list[str]:
    """The exporting state dict's tensor order when the file records it (and it names
    exactly the file's tensors), else the file's own: the metadata is a hint that
    other writers may fill otherwise, never a reason to refuse a file."""
    try:
        order = json.loads((metadata or {})[ORDER_KEY])
    except (KeyError, ValueError, RecursionError):
        return keys
    if (
        isinstance(order, list)
        and len(order) == len(keys)
        and all(type(k) is str for k in order)
        and set(order) == set(keys)
    ):
        return order
    return keys
