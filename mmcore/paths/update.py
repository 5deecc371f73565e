"""The update save path: a version stored relative to its parent.

One pass hashes every tensor of the new set (one native call over the whole
table). A model whose hashes all equal the parent's costs nothing; a new model,
one whose architecture changed, or one whose delta chain would exceed
``max_chain`` is stored whole (through the baseline writer, into the same pack);
every other changed model gets a *model blob*: its changed tensors encoded
against the parent as recovery produces it (xor-planes, or quantized when a
tolerance is given), one zstd frame per model, or the raw bytes when that is
not smaller. Encoding runs batched over all changed tensors at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .. import codec, dtypes, kernels
from .._gc import gc_paused
from ..codec import frames
from ..errors import (
    InvalidArgumentError,
    InvalidModelSetError,
    KernelError,
    MMCoreError,
    decoding,
)
from ..kernels import cuda
from ..kernels.delta import (
    FLOAT_KINDS,
    plane_width,
    quantize_decode,
    quantize_encode,
    xor_planes_encode,
)
from ..kernels.quantized import quantize_decode_table, quantize_encode_table
from ..kernels.xor_planes import xor_planes_encode_table
from ..manifest import ContentRecord, GroupRecord, Manifest, UpdateInfo
from ..modelset import ModelEntry, Schema, StackedInput, iter_models
from ..store.packs import HEADER_SIZE, PackWriter, align_up
from . import baseline, chain, delta_blob
from .commit import Blobs

if TYPE_CHECKING:
    from ..storage import Storage

Progress = Callable[[int], None]
# save(derived_from=): {new model: the parent's model}, a callable giving one (or None) per
# new model, or "auto"
DerivedFrom = Union[Mapping[str, str], Callable[[str], Optional[str]], str, None]  # (3.9: no |)


@dataclass
class WrittenUpdate:
    groups: list[GroupRecord]
    blobs: Blobs
    update: UpdateInfo
    logical_bytes: int


@dataclass
class _Delta:
    entry: ModelEntry
    hashes: torch.Tensor  # of the new tensors
    info: chain.ModelInfo
    kinds: list[int]
    pieces: list[torch.Tensor | None]  # encoding per tensor (None: unchanged)
    recovered: torch.Tensor  # (tensors, 32) hashes of what recovery will produce
    frames: bytes | None = None  # the model blob compressed where it was encoded (a GPU)
    source: str = ""  # the parent's model it is a delta of (its own name unless derived)

    def __post_init__(self) -> None:
        self.source = self.source or self.entry.name

    @property
    def derived(self) -> bool:
        """A model new here, stored as a delta of another model of the parent."""
        return self.source != self.entry.name


_SAME_ORDER: tuple[int, ...] = ()  # _schema_order: the entry's tensors are in the schema's order


def _schema_order(
    info: chain.ModelInfo | None, entry: ModelEntry, memo: dict[Any, tuple[int, ...] | None]
) -> tuple[int, ...] | None:
    """Where each tensor of the parent's schema is in ``entry`` (tensors matched by
    name): ``_SAME_ORDER`` where it is where the schema has it, or None where the
    names, dtypes or shapes differ (another architecture). Once per architecture."""
    if info is None:
        return None
    key = (id(info.schema), entry.keys, entry.signature)
    if key not in memo:
        at = {k: i for i, k in enumerate(entry.keys)}
        got = {k: (dtypes.NAME_OF.get(dt), tuple(shape))
               for k, (dt, shape) in zip(entry.keys, entry.signature)}  # fmt: skip
        same = len(at) == len(info.schema.tensors) and all(
            got.get(t.name) == (t.dtype, tuple(t.shape)) for t in info.schema.tensors
        )
        perm = tuple(at[t.name] for t in info.schema.tensors) if same else None
        memo[key] = _SAME_ORDER if perm == tuple(range(len(at))) else perm
    return memo[key]


def _to_schema_order(entries: list[ModelEntry], perms: list[tuple[int, ...] | None],
                     hashes: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Puts the tensors of every entry saved in another order than its parent's schema
    into the schema's order (its fields and its rows of ``hashes``), so that tensors
    are compared and encoded by name. Returns the hashes, reordered where needed."""
    if all(not perm for perm in perms):
        return hashes
    rows = torch.arange(hashes.shape[0], dtype=torch.int64)
    at = 0
    for entry, perm in zip(entries, perms):
        if perm:
            entry.keys = tuple(entry.keys[i] for i in perm)
            entry.signature = tuple(entry.signature[i] for i in perm)
            entry.sources = [entry.sources[i] for i in perm]
            entry.ptrs = [entry.ptrs[i] for i in perm]
            rows[at : at + len(perm)] = torch.tensor(perm, dtype=torch.int64) + at
        at += len(entry.sources)
    return hashes[rows.to(hashes.device)]


Sizes = dict[Any, tuple[list[int], int]]  # signature -> (its tensors' byte sizes, their sum)


def _sizes(signature: Any, memo: Sizes) -> tuple[list[int], int]:
    """A signature's tensor byte sizes and their sum: from (dtype, shape), once per
    architecture (and per tensor order)."""
    got = memo.get(signature)
    if got is None:
        each = [math.prod(shape) * dt.itemsize for dt, shape in signature]
        got = memo[signature] = (each, sum(each))
    return got


def _validate_and_hash(
    models: Any, progress: Progress, sizes_memo: Sizes
) -> tuple[list[ModelEntry], torch.Tensor, int, torch.device | None]:
    """Validates the set and hashes every tensor: a hash thread works on the batches
    already validated while this thread validates the next (the kernel releases the GIL).
    A set that lives on one CUDA device is hashed there, in one call, once validated.
    Returns the models, the (tensors, 32) hashes (on that device, else the CPU), the
    set's logical bytes, and the device the rest of the save works on (None: the CPU)."""
    entries: list[ModelEntry] = []
    parts: list[Future[torch.Tensor]] = []
    ptrs: list[int] = []
    lens: list[int] = []
    logical = 0
    on_device = 0
    with ThreadPoolExecutor(1, thread_name_prefix="mmcore-hash") as pool:

        def submit() -> None:
            p, n = kernels.int64_table(ptrs), kernels.int64_table(lens)
            parts.append(pool.submit(kernels.blake3_segments, p, n, threads=1))
            ptrs.clear()
            lens.clear()

        try:
            for entry in iter_models(models, keep_cuda=True):
                entries.append(entry)  # holds the sources until every hash is done
                sizes = _sizes(entry.signature, sizes_memo)
                logical += sizes[1]
                if entry.device is not None:  # hashed below, where it lives
                    on_device += 1
                    progress(1)
                    continue
                ptrs.extend(entry.ptrs)
                lens.extend(sizes[0])
                if len(ptrs) >= _HASH_BATCH:
                    submit()
                progress(1)
            submit()
            host = torch.cat([f.result() for f in parts])
        finally:
            for f in parts:  # never leave a job reading freed sources
                f.cancel() or f.exception()
    if not on_device:
        return entries, host, logical, _work_device(entries)
    devices = {e.device for e in entries if e.sources}  # a model without tensors is anywhere
    if len(devices) == 1 and cuda.available():  # the whole set on one GPU: stay there
        device = devices.pop()
        assert device is not None
        return (
            entries,
            kernels.blake3_tensors([t for e in entries for t in e.sources]),
            logical,
            device,
        )
    for e in entries:  # on the CPU and on GPUs, or kernels not built: all to the host
        if e.device is not None:
            e.sources = [t.cpu() for t in e.sources]
            TRANSFERS.device_to_host += sum(t.numel() * t.element_size() for t in e.sources)
            e.ptrs, e.device = [t.data_ptr() for t in e.sources], None
    table = [(p, t.numel() * t.element_size()) for e in entries for p, t in zip(e.ptrs, e.sources)]
    hashes = kernels.blake3_segments(kernels.int64_table([p for p, _ in table]),
                                     kernels.int64_table([n for _, n in table]))  # fmt: skip
    return entries, hashes, logical, None


