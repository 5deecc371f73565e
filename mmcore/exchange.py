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

import json
import os
import struct
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


def file_name(model: str) -> str:
    """The file a model exports to; refuses names that are not one plain file name."""
    if (
        not model
        or model in (".", "..")
        or "/" in model
        or "\\" in model
        or "\0" in model
        or model != model.strip()
    ):
        raise InvalidArgumentError(
            f"model {model!r} cannot be exported under its own name (it must be one plain file "
            "name: no '/', no leading or trailing spaces, not '.' or '..')"
        )
    return model + SUFFIX


def check_exportable(models: dict[str, StateDict], directory: Path) -> None:
    """Every model has a plain file name that is free, every dtype is one safetensors
    holds: checked for all before anything is written."""
    for name, sd in models.items():
        target = directory / file_name(name)
        if target.exists():
            raise ExchangeError(
                f"{target} exists: export into an empty directory, or remove it first"
            )
        for key, t in sd.items():
            if not _supported(t.dtype):
                raise ExchangeError(
                    f"model {name!r}, tensor {key!r}: safetensors cannot hold dtype {t.dtype}; "
                    "export the other models with models=[...], or convert this tensor first"
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
    """Writes each model to ``directory/<name>.safetensors`` (a temporary name, then
    renamed: a crash leaves whole files or none)."""
    directory.mkdir(parents=True, exist_ok=True)
    check_exportable(models, directory)
    written = []
    for name, sd in models.items():
        target = directory / file_name(name)
        tmp = target.with_name(f".{target.name}.partial")
        pieces, held = encode_file(sd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            total = sum(len(p) for p in pieces)
            done = os.writev(fd, pieces)
            if done != total:  # a short write: finish it piece by piece
                flat = b"".join(bytes(p) for p in pieces)
                while done < total:
                    done += os.write(fd, flat[done:])
        finally:
            os.close(fd)
        del pieces, held
        os.replace(tmp, target)
        written.append(target)
        progress(1)
    return written


def exported_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise InvalidArgumentError(f"{directory} is not a directory of .safetensors files")
    files = sorted(
        p for p in directory.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".")
    )
    if not files:
        raise InvalidArgumentError(f"{directory} holds no .safetensors files to import")
    return files


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
    """One safetensors file, read with one read and checked whole before use."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = bytearray(size)
            if f.readinto(buf) != size:
                raise ExchangeError(f"{path} changed while it was read")
    except OSError as exc:
        raise ExchangeError(f"{path} cannot be read: {exc}") from None
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
        out[key] = raw.view(dtype).view(shape)
    return out


def _bad(what: str, problem: str) -> ExchangeError:
    return ExchangeError(f"{what} is not a readable safetensors file: {problem}")


def _layout(head: bytes, body: int, what: str) -> Layout:
    """Parses and checks one header: every tensor's dtype, shape and bytes, the data
    contiguous from the end of the header (where the file must end is returned)."""
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(what, f"its header is not JSON ({exc})") from None
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
            raise _bad(what, f"tensor {key!r} is not described by a map")
        code = info.get("dtype")
        dtype = DTYPES.get(code) if isinstance(code, str) else None
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise _bad(
                what, f"tensor {key!r} has dtype {code!r}, which torch or mmcore does not know"
            )
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad(what, f"tensor {key!r} has shape {shape!r}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        ):
            raise _bad(what, f"tensor {key!r} has data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise _bad(what, f"tensor {key!r}: bytes {begin}..{end} do not hold {shape} of {dtype}")
        spans.append((begin, end, key, dtype, shape))
    spans.sort()
    at = 0
    for begin, end, key, _, _ in spans:
        if begin != at:
            raise _bad(
                what, f"tensor {key!r} starts at {begin}, not {at}: the data must be contiguous"
            )
        at = end
    by_name = {
        key: (key, dtype, shape, body + begin, end - begin)
        for begin, end, key, dtype, shape in spans
    }
    return [by_name[k] for k in _order(list(header), metadata)], body + at


def _order(keys: list[str], metadata: dict[str, str] | None) -> list[str]:
    """The exporting state dict's tensor order when the file records it (and it names
    exactly the file's tensors), else the file's own."""
    try:
        order = json.loads((metadata or {})[ORDER_KEY])
    except (KeyError, ValueError, TypeError):
        return keys
    if (
        isinstance(order, list)
        and sorted(map(str, order)) == sorted(keys)
        and len(order) == len(keys)
    ):
        return [str(k) for k in order]
    return keys
