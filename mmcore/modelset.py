"""Turns what a user passes to ``save`` into a validated, grouped model set.

Models of one architecture share one *schema* (tensor names, dtypes, shapes and
byte offsets inside a model); models are grouped by schema so that each group's
bytes are laid out model after model with a fixed stride.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
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

    def layout_key(self) -> tuple[Any, ...]:
        """Equal for schemas of the same layout (versions along a chain hold equal
        schemas as distinct objects)."""
        return (tuple((t.name, t.dtype, t.shape, t.offset) for t in self.tensors), self.stride)

    def encode(self) -> dict[str, Any]:
        return {
            "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in self.tensors],
            "stride": self.stride,
            "align": self.align,
        }

    @classmethod
    def decode(cls, rec: Record) -> Schema:
        """Checks the layout: known-size fields, tensors inside the stride, apart from each
        other and each at a multiple of its element size (so every record's tensors can be
        viewed in place), sizes that add up."""
        stride = rec.integer("stride")
        align = rec.integer("align", minimum=1)
        if stride % align:
            raise rec.corrupt(f"the model stride {stride} is not a multiple of align {align}")
        specs = []
        for raw in rec.array("tensors"):
            if not isinstance(raw, list) or len(raw) != 5:
                raise rec.corrupt("a tensor entry is not [name, dtype, shape, offset, nbytes]")
            name, dtype, shape, offset, nbytes = raw
            if not (isinstance(name, str) and isinstance(dtype, str) and isinstance(shape, list)):
                raise rec.corrupt("a tensor entry has a name, dtype or shape of the wrong type")
            dims = tuple(rec.check_integer(d, "shape") for d in shape)
            # torch refuses dimensions that multiply past int64, a zero among them or not
            if math.prod(d or 1 for d in dims) >> 63:
                raise rec.corrupt(f"tensor {name!r}: shape {dims} is too large for a tensor")
            offset = rec.check_integer(offset, "offset")
            nbytes = rec.check_integer(nbytes, "nbytes")
            if offset + nbytes > stride:
                raise rec.corrupt(f"tensor {name!r} ends past the model stride {stride}")
            known = dtypes.BY_NAME.get(dtype)
            size = 1 if known is None else known.itemsize  # an unknown dtype: refused on read
            if known is not None and math.prod(dims) * size != nbytes:
                raise rec.corrupt(f"tensor {name!r}: {nbytes} bytes for shape {dims} of {dtype}")
            if offset % size or align % size:
                raise rec.corrupt(
                    f"tensor {name!r} of {size}-byte elements is at offset {offset} in records "
                    f"aligned to {align} bytes: not a multiple of its element size"
                )
            specs.append(TensorSpec(name, dtype, dims, offset, nbytes))
        if len({s.name for s in specs}) != len(specs):
            raise rec.corrupt("a tensor name appears twice")
        spans = sorted((s.offset, s.offset + s.nbytes, s.name) for s in specs if s.nbytes)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise rec.corrupt(f"tensors {first!r} and {second!r} overlap in the model record")
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


_PLAIN_CLASSES: dict[type, bool] = {}


def _plain(cls: type) -> bool:
    """Whether ``cls`` saves its state as ``nn.Module`` does: no override of
    ``state_dict``, ``_save_to_state_dict`` or ``get_extra_state``."""
    plain = _PLAIN_CLASSES.get(cls)
    if plain is None:
        base = torch.nn.Module
        plain = _PLAIN_CLASSES[cls] = all(
            getattr(cls, attr, None) is getattr(base, attr, None)
            for attr in ("state_dict", "_save_to_state_dict", "get_extra_state")
        )
    return plain


class _NotPlain(Exception):
    pass


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict(keep_vars=True)``: the same names, order and tensors, read
    from the modules' parameter and buffer tables directly (``state_dict()`` costs
    about 55 us per battery FFNN in its per-submodule calls; this walk about 8 us, most
    of it memory traffic: the same walk in C++ took 7 us).
    Saving reads only the tensors' bytes, so parameters are not detached (saves run
    under ``torch.no_grad``). Where a module class or instance customises saving (an
    override, hooks, extra state), this is ``state_dict()`` itself."""
    out: dict[str, torch.Tensor] = {}
    plain = _PLAIN_CLASSES

    def walk(m: torch.nn.Module, prefix: str) -> None:
        d = m.__dict__
        if plain.get(type(m)) is not True and not _plain(type(m)):
            raise _NotPlain
        if d["_state_dict_hooks"] or d["_state_dict_pre_hooks"]:
            raise _NotPlain
        params = d["_parameters"]
        if params:
            for key, p in params.items():
                if p is not None:
                    out[prefix + key] = p
        buffers = d["_buffers"]
        if buffers:
            skip = d["_non_persistent_buffers_set"]
            for key, b in buffers.items():
                if b is not None and key not in skip:
                    out[prefix + key] = b
        children = d["_modules"]
        if children:
            for key, child in children.items():
                if child is not None:
                    walk(child, prefix + key + ".")

    try:
        walk(module, "")
    except (_NotPlain, KeyError):  # KeyError: a torch whose modules keep other tables
        return dict(module.state_dict(keep_vars=True))
    return out