def _work_device(entries: list[ModelEntry]) -> torch.device | None:
    """Where a set held on the CPU is diffed and encoded: the CPU (None). The tests
    patch this to run the device path's code with CPU tensors."""
    return None


@dataclass
class Transfers:
    """Bytes an update save moved between a GPU and the host (a measurement aid for
    the benchmarks: reset by each update save, not meaningful across concurrent ones)."""

    device_to_host: int = 0
    host_to_device: int = 0
    encodings: int = 0  # of which: the encoded tensors (framed, before zstd)


TRANSFERS = Transfers()


_HASH_BATCH = 16384  # tensors per hash job


def write_update(store: Storage, writer: PackWriter, models: Any, parent: str, *,
                 tolerance: float | None, max_chain: int, max_recovery: float | None,
                 progress: Progress, saved_orders: dict[str, list[str]] | None = None,
                 derived_from: DerivedFrom = None, compress: bool = False) -> WrittenUpdate:  # fmt: skip
    """``saved_orders`` (a rebase): ``models`` come in the tensor order of their
    schemas, which is kept (versions stored against them were encoded in it): a model
    whose parent has it in another order is stored whole; these are the orders the
    models were saved in, recorded where they differ. ``derived_from``: which model of
    the parent each new model is stored as a delta of (``derived_sources``)."""
    with gc_paused():  # tens of thousands of small objects, no cycles among them
        return _write_update(store, writer, models, parent, tolerance=tolerance, max_chain=max_chain,
                             max_recovery=max_recovery, progress=progress,
                             saved_orders=saved_orders, derived_from=derived_from,
                             compress=compress)  # fmt: skip


def keyframe(info: chain.ModelInfo, whole: int, changed: int, max_recovery: float | None) -> bool:
    """Whether a model gets stored whole rather than as one more delta: when recovering
    it through its chain (its base, the bytes read and decoded by every delta since it
    was last whole, and this delta's, counted as its changed tensors' bytes) would cost
    more than ``max_recovery`` times recovering it whole."""
    return max_recovery is not None and whole + info.cost + changed > max_recovery * whole


@dataclass
class _Split:
    """How an update save stores each model of its set: unchanged (nothing), whole, or
    as a delta of the parent's model (with its first row in the hash tables)."""

    models: int
    tensors: int
    logical: int  # the set's bytes
    device: torch.device | None  # where the rest of the save works (None: the CPU)
    new_hashes: torch.Tensor  # (tensors, 32): every tensor of the set, each model's in
    parent_hashes: torch.Tensor  # its parent's schema order; the parent's hash of each row
    whole: list[ModelEntry]
    delta_rows: list[tuple[ModelEntry, chain.ModelInfo, int]]
    unchanged: int
    restored: int  # changed models stored whole again (max_chain, max_recovery)
    orders: dict[str, list[str]]  # tensor orders recorded where they differ from recovery's
    added: list[str]
    removed: list[str]
    model_order: list[str] | None  # the set's order, where it is not the one derived
    derived: dict[str, str] = field(default_factory=dict)  # new model stored as a delta of
    #                                                         the parent's model named
    order: list[str] = field(default_factory=list)  # the set's models, in its order
    given: dict[str, list[str]] = field(default_factory=dict)  # each derived model's tensor
    #                                                            order, as saved


def _write_update(store: Storage, writer: PackWriter, models: Any, parent: str, *,
                  tolerance: float | None, max_chain: int, max_recovery: float | None,
                  progress: Progress, saved_orders: dict[str, list[str]] | None,
                  derived_from: DerivedFrom, compress: bool) -> WrittenUpdate:  # fmt: skip
    TRANSFERS.device_to_host = TRANSFERS.host_to_device = TRANSFERS.encodings = 0
    sizes: Sizes = {}
    split = index = None
    if (isinstance(models, StackedInput) and saved_orders is None and derived_from is None
            and all(p.device.type == "cpu" for p in models.parts)):  # fmt: skip
        with decoding(parent):
            index = chain.model_index(store, parent)
        split = _split_stacked(models, index, max_chain, max_recovery, progress, sizes)
    if split is None:
        split = _split_entries(store, models, parent, index, max_chain, max_recovery, progress,
                               sizes, saved_orders, derived_from)  # fmt: skip
    deltas, delta_hashes, delta_parents = _deltas(split.delta_rows, split.new_hashes,
                                                  split.parent_hashes, split.derived)  # fmt: skip
    unchanged = split.unchanged
    if deltas:
        encoded = _encode(store, parent, deltas, delta_hashes, delta_parents, tolerance,
                          split.device)  # fmt: skip
        kept = {id(d) for d in encoded.deltas}
        for d in deltas:  # every change within tolerance: the parent's model
            if id(d) not in kept:
                if d.derived:  # new here: stored whole instead
                    _derived_whole(split, d.entry)
                else:
                    unchanged += 1
        deltas = encoded.deltas

    groups: list[GroupRecord] = []
    blobs: Blobs = []
    end = HEADER_SIZE
    whole_names: list[list[str]] = []
    coded = 0  # bytes compression saved on the models stored whole
    line = chain.chain_of(store, parent)  # as the chain is now (a rebase shortens it)
    if split.whole:
        TRANSFERS.device_to_host += sum(
            _sizes(e.signature, sizes)[1] for e in split.whole if e.device is not None
        )
        written = baseline.write_set(writer, {e.name: dict(zip(e.keys, e.sources)) for e in split.whole},
                                     lambda n: None, store.stored, chain_splits(line),
                                     compress)  # fmt: skip
        groups, blobs, end = written.groups, list(written.blobs), written.end
        coded = written.coded_saved
        whole_names = [[written.names[i] for i in g.positions()] for g in groups]
    delta_key = None
    payload = sum(g.payload_bytes() for g in groups) - coded
    metadata = sum(g.hash_bytes() for g in groups)
    derived_logical = derived_payload = 0
    if deltas:
        delta_key, rec, model_sizes, table_bytes = _write_deltas(store, writer, encoded, end)
        blobs.append((delta_key, rec))
        payload += sum(model_sizes)
        metadata += table_bytes
        for d, size in zip(deltas, model_sizes):  # (``info`` and ``du`` report them apart)
            if d.derived:
                derived_logical += _sizes(d.entry.signature, sizes)[1]
                derived_payload += size
    depth = len(line)
    stats = {"models": split.models, "tensors": split.tensors,
             "unchanged": unchanged, "changed": len(deltas) + split.restored, "delta": len(deltas),
             "whole": len(split.whole), "keyframes": split.restored, "added": len(split.added),
             "removed": len(split.removed), "derived": len(split.derived),
             "derived_bytes": derived_logical, "derived_payload_bytes": derived_payload,
             "payload_bytes": payload, "metadata_bytes": metadata,
             "max_delta_chain": max([int(d.info.depth) + 1 for d in deltas], default=0)}  # fmt: skip
    update = UpdateInfo(depth=depth, tolerance=tolerance, max_chain=max_chain, removed=split.removed,
                        added=split.added, whole=whole_names, changed=[d.entry.name for d in deltas],
                        delta_blob=delta_key, stats=stats, orders=split.orders,
                        model_order=split.model_order, max_recovery=max_recovery,
                        derived=split.derived)  # fmt: skip
    return WrittenUpdate(groups, blobs, update, split.logical)


def chain_splits(line: list[Manifest]) -> list[baseline.Split]:
    """The shared-tensor splits of the groups along a chain (``chain.chain_of``; each
    once): a model stored whole here may share its tensors with one of their rows."""
    seen: dict[Any, list[int]] = {}
    for m in line:
        for g in m.groups:
            if g.shared is not None:
                seen.setdefault((g.schema.layout_key(), tuple(g.shared.tensors)), g.shared.tensors)
    return [(key[0], tensors) for key, tensors in seen.items()]


