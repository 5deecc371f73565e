"""Turns what a user passes to ``save`` into a validated, grouped model set.

Models of one architecture share one *schema* (tensor names, dtypes, shapes and
byte offsets inside a model); models are grouped by schema so that each group's
bytes are laid out model after model with a fixed stride.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import dtypes
from .errors import InvalidModelSetError
from .record import Record


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # byte offset inside one model's record
    nbytes: int


@dataclass
class Schema:
    tensors: list[TensorSpec]
    stride: int  # bytes from one model's record to the next
    align: int

    def encode(self) -> dict[str, Any]:
        return {
            "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in self.tensors],
            "stride": self.stride,
            "align": self.align,
        }

    @classmethod
    def decode(cls, rec: Record) -> Schema:
        """Checks the layout: known-size fields, tensors inside the stride, sizes that add up."""
        stride = rec.integer("stride")
        align = rec.integer("align", minimum=1)
        specs = []
        for raw in rec.array("tensors"):
            if not isinstance(raw, list) or len(raw) != 5:
                raise rec.corrupt("a tensor entry is not [name, dtype, shape, offset, nbytes]")
            name, dtype, shape, offset, nbytes = raw
            if not (isinstance(name, str) and isinstance(dtype, str) and isinstance(shape, list)):
                raise rec.corrupt("a tensor entry has a name, dtype or shape of the wrong type")
            dims = tuple(rec.check_integer(d, "shape") for d in shape)
            offset = rec.check_integer(offset, "offset")
            nbytes = rec.check_integer(nbytes, "nbytes")
            if offset + nbytes > stride:
                raise rec.corrupt(f"tensor {name!r} ends past the model stride {stride}")
            known = dtypes.BY_NAME.get(dtype)
            if known is not None and math.prod(dims) * known.itemsize != nbytes:
                raise rec.corrupt(f"tensor {name!r}: {nbytes} bytes for shape {dims} of {dtype}")
            specs.append(TensorSpec(name, dtype, dims, offset, nbytes))
        if len({s.name for s in specs}) != len(specs):
            raise rec.corrupt("a tensor name appears twice")
        return cls(specs, stride, align)


@dataclass
class ModelEntry:
    """One validated model: its tensor names, (dtype, shape) signature and source tensors."""

    name: str
    keys: tuple[str, ...]
    signature: tuple[tuple[torch.dtype, torch.Size], ...]
    sources: list[torch.Tensor]  # contiguous, exactly the bits to store: on the CPU or on `device`
    ptrs: list[int]  # the sources' addresses (read once here: each read costs Python ~0.2 us)
    device: torch.device | None = None  # the CUDA device of every source, or None: all on the CPU


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidModelSetError(
            f"{what} {text!r} is not valid unicode text: {exc.reason}"
        ) from None


def _state_dict(name: str, value: Any) -> Mapping[str, Any]:
    if isinstance(value, torch.nn.Module):
        return value.state_dict(keep_vars=False)
    if isinstance(value, Mapping):
        return value
    raise InvalidModelSetError(
        f"model {name!r}: expected a torch.nn.Module or a state dict (mapping of tensor name "
        f"to tensor), got {type(value).__name__}"
    )


def _items(models: Any) -> Iterable[Any]:
    if isinstance(models, Mapping):
        return models.items()
    if isinstance(models, (str, bytes)) or not isinstance(models, Iterable):
        raise InvalidModelSetError(
            f"models must be a mapping of model name to module or state dict, "
            f"got {type(models).__name__}"
        )
    return models


def _schema_for(
    keys: tuple[str, ...], sig: tuple[tuple[torch.dtype, torch.Size], ...], model: str
) -> Schema:
    specs = []
    offset = 0
    align = 1
    for key, (dtype, shape) in zip(keys, sig):
        if not isinstance(key, str):
            raise InvalidModelSetError(
                f"model {model!r}: tensor names must be strings, got {type(key).__name__}"
            )
        _check_utf8(key, f"model {model!r}: tensor name")
        name = dtypes.name_of(dtype, where=f"model {model!r}, tensor {key!r}")
        itemsize = dtypes.ITEMSIZE[dtype]
        offset = -(-offset // itemsize) * itemsize
        numel = 1
        for dim in shape:
            numel *= dim
        specs.append(TensorSpec(key, name, tuple(shape), offset, numel * itemsize))
        offset += numel * itemsize
        align = max(align, itemsize)
    stride = -(-offset // align) * align
    return Schema(specs, stride, align)


def _slow_source(model: str, key: str, t: torch.Tensor, keep_cuda: bool = False) -> torch.Tensor:
    if t.layout is not torch.strided:
        raise InvalidModelSetError(
            f"model {model!r}, tensor {key!r}: layout {t.layout} is not supported; "
            "convert it with .to_dense() first"
        )
    if t.device.type == "meta":
        raise InvalidModelSetError(
            f"model {model!r}, tensor {key!r} is on the meta device and has no data"
        )
    return _as_source(t, keep_cuda)


def _as_source(t: torch.Tensor, keep_cuda: bool = False) -> torch.Tensor:
    """A contiguous tensor holding exactly the bits of ``t``: on the CPU, or, with
    ``keep_cuda``, left on its CUDA device."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu" and not (keep_cuda and t.device.type == "cuda"):
        t = t.to("cpu")
    return t.contiguous()