def _state_dict(name: str, value: Any) -> Mapping[str, Any]:
    if isinstance(value, torch.nn.Module):
        return module_state(value)
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
    for key, (dtype, shape) in zip(keys, sig):
        if not isinstance(key, str):
            raise InvalidModelSetError(
                f"model {model!r}: tensor names must be strings, got {type(key).__name__}"
            )
        _check_utf8(key, f"model {model!r}: tensor name")
        name = dtypes.name_of(dtype, where=f"model {model!r}, tensor {key!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        specs.append(TensorSpec(key, name, tuple(shape), 0, numel * dtypes.ITEMSIZE[dtype]))
    return laid_out(specs)


def _itemsize(dtype: str) -> int:
    known = dtypes.BY_NAME.get(dtype)
    return 1 if known is None else known.itemsize  # an unknown dtype: refused on read


def laid_out(specs: Sequence[TensorSpec]) -> Schema:
    """The record layout of ``specs`` (their offsets ignored): each tensor, in the order
    given, at the next multiple of its element size; the stride a multiple of the largest.
    Every record a writer makes is laid out so, and so is each part of a group split by
    shared tensors (docs/FORMAT.md)."""
    out = []
    offset = 0
    align = 1
    for spec in specs:
        itemsize = _itemsize(spec.dtype)
        offset = -(-offset // itemsize) * itemsize
        out.append(TensorSpec(spec.name, spec.dtype, spec.shape, offset, spec.nbytes))
        offset += spec.nbytes
        align = max(align, itemsize)
    return Schema(out, -(-offset // align) * align, align)


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
    if isinstance(models, StackedInput):  # already validated: one entry per model row
        yield from models.entries(keep_cuda)
        return
    seen: set[str] = set()
    tensor_type = torch.Tensor
    parameter_type = torch.nn.Parameter  # isinstance() of one goes through a metaclass hook
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
            kind = type(t)
            if (
                kind is not tensor_type
                and kind is not parameter_type
                and not isinstance(t, tensor_type)
            ):
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
        return self.group_of_layout(entry.keys, entry.signature, entry.name)

    def group_of_layout(self, keys: tuple[str, ...],
                        signature: tuple[tuple[torch.dtype, torch.Size], ...], model: str) -> int:  # fmt: skip
        key = (keys, signature)
        gi = self._by_key.get(key)
        if gi is None:
            gi = len(self.schemas)
            self._by_key[key] = gi
            self.schemas.append(_schema_for(keys, signature, model))
        return gi


@dataclass
class StackPart:
    """Models of one architecture given stacked: row i of every column is model i's tensor."""

    names: list[str]
    keys: tuple[str, ...]
    columns: list[torch.Tensor]  # [N, ...] each; every row contiguous; all on one device
    signature: tuple[tuple[torch.dtype, torch.Size], ...]

    @property
    def device(self) -> torch.device:
        return self.columns[0].device if self.columns else torch.device("cpu")

    def row_table(self) -> torch.Tensor:
        return row_addresses(self.columns, len(self.names))

    def on_host(self) -> StackPart:
        if self.device.type == "cpu":
            return self
        return StackPart(self.names, self.keys, [_rows_contiguous(c.cpu()) for c in self.columns],
                         self.signature)  # fmt: skip


def row_addresses(columns: list[torch.Tensor], n: int) -> torch.Tensor:
    """(n, columns) int64: the address of row i of every [n, ...] column, row by row
    (each row one contiguous run: see ``_rows_contiguous``)."""
    bases = torch.tensor([c.data_ptr() for c in columns], dtype=torch.int64)
    steps = torch.tensor([c.stride(0) * c.element_size() if n > 1 else 0 for c in columns],
                         dtype=torch.int64)  # fmt: skip
    return torch.arange(n, dtype=torch.int64).unsqueeze(1) * steps + bases


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` if each of its rows (``t[i]``) is one contiguous run of memory, else a copy."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


class StackedInput:
    """A model set given as stacked tensors (``ModelStore.save_stacked``): per
    architecture, the model names and ``{tensor name: [N, ...] tensor}``. Validated
    once here; ``iter_models`` yields its models as views of the stacks, and the
    baseline writer writes it without a per-model step."""

    def __init__(self, parts: list[tuple[Any, Any]], order: list[str] | None = None) -> None:
        self.parts: list[StackPart] = []
        seen: set[str] = set()
        for names, params in parts:
            self.parts.append(_stack_part(names, params, seen))
        if not self.parts:
            raise InvalidModelSetError("the model set is empty: pass at least one model")
        if order is not None and (len(order) != len(seen) or set(order) != seen):
            raise InvalidModelSetError("the set's order must name each of its models once")
        # the version's order of the models: the parts one after another unless given
        self.order = list(order) if order is not None else [n for p in self.parts for n in p.names]
        self._at = {name: i for i, name in enumerate(self.order)}

    def __len__(self) -> int:
        return len(self.order)

    def positions(self, part: StackPart) -> list[int]:
        """Where each model of ``part`` is in the set's order."""
        return [self._at[name] for name in part.names]

    def entries(self, keep_cuda: bool) -> Iterator[ModelEntry]:
        made: list[ModelEntry | None] = [None] * len(self.order)
        for part in self.parts:
            device = part.device if keep_cuda and part.device.type == "cuda" else None
            if device is None:
                part = part.on_host()
            rows = part.row_table().tolist()
            views = zip(*[c.unbind(0) for c in part.columns]) if part.columns else [()] * len(rows)
            for at, name, own, ptrs in zip(self.positions(part), part.names, views, rows):
                made[at] = ModelEntry(name, part.keys, part.signature, list(own), ptrs, device)
        for entry in made:  # in the set's order
            assert entry is not None
            yield entry


def _stack_part(names: Any, params: Any, seen: set[str]) -> StackPart:
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise InvalidModelSetError(
            f"names must be a sequence of model names (strings), got {type(names).__name__}"
        )
    names = list(names)
    if not names:
        raise InvalidModelSetError("a stack needs at least one model name")
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidModelSetError(f"model names must be non-empty strings, got {name!r}")
        _check_utf8(name, "model name")
        if name in seen:
            raise InvalidModelSetError(f"duplicate model name {name!r}: names must be unique")
        seen.add(name)
    if not isinstance(params, Mapping):  # (empty: models without tensors, as a state dict may be)
        raise InvalidModelSetError(
            "stacked parameters must be a mapping of tensor name to a tensor of "
            f"[models, ...], got {type(params).__name__}"
        )
    first = names[0]
    keys, columns, devices = [], [], set()
    for key, t in params.items():
        if not isinstance(key, str):
            raise InvalidModelSetError(f"tensor names must be strings, got {type(key).__name__}")
        if not isinstance(t, torch.Tensor):
            raise InvalidModelSetError(
                f"stacked tensor {key!r}: expected a torch.Tensor of [models, ...], got {type(t).__name__}"
            )
        if t.dim() == 0 or t.shape[0] != len(names):
            lead = "no leading dimension" if t.dim() == 0 else f"leading dimension {t.shape[0]}"
            raise InvalidModelSetError(
                f"stacked tensor {key!r} has {lead}, but {len(names)} model names were given: "
                "every tensor of a stack is [models, ...], one row per name"
            )
        t = _slow_source(first, key, t, keep_cuda=True) if not t.is_cpu or t.is_neg() or (
            t.dtype in dtypes.COMPLEX and t.is_conj()) else t.detach()  # fmt: skip
        if t.layout is not torch.strided:
            raise InvalidModelSetError(
                f"stacked tensor {key!r}: layout {t.layout} is not supported"
            )
        dtypes.name_of(t.dtype, where=f"stacked tensor {key!r}")
        keys.append(key)
        columns.append(t)
        devices.add(t.device)
    if len(devices) > 1:  # mixed: all to the host
        columns = [c.cpu() for c in columns]
    columns = [_rows_contiguous(c) for c in columns]
    signature = tuple((c.dtype, c.shape[1:]) for c in columns)
    return StackPart(names, tuple(keys), columns, signature)