def _derived_whole(split: _Split, entry: ModelEntry) -> None:
    """A model derived from another whose delta came out empty (every change within
    tolerance) is stored whole, as an added model; the set's order is recorded."""
    split.whole.append(entry)
    del split.derived[entry.name]
    split.orders.pop(entry.name, None)  # (relative to its source's order)
    given = split.given.get(entry.name)
    if given is not None and given != list(entry.keys):  # written in its source's order
        split.orders[entry.name] = given
    split.added.append(entry.name)
    split.model_order = split.order


def _stored_whole(info: chain.ModelInfo, whole_bytes: int, changed_bytes: int, max_chain: int,
                  max_recovery: float | None) -> bool:  # fmt: skip
    """Whether a changed model is stored whole again rather than as one more delta."""
    return info.depth + 1 > max_chain or keyframe(info, whole_bytes, changed_bytes, max_recovery)


def _set_order(order: list[str], index: dict[str, chain.ModelInfo], names: set[str],
               derived: Mapping[str, str] = {}) -> list[str] | None:  # fmt: skip
    """The set's model order where recovery would not derive it (the parent's models
    kept in its order, then the added ones, then those derived from another), else None."""
    new = [n for n in order if n not in index]
    given = ([n for n in index if n in names] + [n for n in new if n not in derived]
             + [n for n in new if n in derived])  # fmt: skip
    return order if order != given else None


def _split_entries(store: Storage, models: Any, parent: str,
                   index: dict[str, chain.ModelInfo] | None, max_chain: int,
                   max_recovery: float | None, progress: Progress, sizes: Sizes,
                   saved_orders: dict[str, list[str]] | None,
                   derived_from: DerivedFrom = None) -> _Split:  # fmt: skip
    """Any set: validated and hashed model by model, then compared in one step (with
    the parent's ``model_index``, read here unless given)."""
    entries, new_hashes, logical, device = _validate_and_hash(models, progress, sizes)
    if not entries:
        raise InvalidModelSetError("the model set is empty: pass at least one model")
    if index is None:
        with decoding(parent):
            index = chain.model_index(store, parent)
    memo: dict[Any, tuple[int, ...] | None] = {}
    sources = derived_sources(entries, new_hashes, index, parent, derived_from, memo)
    infos = [index.get(sources.get(e.name, e.name)) for e in entries]
    perms = [_schema_order(info, e, memo) for e, info in zip(entries, infos)]
    if saved_orders is not None:  # keep each model's layout: no delta across another order
        perms = [p if not p else None for p in perms]
    comparable = [p is not None for p in perms]
    saved = ([e.keys for e in entries] if saved_orders is None
             else [tuple(saved_orders.get(e.name, e.keys)) for e in entries])  # fmt: skip
    new_hashes = _to_schema_order(entries, perms, new_hashes)
    row_sizes: list[int] = []
    for entry in entries:
        row_sizes.extend(_sizes(entry.signature, sizes)[0])
    differs, changed_bytes, parent_hashes = _differing_tensors(
        [len(e.sources) for e in entries], kernels.int64_table(row_sizes), infos, comparable,
        new_hashes)  # fmt: skip
    orders: dict[str, list[str]] = {}
    whole: list[ModelEntry] = []
    delta_rows: list[tuple[ModelEntry, chain.ModelInfo, int]] = []
    unchanged = restored = 0
    row = 0
    for entry, info, same_schema, ndiff, nbytes, order in zip(entries, infos, comparable,
                                                              differs.tolist(),
                                                              changed_bytes.tolist(), saved):  # fmt: skip
        row += len(entry.sources)
        new = entry.name in sources  # derived from another model of the parent
        if info is None or not same_schema:
            whole.append(entry)  # stored in the order given: its schema's
            if order is not entry.keys and list(order) != list(entry.keys):  # (a rebase:
                orders[entry.name] = list(order)  # given in the schema's order)
            continue
        stored: Any = entry.keys  # the order recovery gives without a record
        if ndiff == 0 and not new:
            unchanged += 1
            stored = info.order or stored
        elif _stored_whole(
            info, _sizes(entry.signature, sizes)[1], nbytes, max_chain, max_recovery
        ):
            whole.append(entry)
            if new:
                sources.pop(entry.name)
            else:
                restored += 1
        else:
            delta_rows.append((entry, info, row - len(entry.sources)))
            stored = info.order or stored
        if order is not stored and list(order) != list(stored):
            orders[entry.name] = list(order)
    names = {e.name for e in entries}
    derived = {e.name: sources[e.name] for e, _, _ in delta_rows if e.name in sources}
    return _Split(len(entries), row, logical, device, new_hashes, parent_hashes, whole, delta_rows,
                  unchanged, restored, orders,
                  added=[e.name for e in entries if e.name not in index and e.name not in derived],
                  removed=[n for n in index if n not in names],
                  model_order=_set_order([e.name for e in entries], index, names, derived),
                  derived=derived, order=[e.name for e in entries],
                  given={e.name: list(o) for e, o in zip(entries, saved) if e.name in derived})  # fmt: skip


def derived_sources(entries: list[ModelEntry], new_hashes: torch.Tensor,
                    index: dict[str, chain.ModelInfo], parent: str, derived_from: DerivedFrom,
                    memo: dict[Any, tuple[int, ...] | None]) -> dict[str, str]:  # fmt: skip
    """{new model: the parent's model it is to be a delta of}, for the models of the set
    the parent lacks, by ``derived_from``: a mapping, a callable (None: no source), or
    ``"auto"``: the parent's model of the same architecture sharing the most tensor
    bytes with it (equal tensors, by hash; at least ``AUTO_SHARED`` of its bytes; ties:
    the first in the parent's order); else the one model of that architecture the
    parent holds, if there is exactly one (a family's base), else none. A source of
    another architecture is refused."""
    if derived_from is None:
        return {}
    new = [e for e in entries if e.name not in index]
    if isinstance(derived_from, str):
        if derived_from != "auto":
            raise InvalidArgumentError(
                f'derived_from must be a mapping, a callable or "auto", got {derived_from!r}'
            )
        return _auto_sources(entries, new_hashes, index, memo)
    if isinstance(derived_from, Mapping):
        given = {e.name for e in entries}
        for name, source in derived_from.items():
            if not isinstance(name, str) or not isinstance(source, str):
                raise InvalidArgumentError(
                    f"derived_from maps model names to model names, got {name!r}: {source!r}"
                )
            if name not in given:
                raise InvalidArgumentError(
                    f"derived_from names model {name!r}, which is not in the set"
                )
            if name in index:
                raise InvalidArgumentError(
                    f"derived_from names model {name!r}, which version {parent} holds: it is "
                    "stored as a delta of that model already"
                )
        chosen = {e.name: derived_from[e.name] for e in new if e.name in derived_from}
    elif callable(derived_from):
        chosen = {}
        for e in new:
            picked = derived_from(e.name)
            if picked is not None and not isinstance(picked, str):
                raise InvalidArgumentError(
                    f"derived_from({e.name!r}) returned {picked!r}: a model name of version "
                    f"{parent}, or None"
                )
            if picked is not None:
                chosen[e.name] = picked
    else:
        raise InvalidArgumentError(
            f'derived_from must be a mapping, a callable or "auto", got {type(derived_from).__name__}'
        )
    by_name = {e.name: e for e in new}
    for name, source in chosen.items():
        if source not in index:
            raise InvalidArgumentError(
                f"derived_from maps model {name!r} to {source!r}, which version {parent} does "
                f"not hold ({len(index)} models)"
            )
        if _schema_order(index[source], by_name[name], memo) is None:
            raise InvalidModelSetError(
                f"model {name!r} has other tensors (names, dtypes or shapes) than {source!r}, "
                "which it is derived from: a delta needs the same architecture"
            )
    return chosen


AUTO_SHARED = 1 / 16  # derived_from="auto": the least share of a model's bytes that pairs it