def iter_models(models: Any, *, keep_cuda: bool = False) -> Iterator[ModelEntry]:
    """Validates models one at a time; raises InvalidModelSetError naming the culprit.

    Callers consume this while earlier models are already being written, so a
    bad model late in the set is reported before anything is committed. Sources
    are CPU tensors, except with ``keep_cuda``, where CUDA tensors stay on their
    device (``ModelEntry.device`` then names it, and ``ptrs`` are device addresses).
    Sources are the caller's own tensors wherever no copy was needed: a save reads
    them more than once (hash, encode, write), so they must not change during it.
    """
    seen: set[str] = set()
    tensor_type = torch.Tensor
    complex_dtypes = dtypes.COMPLEX
    for item in _items(models):
        try:
            name, value = item
        except (TypeError, ValueError):
            raise InvalidModelSetError(
                "models must be a mapping of name to model, or an iterable of (name, model) pairs; "
                f"got an item of type {type(item).__name__}"
            ) from None
        if not isinstance(name, str):
            raise InvalidModelSetError(f"model names must be strings, got {type(name).__name__}")
        if not name:
            raise InvalidModelSetError("model names must be non-empty strings")
        _check_utf8(name, "model name")
        if name in seen:
            raise InvalidModelSetError(f"duplicate model name {name!r}: names must be unique")
        seen.add(name)
        sd = _state_dict(name, value)
        keys = tuple(sd.keys())
        sig = []
        sources = []
        ptrs = []
        devices: list[torch.device] = []  # of the sources left on a CUDA device
        for key, t in zip(keys, sd.values()):
            if type(t) is not tensor_type and not isinstance(t, tensor_type):
                raise InvalidModelSetError(
                    f"model {name!r}, entry {key!r}: expected a torch.Tensor, got {type(t).__name__}"
                )
            dtype = t.dtype
            sig.append((dtype, t.shape))
            if (
                not (t.is_cpu and t.is_contiguous())
                or t.is_neg()
                or (dtype in complex_dtypes and t.is_conj())
            ):
                t = _slow_source(name, key, t, keep_cuda)
                if not t.is_cpu:
                    devices.append(t.device)
            sources.append(t)
            ptrs.append(t.data_ptr())
        device = None
        if devices:
            if len(set(devices)) > 1 or len(devices) < len(sources):  # mixed: all to the host
                sources = [t.cpu() for t in sources]
                ptrs = [t.data_ptr() for t in sources]
            else:
                device = devices[0]
        yield ModelEntry(name, keys, tuple(sig), sources, ptrs, device)


class Grouper:
    """Assigns each model to the group of its schema, creating schemas on first sight."""

    def __init__(self) -> None:
        self.schemas: list[Schema] = []
        self._by_key: dict[Any, int] = {}

    def group_of(self, entry: ModelEntry) -> int:
        key = (entry.keys, entry.signature)
        gi = self._by_key.get(key)
        if gi is None:
            gi = len(self.schemas)
            self._by_key[key] = gi
            self.schemas.append(_schema_for(entry.keys, entry.signature, entry.name))
        return gi