def _auto_sources(entries: list[ModelEntry], new_hashes: torch.Tensor,
                  index: dict[str, chain.ModelInfo],
                  memo: dict[Any, tuple[int, ...] | None]) -> dict[str, str]:  # fmt: skip
    """``derived_sources`` for ``"auto"``: one pass over the parent's hashes (hash ->
    the models holding it), one over the new models'. Shared tensors count by their
    bytes, and a source needs at least ``AUTO_SHARED`` of the new model's bytes (a step
    counter or an untouched bias equal everywhere does not make two models kin)."""
    new = [(e, i) for i, e in enumerate(entries) if e.name not in index]
    if not new:
        return {}
    names = list(index)
    starts = torch.tensor([0] + [len(e.sources) for e in entries]).cumsum(0).tolist()
    host = new_hashes.cpu().numpy()
    # tensor hash -> the parent's models holding it, for the hashes the new models hold:
    # the parent's rows matched by their first 8 bytes in one call (no loop over them)
    holders: dict[bytes, set[int]] = {}
    wanted = [r for _, i in new for r in range(starts[i], starts[i + 1])]
    if names and wanted:  # (models without tensors share nothing)
        rows = torch.cat([index[n].hashes for n in names]).contiguous()
        owner = torch.repeat_interleave(torch.arange(len(names)),
                                        torch.tensor([len(index[n].schema.tensors) for n in names]))  # fmt: skip
        mine = torch.from_numpy(host[wanted]).reshape(-1, kernels.HASH_SIZE).contiguous()
        first8 = rows.reshape(-1).view(torch.int64).view(-1, kernels.HASH_SIZE // 8)[:, 0]
        hits = torch.isin(
            first8, mine.reshape(-1).view(torch.int64).view(-1, kernels.HASH_SIZE // 8)[:, 0]
        )
        for j in hits.nonzero().flatten().tolist():
            holders.setdefault(rows[j].numpy().tobytes(), set()).add(int(owner[j]))
    by_schema: dict[int, list[int]] = {}  # the parent's models per architecture
    for at, name in enumerate(names):
        by_schema.setdefault(id(index[name].schema), []).append(at)
    schema_of = [id(index[name].schema) for name in names]
    out: dict[str, str] = {}
    for entry, i in new:
        fits = {sid for sid, ats in by_schema.items()
                if _schema_order(index[names[ats[0]]], entry, memo) is not None}  # fmt: skip
        shared: dict[int, int] = {}  # the parent's model -> bytes shared with it
        nbytes = [t.numel() * t.element_size() for t in entry.sources]
        for row, size in zip(host[starts[i] : starts[i + 1]], nbytes):
            for at in holders.get(row.tobytes(), ()):
                if schema_of[at] in fits:
                    shared[at] = shared.get(at, 0) + size
        best = max(shared.values(), default=0)
        if best and best >= AUTO_SHARED * sum(nbytes):
            out[entry.name] = names[min(at for at, n in shared.items() if n == best)]
        elif sum(len(by_schema[sid]) for sid in fits) == 1:
            out[entry.name] = names[by_schema[fits.pop()][0]]
    return out


def _split_stacked(models: StackedInput, index: dict[str, chain.ModelInfo], max_chain: int,
                   max_recovery: float | None, progress: Progress, sizes: Sizes) -> _Split | None:  # fmt: skip
    """A stacked set on the CPU whose every model the parent (``index``: its
    ``model_index``) holds in the same architecture and tensor order: hashed by one call
    over the stacks' row addresses and compared in one step; a model is made an entry
    only where it changed. None where the set is not of that kind (``_split_entries``
    takes it)."""
    parts = models.parts
    memo: dict[Any, tuple[int, ...] | None] = {}
    infos: list[chain.ModelInfo] = []
    for part in parts:
        mine = [index.get(n) for n in part.names]
        if any(info is None for info in mine):
            return None  # models the parent lacks: stored whole, model by model
        probe = ModelEntry(part.names[0], part.keys, part.signature, [], [])
        for info in {id(i.schema): i for i in mine if i is not None}.values():
            if _schema_order(info, probe, memo) != _SAME_ORDER:
                return None
        infos.extend(i for i in mine if i is not None)
    tables = [p.row_table() for p in parts]  # (n, tensors) addresses, model after model
    per = [kernels.int64_table(_sizes(p.signature, sizes)[0]) for p in parts]
    ptrs = torch.cat([t.reshape(-1) for t in tables])
    lens = torch.cat([s.repeat(len(p.names)) for s, p in zip(per, parts)])
    new_hashes = kernels.blake3_segments(ptrs, lens)
    progress(len(models))
    counts = [len(p.keys) for p in parts for _ in p.names]
    differs, changed_bytes, parent_hashes = _differing_tensors(
        counts, lens, infos, [True] * len(infos), new_hashes)  # fmt: skip
    count_t = kernels.int64_table(counts)
    first = count_t.cumsum(0) - count_t
    part_of = [i for i, p in enumerate(parts) for _ in p.names]
    row_of = [r for p in parts for r in range(len(p.names))]
    names = [n for p in parts for n in p.names]
    at = [i for p in parts for i in models.positions(p)]  # in the set's order
    whole: list[tuple[int, ModelEntry]] = []
    delta_rows: list[tuple[int, tuple[ModelEntry, chain.ModelInfo, int]]] = []
    changed = differs.nonzero().reshape(-1).tolist()
    for i, nbytes in zip(changed, changed_bytes[changed].tolist()):
        part, r = parts[part_of[i]], row_of[i]
        entry = ModelEntry(names[i], part.keys, part.signature, [c[r] for c in part.columns],
                           tables[part_of[i]][r].tolist())  # fmt: skip
        if _stored_whole(infos[i], _sizes(part.signature, sizes)[1], nbytes, max_chain,
                         max_recovery):  # fmt: skip
            whole.append((at[i], entry))
        else:
            delta_rows.append((at[i], (entry, infos[i], int(first[i]))))
    keyed = {i for i, _ in whole}
    keys_of = [p.keys for p in parts for _ in p.names]
    orders = {names[i]: list(keys_of[i]) for i, info in enumerate(infos)
              if info.order is not None and at[i] not in keyed
              and list(info.order) != list(keys_of[i])}  # fmt: skip
    kept = set(names)
    return _Split(len(names), len(lens), sum(_sizes(p.signature, sizes)[1] * len(p.names) for p in parts),
                  None, new_hashes, parent_hashes, [e for _, e in sorted(whole, key=lambda w: w[0])],
                  [d for _, d in sorted(delta_rows, key=lambda d: d[0])],
                  len(names) - len(changed), len(whole), orders, added=[],
                  removed=[n for n in index if n not in kept],
                  model_order=_set_order(models.order, index, kept))  # fmt: skip


def _deltas(rows: list[tuple[ModelEntry, chain.ModelInfo, int]], new_hashes: torch.Tensor,
            parent_hashes: torch.Tensor, derived: Mapping[str, str]
            ) -> tuple[list[_Delta], torch.Tensor, torch.Tensor]:  # fmt: skip
    """The delta models, their new hashes on the host (one row per tensor of every
    delta, in order: one gather and one copy of just their rows; the hashes of a set on
    a GPU stay there otherwise) and their parents' hashes, gathered by the same index
    (left where they are: only the CPU path reads them). Each delta's ``hashes`` are a
    view of its rows."""
    if not rows:
        empty = torch.empty((0, kernels.HASH_SIZE), dtype=torch.uint8)
        return [], empty, empty
    counts = kernels.int64_table([len(e.sources) for e, _, _ in rows])
    firsts = kernels.int64_table([first for _, _, first in rows])
    index = torch.repeat_interleave(firsts - (counts.cumsum(0) - counts), counts)
    index += torch.arange(index.numel())
    on = index.to(new_hashes.device)
    host = new_hashes[on].cpu()
    if new_hashes.device.type != "cpu":
        TRANSFERS.device_to_host += host.numel()
    out = [_Delta(entry, hashes, info, [], [], hashes, source=derived.get(entry.name, ""))
           for (entry, info, _), hashes in zip(rows, torch.split(host, counts.tolist()))]  # fmt: skip
    return out, host, parent_hashes[on]


def _differing_tensors(counts: list[int], row_sizes: torch.Tensor,
                       infos: Sequence[chain.ModelInfo | None], comparable: list[bool],
                       new_hashes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per model (``counts``: its tensors), how many of its tensors' hashes differ from
    the parent's, and their bytes (``row_sizes``: of each row), as int64 tensors on the
    CPU: one vectorised comparison over the whole table (models without a comparable
    parent: at least 1 tensor, all their bytes). Also the parent's hash of every row,
    where ``new_hashes`` are (zeros for rows without a comparable parent)."""
    tables: dict[
        int, tuple[int, torch.Tensor]
    ] = {}  # id -> (first row in the concatenation, table)
    starts = []
    rows_total = 0
    for info, ok in zip(infos, comparable):
        if not ok or info is None:
            starts.append(-1)
            continue
        if id(info.table) not in tables:
            tables[id(info.table)] = (rows_total, info.table)
            rows_total += info.table.shape[0]
        starts.append(tables[id(info.table)][0] + info.first)
    count_t = kernels.int64_table(counts)
    model_of = torch.repeat_interleave(torch.arange(len(counts)), count_t)
    if not tables:
        whole = torch.zeros(len(counts), dtype=torch.int64).index_add_(0, model_of, row_sizes)
        return count_t.clamp(min=1), whole, torch.zeros_like(new_hashes)
    device = new_hashes.device  # where the new hashes are: the parent's rows go there
    parent = torch.cat([t for _, t in tables.values()]).to(device)
    start_t = kernels.int64_table(starts)
    before = torch.cumsum(count_t, 0) - count_t
    rows = start_t[model_of] + (torch.arange(model_of.numel()) - before[model_of])
    valid = start_t[model_of] >= 0
    parent_rows = torch.zeros_like(new_hashes)
    on = valid.to(device)
    parent_rows[on] = parent[rows[valid].to(device)]
    same = ((new_hashes == parent_rows).all(dim=1) & on).cpu()
    flags = (~same).to(torch.int64)
    differ = torch.zeros(len(counts), dtype=torch.int64).index_add_(0, model_of, flags)
    nbytes = torch.zeros(len(counts), dtype=torch.int64).index_add_(0, model_of, flags * row_sizes)
    if device.type != "cpu":
        TRANSFERS.host_to_device += parent.numel() + on.numel()
        TRANSFERS.device_to_host += same.numel()
    incomparable = torch.tensor([not ok for ok in comparable], dtype=torch.bool)
    return torch.where(incomparable, differ.clamp(min=1), differ), nbytes, parent_rows


@dataclass
class _Blobs:
    """A save's deltas encoded, as tables over their rows: every tensor of every delta,
    delta after delta, each delta's in its schema's order."""

    deltas: list[_Delta]  # those with at least one tensor changed, in order
    kinds: torch.Tensor  # (rows,) int64: codec.SAME, XOR or QUANT
    lengths: torch.Tensor  # (rows,) int64: bytes of each encoding (0 where SAME)
    recovered: torch.Tensor  # (rows, 32) hashes of the tensors as recovery will produce them
    new_hashes: torch.Tensor  # (rows, 32) hashes of the new tensors
    new_ptrs: torch.Tensor  # (rows,) int64: where the new tensors are on the host (0: a GPU)
    nbytes: torch.Tensor  # (rows,) int64: the new tensors' bytes
    plan: _Plan | None  # where each delta's plain model blob is, to compress (the CPU)
    frames: list[Any] | None  # or each delta's model blob compressed already (a GPU)
    codecs: list[int]  # per delta: codec.ZSTD or codec.ZSTD_FRAMES
    keep: list[Any]  # what ``plan``, ``frames`` and ``new_ptrs`` point into


@dataclass
class _Plan:
    """Each delta's plain model blob, where it lies: in ``sources[where[i]]``, from
    address ``start[i]``, ``plain[i]`` bytes."""

    sources: list[torch.Tensor]
    where: torch.Tensor
    start: torch.Tensor
    plain: torch.Tensor

    def compress(self, lo: int, hi: int) -> tuple[list[memoryview], Any]:
        """The zstd frames of deltas ``lo`` to ``hi`` (one multi-frame call), and what
        holds them."""
        parts, order = [], []
        where, start, plain = self.where[lo:hi], self.start[lo:hi], self.plain[lo:hi]
        for b, source in enumerate(self.sources):
            mine = (where == b).nonzero().reshape(-1)
            if mine.numel():
                segments = torch.stack([start[mine] - source.data_ptr(), plain[mine]], dim=1)
                parts.append((kernels.tensor_view(source), kernels.tensor_bytes(segments)))
                order.append(mine)
        frames_out, hold = codec.compress_segments(parts)
        if len(order) == 1 and order[0].numel() == hi - lo:  # one buffer, blobs in order
            return frames_out, hold
        out: list[Any] = [None] * (hi - lo)
        for i, frame in zip(torch.cat(order).tolist() if order else [], frames_out):
            out[i] = frame
        return out, hold


def _encode(store: Storage, parent: str, deltas: list[_Delta], hashes: torch.Tensor,
            parent_hashes: torch.Tensor, tolerance: float | None,
            device: torch.device | None) -> _Blobs:  # fmt: skip
    """Encodes every changed tensor of ``deltas`` against the parent as recovered, and
    says where each delta's model blob lies (``_write_deltas`` compresses it);
    ``hashes``, ``parent_hashes``: the new tensors' and the parents' hashes, one row
    per tensor of every delta. On the CPU everything is done over tables
    (``_encode_rows``); on a GPU where the new tensors are, only the encodings come
    back (``_encode_on``)."""
    with decoding(parent):
        names, states, schemas, _ = chain._recover(
            store, parent, {d.source for d in deltas}, verify=True, records=device is None
        )
    if device is None:
        return _encode_rows(deltas, hashes, parent_hashes, states, schemas, tolerance)
    parents = {n: chain._plain_dict(states[n]) for n in names}
    _encode_on(device, parents, deltas, tolerance)
    return _blobs_of_pieces([d for d in deltas if any(k != codec.SAME for k in d.kinds)])


@dataclass
class _Columns:
    """Per architecture, the columns of its tensors (schema order) an encode needs."""

    nbytes: torch.Tensor
    widths: torch.Tensor  # xor-planes word widths
    kinds: torch.Tensor  # FLOAT_KINDS value, 0 where not a float
    itemsize: torch.Tensor
    lossy: torch.Tensor  # bool: quantized under a tolerance


def _columns(schema: Schema, tolerance: float | None, memo: dict[int, _Columns]) -> _Columns:
    got = memo.get(id(schema))
    if got is None:
        kinds = [dtypes.from_name(s.dtype) for s in schema.tensors]
        got = memo[id(schema)] = _Columns(
            kernels.int64_table([s.nbytes for s in schema.tensors]),
            kernels.int64_table([plane_width(dt) for dt in kinds]),
            kernels.int64_table([FLOAT_KINDS.get(dt, 0) for dt in kinds]),
            kernels.int64_table([dt.itemsize for dt in kinds]),
            torch.tensor([tolerance is not None and dt in FLOAT_KINDS
                          and not s.name.endswith(EXACT_SUFFIXES)
                          for dt, s in zip(kinds, schema.tensors)], dtype=torch.bool),
        )  # fmt: skip
    return got


def _encode_rows(deltas: list[_Delta], new_hashes: torch.Tensor, parent_hashes: torch.Tensor,
                 states: dict[str, Any], schemas: dict[str, Schema],
                 tolerance: float | None) -> _Blobs:  # fmt: skip
    """``_encode`` on the CPU, over tables: the parents' addresses (``chain.tensor_table``)
    and, per architecture, the columns of its tensors; then one xor-planes call for
    every exact change and one quantized call for every lossy one (its decode and hash,
    closed loop, one call each); then where each model blob lies (``_blob_plan``).
    Nothing is done per tensor."""
    n = len(deltas)
    counts = kernels.int64_table([len(d.entry.sources) for d in deltas])
    nrows = int(counts.sum())
    first = counts.cumsum(0) - counts
    model = torch.repeat_interleave(torch.arange(n), counts)
    new_ptrs = kernels.int64_table([p for d in deltas for p in d.entry.ptrs])
    # the parents' tensors: records by address, loose ones made contiguous (held in ``keep``)
    parent_ptrs, _, _, keep = chain.tensor_table(states, [d.source for d in deltas], schemas)
    cols = {name: torch.zeros(nrows, dtype=torch.int64)
            for name in ("nbytes", "widths", "kinds", "itemsize")}  # fmt: skip
    lossy = torch.zeros(nrows, dtype=torch.bool)
    memo: dict[int, _Columns] = {}
    by_schema: dict[int, tuple[_Columns, list[int]]] = {}  # per architecture, its deltas
    for i, d in enumerate(deltas):
        c = _columns(schemas[d.source], tolerance, memo)
        by_schema.setdefault(id(c), (c, []))[1].append(i)
    for c, members in by_schema.values():
        at = (
            first[kernels.int64_table(members)].unsqueeze(1) + torch.arange(len(c.nbytes))
        ).reshape(-1)
        k = len(members)
        for name in cols:
            cols[name][at] = getattr(c, name).repeat(k)
        lossy[at] = c.lossy.repeat(k)
    nbytes = cols["nbytes"]
    changed = (new_hashes != parent_hashes).any(dim=1)
    kinds = torch.zeros(nrows, dtype=torch.int64)  # codec.SAME
    lengths = torch.zeros(nrows, dtype=torch.int64)
    addresses = torch.zeros(nrows, dtype=torch.int64)  # of each encoding
    buffer_of = torch.full((nrows,), -1, dtype=torch.int64)  # which buffer holds it
    recovered = parent_hashes.clone()
    buffers: list[torch.Tensor] = []
    xor = (changed & ~lossy).nonzero().reshape(-1)
    if xor.numel():
        table = xor_planes_encode_table(new_ptrs[xor], parent_ptrs[xor], nbytes[xor],
                                        cols["widths"][xor])  # fmt: skip
        kinds[xor] = codec.XOR
        lengths[xor] = table.offsets[1:] - table.offsets[:-1]
        addresses[xor] = table.offsets[:-1] + table.buf.data_ptr()
        buffer_of[xor] = len(buffers)
        buffers.append(table.buf)
        recovered[xor] = new_hashes[xor]
    quant = (changed & lossy).nonzero().reshape(-1)
    if quant.numel():
        assert tolerance is not None
        kept, got, buf, offsets = _quantize_rows(quant, new_ptrs, parent_ptrs, nbytes,
                                                 cols["kinds"], cols["itemsize"], parent_hashes,
                                                 tolerance)  # fmt: skip
        rows_kept = quant[kept]
        kinds[rows_kept] = codec.QUANT
        lengths[rows_kept] = (offsets[1:] - offsets[:-1])[kept]
        addresses[rows_kept] = offsets[:-1][kept] + buf.data_ptr()
        buffer_of[rows_kept] = len(buffers)
        buffers.append(buf)
        recovered[rows_kept] = got[kept]
    del keep  # (the parents' contiguous copies: every encoding is made)
    # deltas left with no change (every change within tolerance) are the parent's models
    live = torch.zeros(n, dtype=torch.int64).index_add_(0, model, (kinds != codec.SAME).long()) > 0
    if not bool(live.all()):
        row_live = live[model]
        deltas = [d for d, ok in zip(deltas, live.tolist()) if ok]
        kinds, lengths, addresses, buffer_of = (kinds[row_live], lengths[row_live],
                                                addresses[row_live], buffer_of[row_live])  # fmt: skip
        recovered, new_hashes = recovered[row_live], new_hashes[row_live]
        new_ptrs, nbytes = new_ptrs[row_live], nbytes[row_live]
        counts = counts[live]
    plan = _blob_plan(counts, kinds, lengths, addresses, buffer_of, buffers)
    return _Blobs(deltas, kinds, lengths, recovered, new_hashes, new_ptrs, nbytes, plan, None,
                  [codec.ZSTD] * len(deltas), [buffers])  # fmt: skip


def _quantize_rows(rows: torch.Tensor, new_ptrs: torch.Tensor, parent_ptrs: torch.Tensor,
                   nbytes: torch.Tensor, kinds: torch.Tensor, itemsize: torch.Tensor,
                   parent_hashes: torch.Tensor, tolerance: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The quantized encodings of ``rows`` (one call), decoded as recovery will (one
    call) and hashed (one call). Returns which to keep (those whose decoded tensor
    differs from the parent's: the rest stay the parent's), their decoded hashes, and
    the encodings' buffer and offsets."""
    size, kind = itemsize[rows], kinds[rows]
    numel = nbytes[rows] // size
    buf, offsets = quantize_encode_table(new_ptrs[rows], parent_ptrs[rows], numel, kind, size,
                                         tolerance)  # fmt: skip
    out_at = torch.zeros(rows.numel(), dtype=torch.int64)
    padded = (nbytes[rows] + 15) // 16 * 16
    torch.cumsum(padded[:-1], 0, out=out_at[1:])
    out = torch.empty(int(padded.sum()), dtype=torch.uint8)
    outs = out_at + out.data_ptr()
    bad = quantize_decode_table(offsets[:-1] + buf.data_ptr(), offsets[1:] - offsets[:-1],
                                parent_ptrs[rows], outs, kind, size, numel)  # fmt: skip
    if bad is not None:  # the encoder's own output: a defect, never the user's input
        raise KernelError(f"quantize_encode wrote an encoding its decoder refuses (segment {bad})")
    got = kernels.blake3_segments(outs, nbytes[rows].contiguous())
    del out
    kept = (got != parent_hashes[rows]).any(dim=1)
    return kept, got, buf, offsets


def _blob_plan(counts: torch.Tensor, kinds: torch.Tensor, lengths: torch.Tensor,
               addresses: torch.Tensor, buffer_of: torch.Tensor, buffers: list[torch.Tensor]) -> _Plan:  # fmt: skip
    """Where each delta's (``counts`` rows each) plain model blob, its encodings in row
    order, lies: where they lie back to back in one buffer, there; the others are
    gathered first into one more buffer (one native call)."""
    n = counts.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return _Plan([], empty, empty, empty)
    model = torch.repeat_interleave(torch.arange(n), counts)
    pieces = (kinds != codec.SAME).nonzero().reshape(-1)  # every encoding, in row order
    owner = model[pieces]
    start, length = addresses[pieces], lengths[pieces]
    plain = torch.zeros(n, dtype=torch.int64).index_add_(0, owner, length)
    # a delta is one span when each of its pieces starts where the one before ends
    follows = owner[1:] == owner[:-1]
    breaks = follows & ((start[1:] != start[:-1] + length[:-1])
                        | (buffer_of[pieces][1:] != buffer_of[pieces][:-1]))  # fmt: skip
    split = torch.zeros(n, dtype=torch.int64).index_add_(0, owner[1:], breaks.long()) > 0
    lead = torch.ones(pieces.numel(), dtype=torch.bool)
    lead[1:] = ~follows  # each delta's first piece
    first_start = torch.zeros(n, dtype=torch.int64)
    first_start[owner[lead]] = start[lead]
    first_buffer = torch.zeros(n, dtype=torch.int64)
    first_buffer[owner[lead]] = buffer_of[pieces][lead]
    sources = [*buffers]
    where = first_buffer.clone()
    if bool(split.any()):  # gathered, delta after delta, into one more buffer
        rows = split[owner]
        lens = length[rows]
        mixed = torch.empty(int(lens.sum()), dtype=torch.uint8)
        kernels.gather(mixed, start[rows].contiguous(), lens.contiguous(), lens.cumsum(0) - lens)
        at = plain[split].cumsum(0) - plain[split]
        first_start[split] = at + mixed.data_ptr()
        where[split] = len(sources)
        sources.append(mixed)
    return _Plan(sources, where, first_start, plain)


def _blobs_of_pieces(deltas: list[_Delta]) -> _Blobs:
    """``_Blobs`` of deltas encoded tensor by tensor (``_encode_on``): their tables
    from each delta's kinds and pieces; blobs not compressed where they were encoded
    compressed on the host."""
    on_host = [d for d in deltas if d.frames is None]
    packed = iter(codec.compress_many([[kernels.tensor_view(p) for p in d.pieces if p is not None]
                                       for d in on_host]))  # fmt: skip
    frames_out = [d.frames if d.frames is not None else next(packed) for d in deltas]
    codecs = [codec.ZSTD_FRAMES if d.frames is not None else codec.ZSTD for d in deltas]
    sizes: Sizes = {}
    return _Blobs(
        deltas,
        kernels.int64_table([k for d in deltas for k in d.kinds]),
        kernels.int64_table([0 if p is None else p.numel() for d in deltas for p in d.pieces]),
        torch.cat([d.recovered for d in deltas]) if deltas else torch.empty((0, 32), dtype=torch.uint8),
        torch.cat([d.hashes for d in deltas]) if deltas else torch.empty((0, 32), dtype=torch.uint8),
        kernels.int64_table([p if d.entry.device is None else 0 for d in deltas for p in d.entry.ptrs]),
        kernels.int64_table([s for d in deltas for s in _sizes(d.entry.signature, sizes)[0]]),
        None, frames_out, codecs, [[d.pieces for d in deltas]],
    )  # fmt: skip


_Job = tuple[_Delta, int, torch.Tensor, torch.Tensor]  # delta, tensor index, new, parent (flat)


# Tensors kept exact under a tolerance: normalisation statistics. An absolute error
# that is nothing to a weight can turn a small running variance negative (seen in the
# benchmark harness: MobileNetV2 fine-tunes fell from 94% to 19% top-1 at 1e-4).
EXACT_SUFFIXES = ("running_mean", "running_var")


def _changed_tensors(deltas: list[_Delta], parents: dict[str, dict[str, torch.Tensor]],
                     tolerance: float | None) -> dict[int, list[_Job]]:  # fmt: skip
    """Starts every delta as unchanged and sorts its changed tensors (hash differing
    from the parent's) by the encoding they get: quantized (a float with a tolerance)
    or xor-planes."""
    jobs: dict[int, list[_Job]] = {codec.XOR: [], codec.QUANT: []}
    for d in deltas:
        old = [parents[d.source][k] for k in d.entry.keys]  # by name: its saved order may differ
        d.kinds = [codec.SAME] * len(old)
        d.pieces = [None] * len(old)
        same = (d.hashes == d.info.hashes).all(dim=1).tolist()
        for t, (new, before) in enumerate(zip(d.entry.sources, old)):
            if not same[t]:
                lossy = (tolerance is not None and new.dtype in FLOAT_KINDS
                         and not d.entry.keys[t].endswith(EXACT_SUFFIXES))  # fmt: skip
                jobs[codec.QUANT if lossy else codec.XOR].append((d, t, new, before))
    return jobs


def _take_quantized(batch: list[_Job], encs: list[torch.Tensor], recovered: torch.Tensor) -> None:
    """Records each quantized encoding, or none where what recovery would give hashes
    as the parent's tensor (every element within tolerance of it: the parent's stays)."""
    for (d, t, _, _), enc, h in zip(batch, encs, recovered):
        if torch.equal(h, d.info.hashes[t]):
            d.recovered[t] = d.info.hashes[t]
            continue
        d.kinds[t], d.pieces[t], d.recovered[t] = codec.QUANT, enc, h


def _encode_on(device: torch.device, parents: dict[str, dict[str, torch.Tensor]],
               deltas: list[_Delta], tolerance: float | None) -> None:  # fmt: skip
    """``_encode`` where the new tensors live on ``device``: the parents go there in one
    copy, the encode (and, for quantized, the decode and hash of what recovery will
    give) run there, and only the hashes and the encodings come back, in one copy
    each; where nvCOMP is installed, the encodings are compressed there first and
    only the compressed model blobs come back (``frames.for_device``)."""
    compress = frames.for_device(device)
    back = (lambda encs: encs) if compress else _to_host
    for d in deltas:
        d.recovered = d.hashes.clone()  # (set per tensor below)
    jobs = _changed_tensors(deltas, parents, tolerance)
    for kind, batch in jobs.items():
        if not batch:
            continue
        befores = _to_device([j[3].reshape(-1) for j in batch], device)
        news = [j[2].reshape(-1) for j in batch]
        if kind == codec.XOR:
            encs, _ = xor_planes_encode(news, befores)
            for (d, t, _, _), enc in zip(batch, back(encs)):
                d.kinds[t], d.pieces[t] = codec.XOR, enc
            continue
        assert tolerance is not None
        encs, _ = quantize_encode(news, befores, tolerance)
        got = kernels.blake3_tensors(quantize_decode(encs, befores)).cpu()
        if device.type != "cpu":
            TRANSFERS.device_to_host += got.numel()
        _take_quantized(batch, back(encs), got)
    if compress:
        _compress_on(device, deltas, compress)


def _compress_on(device: torch.device, deltas: list[_Delta], compress: frames.Compressor) -> None:
    """Each delta's model blob (its encodings back to back, as _write_deltas lays
    them out) built on ``device`` by one gather and compressed there: its frames."""
    spans, srcs, offsets, at = [], [], [], 0
    for d in deltas:
        start = at
        for piece in d.pieces:
            if piece is not None:
                srcs.append(piece)
                offsets.append(at)
                at += piece.numel()
        spans.append((start, at - start))
        at = -(-at // frames.ALIGN) * frames.ALIGN
    buf = torch.empty(at, dtype=torch.uint8, device=device)
    kernels.gather_tensors(buf, srcs, offsets)
    for d, z in zip(deltas, compress(buf, spans)):
        d.frames = z
        TRANSFERS.device_to_host += len(z)


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors copied to ``device`` in one transfer: packed into one host buffer
    (each piece 16-byte aligned, by one native gather), copied, and viewed again."""
    keep = [t.contiguous() for t in tensors]  # (on the CPU too: how the tests run this)
    sizes = [t.numel() * t.element_size() for t in keep]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 16) * 16)
    host = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    kernels.gather(host, kernels.int64_table([t.data_ptr() for t in keep]), kernels.int64_table(sizes),
                   kernels.int64_table(starts[:-1]))  # fmt: skip
    on = host.to(device, non_blocking=False)
    TRANSFERS.host_to_device += host.numel()
    return [on[a : a + n].view(t.dtype).view(t.shape) if n else torch.empty(t.shape, dtype=t.dtype, device=device)
            for t, a, n in zip(keep, starts, sizes)]  # fmt: skip


def _to_host(encodings: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device encodings (uint8) brought to the host in one copy, split again."""
    if not encodings:  # (on the CPU too, copying: how the tests run this)
        return encodings
    flat = torch.cat([e.reshape(-1) for e in encodings]).cpu()
    TRANSFERS.device_to_host += flat.numel()
    TRANSFERS.encodings += flat.numel()
    return list(torch.split(flat, [e.numel() for e in encodings]))


_CHUNK = 16 << 20  # plain model-blob bytes compressed per call, while the ones before are written


def _chunks(plain: torch.Tensor) -> list[tuple[int, int]]:
    """Consecutive ranges of deltas of about ``_CHUNK`` plain bytes each."""
    n = plain.numel()
    if n == 0:
        return []
    ends = torch.searchsorted(
        plain.cumsum(0), torch.arange(1, int(plain.sum()) // _CHUNK + 1) * _CHUNK
    )
    cuts = sorted({0, n, *(min(n, int(e) + 1) for e in ends)})
    return list(zip(cuts[:-1], cuts[1:]))


def _write_deltas(
    store: Storage, writer: PackWriter, b: _Blobs, end: int
) -> tuple[bytes, ContentRecord, list[int], int]:
    """Writes the model blobs, then the tables and hashes; returns the blob key, its
    content record, each model blob's bytes and the tables' and hashes' bytes.

    The blobs are compressed a chunk at a time while a writer thread writes the chunk
    before (one vectored write each). A blob whose frame is not smaller than its
    changed tensors' raw bytes is stored as those bytes (codec NONE): recovery then
    gives the new tensors exactly."""
    n = len(b.deltas)
    counts = kernels.int64_table([len(d.entry.sources) for d in b.deltas])
    model = torch.repeat_interleave(torch.arange(n), counts)
    changed = b.kinds != codec.SAME
    raw_size = torch.zeros(n, dtype=torch.int64).index_add_(
        0, model, torch.where(changed, b.nbytes, 0)
    )
    row_first = [0, *counts.cumsum(0).tolist()]
    datas: list[Any] = [None] * n
    sizes: list[int] = [0] * n
    codecs = list(b.codecs)
    stored_raw = torch.zeros(n, dtype=torch.bool)
    hold: list[Any] = []
    start = align_up(end, 64)
    offset = start
    plain_sizes = b.plan.plain if b.plan is not None else raw_size
    with ThreadPoolExecutor(1, thread_name_prefix="mmcore-write") as pool:
        writes: list[Future[None]] = []
        try:
            for lo, hi in _chunks(plain_sizes):
                if b.plan is not None:
                    frames_out, held = b.plan.compress(lo, hi)
                    hold.append(held)
                else:
                    assert b.frames is not None
                    frames_out = b.frames[lo:hi]
                got = kernels.int64_table([memoryview(f).nbytes for f in frames_out])
                raw = got >= raw_size[lo:hi]
                stored_raw[lo:hi] = raw
                datas[lo:hi] = frames_out
                if bool(raw.any()):
                    hold.append(_raw_blobs(b, lo, hi, raw, raw_size, row_first, datas, codecs))
                len_t = torch.where(raw, raw_size[lo:hi], got)
                sizes[lo:hi] = len_t.tolist()
                ptrs = kernels.int64_table([kernels.buffer_address(data) for data in datas[lo:hi]])
                writes.append(pool.submit(writer.write_segments, offset, ptrs, len_t,
                                          len_t.cumsum(0) - len_t, int(len_t.sum())))  # fmt: skip
                offset += int(len_t.sum())
        finally:
            for w in writes:  # never leave a write reading freed buffers
                w.exception()
        for w in writes:
            w.result()
    kinds, lengths, hashes = b.kinds, b.lengths, b.recovered
    if bool(stored_raw.any()):
        raw_rows = changed & stored_raw[model]
        kinds = torch.where(raw_rows, codec.RAW, kinds)
        lengths = torch.where(raw_rows, b.nbytes, lengths)
        hashes = hashes.clone()
        hashes[raw_rows] = b.new_hashes[raw_rows]  # recovery gives the new tensors
    plains = torch.zeros(n, dtype=torch.int64).index_add_(0, model, lengths)
    # each tensor's offset in its model's plain blob: the bytes of the tensors before it
    before = lengths.cumsum(0) - lengths
    model_first = counts.cumsum(0) - counts
    at_t = before - before[model_first].repeat_interleave(counts)
    tensor_rows = torch.stack([kinds, at_t, lengths], dim=1)
    depths = kernels.int64_table([int(d.info.depth) + 1 for d in b.deltas])
    sizes_t = kernels.int64_table(sizes)
    columns = [sizes_t, plains, counts, depths, kernels.int64_table(codecs)]
    hashes = hashes.contiguous()
    first_start = start
    while True:
        offsets = sizes_t.cumsum(0) - sizes_t + start
        table = delta_blob.encode_tables(torch.stack([offsets, *columns], dim=1), tensor_rows)
        key = delta_blob.blob_key(table, hashes)
        # The key covers the tables and the recovered tensors' hashes, not the model
        # blobs: the same tables over other bytes (deltas of the same tensors against
        # another parent, laid out alike in another pack) must not share it.
        if not _holds_other_bytes(store, key, start, datas, sizes_t):
            break
        start += 64  # other offsets in the tables, so another key
    offset = start + int(sizes_t.sum())
    table_at = align_up(offset, 64)
    hashes_at = align_up(table_at + len(table), 64)
    pieces: list[Any] = [table, kernels.tensor_bytes(hashes)]
    places = [table_at, hashes_at]
    base = offset  # after the blobs written above (a write zeroes what it does not cover)
    if start != first_start:  # laid out again: every blob rewritten, zeros before them
        pieces = [*datas, *pieces]
        places = offsets.tolist() + places
        base = first_start
    lens = [memoryview(p).nbytes for p in pieces]
    writer.write_segments(base, kernels.int64_table([kernels.buffer_address(p) for p in pieces]),
                          kernels.int64_table(lens), kernels.int64_table(places) - base,
                          hashes_at + hashes.numel() - base)  # fmt: skip
    del pieces, hold
    rec = ContentRecord(
        writer.pack_id, [], hashes_at, hashes.numel(), refs=1, table=(table_at, len(table))
    )
    return key, rec, sizes, len(table) + hashes.numel()


def _raw_blobs(b: _Blobs, lo: int, hi: int, raw: torch.Tensor, raw_size: torch.Tensor,
               row_first: list[int], datas: list[Any], codecs: list[int]) -> torch.Tensor:  # fmt: skip
    """Puts in ``datas`` the raw changed tensors of deltas ``lo`` to ``hi`` flagged
    ``raw``, and their codec NONE in ``codecs``: those on the host gathered by one
    native call into the buffer returned (held by the caller while written)."""
    rows = slice(row_first[lo], row_first[hi])
    counts = kernels.int64_table([row_first[i + 1] - row_first[i] for i in range(lo, hi)])
    mask = raw.repeat_interleave(counts) & (b.kinds[rows] != codec.SAME) & (b.new_ptrs[rows] != 0)
    lens = b.nbytes[rows][mask]
    gathered = torch.empty(int(lens.sum()), dtype=torch.uint8)
    if lens.numel():
        kernels.gather(gathered, b.new_ptrs[rows][mask].contiguous(), lens.contiguous(),
                       lens.cumsum(0) - lens)  # fmt: skip
    view, at = kernels.tensor_view(gathered), 0
    picked = raw.nonzero().reshape(-1) + lo
    for i, size in zip(picked.tolist(), raw_size[picked].tolist()):
        d = b.deltas[i]
        codecs[i] = codec.NONE
        if d.entry.device is None:
            datas[i] = view[at : at + size]
            at += size
            continue
        own = [_host(d.entry.sources[t]).contiguous() for t, p in enumerate(d.pieces)
               if p is not None]  # fmt: skip
        datas[i] = b"".join(kernels.tensor_view(r) for r in own)  # (own held meanwhile)
    return gathered


def _holds_other_bytes(store: Storage, key: bytes, start: int,
                       datas: list[bytes | memoryview], lens: torch.Tensor) -> bool:  # fmt: skip
    """Whether the store has a delta blob under ``key`` whose model blobs (back to back
    from offset ``start``, shifted by its record's ``shift``) are not ``datas`` (``lens``
    bytes each; one that cannot be read counts as other bytes): one read of their span,
    compared with the blobs gathered by one native call."""
    raw = store.catalog.get("content", key)
    if raw is None:
        return False
    try:
        rec = ContentRecord.decode(raw)
        total = int(lens.sum())
        if not total:
            return False
        store.reader.check_in_pack(rec, [(start + rec.shift, total)])
        got = torch.empty(total, dtype=torch.uint8)
        store.tier.read_into(rec.pack, start + rec.shift, total, got.data_ptr())
    except MMCoreError:
        return True
    want = torch.empty(total, dtype=torch.uint8)
    kernels.gather(want, kernels.int64_table([kernels.buffer_address(d) for d in datas]), lens,
                   lens.cumsum(0) - lens)  # fmt: skip
    return not torch.equal(got, want)


def _host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    TRANSFERS.device_to_host += t.numel() * t.element_size()
    return t.cpu()
