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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import codec, dtypes, kernels
from .._gc import gc_paused
from ..codec import frames
from ..errors import InvalidModelSetError, KernelError, MMCoreError, decoding
from ..kernels import cuda
from ..kernels.delta import (
    FLOAT_KINDS,
    plane_width,
    quantize_decode,
    quantize_encode,
    xor_planes_encode,
)
from ..kernels.quantized import quantize_decode_table
from ..kernels.xor_planes import xor_planes_encode_table
from ..manifest import ContentRecord, GroupRecord, UpdateInfo
from ..modelset import ModelEntry, iter_models
from ..store.packs import HEADER_SIZE, PackWriter, align_up
from . import baseline, chain, delta_blob

if TYPE_CHECKING:
    from ..api import ModelStore

Progress = Callable[[int], None]


@dataclass
class WrittenUpdate:
    groups: list[GroupRecord]
    blobs: list[tuple[bytes, ContentRecord]]
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
    span: torch.Tensor | None = None  # every piece, back to back in one buffer (xor-planes
    #                                   encodings of one table): compressed as one view


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


def write_update(store: ModelStore, writer: PackWriter, models: Any, parent: str, *,
                 tolerance: float | None, max_chain: int, max_recovery: float | None,
                 progress: Progress, saved_orders: dict[str, list[str]] | None = None) -> WrittenUpdate:  # fmt: skip
    """``saved_orders`` (a rebase): ``models`` come in the tensor order of their
    schemas, which is kept (versions stored against them were encoded in it): a model
    whose parent has it in another order is stored whole; these are the orders the
    models were saved in, recorded where they differ."""
    with gc_paused():  # tens of thousands of small objects, no cycles among them
        return _write_update(store, writer, models, parent, tolerance=tolerance, max_chain=max_chain,
                             max_recovery=max_recovery, progress=progress,
                             saved_orders=saved_orders)  # fmt: skip


def keyframe(info: chain.ModelInfo, whole: int, changed: int, max_recovery: float | None) -> bool:
    """Whether a model gets stored whole rather than as one more delta: when recovering
    it through its chain (its base, the bytes read and decoded by every delta since it
    was last whole, and this delta's, counted as its changed tensors' bytes) would cost
    more than ``max_recovery`` times recovering it whole."""
    return max_recovery is not None and whole + info.cost + changed > max_recovery * whole


def _write_update(store: ModelStore, writer: PackWriter, models: Any, parent: str, *,
                  tolerance: float | None, max_chain: int, max_recovery: float | None,
                  progress: Progress, saved_orders: dict[str, list[str]] | None) -> WrittenUpdate:  # fmt: skip
    TRANSFERS.device_to_host = TRANSFERS.host_to_device = TRANSFERS.encodings = 0
    sizes: Sizes = {}
    entries, new_hashes, logical, device = _validate_and_hash(models, progress, sizes)
    if not entries:
        raise InvalidModelSetError("the model set is empty: pass at least one model")
    with decoding(parent):
        index = chain.model_index(store, parent)
    infos = [index.get(e.name) for e in entries]
    memo: dict[Any, tuple[int, ...] | None] = {}
    perms = [_schema_order(info, e, memo) for e, info in zip(entries, infos)]
    if saved_orders is not None:  # keep each model's layout: no delta across another order
        perms = [p if not p else None for p in perms]
    comparable = [p is not None for p in perms]
    saved = [tuple((saved_orders or {}).get(e.name, e.keys)) for e in entries]
    new_hashes = _to_schema_order(entries, perms, new_hashes)
    differs, changed_bytes = _differing_tensors(entries, infos, comparable, new_hashes, sizes)
    orders: dict[str, list[str]] = {}
    whole: list[ModelEntry] = []
    delta_rows: list[tuple[ModelEntry, chain.ModelInfo, int]] = []
    unchanged = restored = 0
    row = 0
    for entry, info, same_schema, ndiff, nbytes, order in zip(entries, infos, comparable, differs,
                                                              changed_bytes, saved):  # fmt: skip
        row += len(entry.sources)
        if info is None or not same_schema:
            whole.append(entry)  # stored in the order given: its schema's
            if list(order) != list(entry.keys):  # (a rebase: given in the schema's order)
                orders[entry.name] = list(order)
            continue
        stored: Any = entry.keys  # the order recovery gives without a record
        if ndiff == 0:
            unchanged += 1
            stored = info.order or stored
        elif info.depth + 1 > max_chain or keyframe(
            info, _sizes(entry.signature, sizes)[1], nbytes, max_recovery
        ):
            whole.append(entry)
            restored += 1
        else:
            delta_rows.append((entry, info, row - len(entry.sources)))
            stored = info.order or stored
        if list(order) != list(stored):
            orders[entry.name] = list(order)
    deltas = _deltas(delta_rows, new_hashes)
    names = {e.name for e in entries}
    added = [e.name for e in entries if e.name not in index]
    removed = [n for n in index if n not in names]
    in_order = [e.name for e in entries]
    derived = [n for n in index if n in names] + added  # the order recovery gives unrecorded
    model_order = in_order if in_order != derived else None
    if deltas:
        _encode(store, parent, deltas, tolerance, device)
        kept = [d for d in deltas if any(k != codec.SAME for k in d.kinds)]
        unchanged += len(deltas) - len(kept)  # every change within tolerance: the parent's
        deltas = kept

    groups: list[GroupRecord] = []
    blobs: list[tuple[bytes, ContentRecord]] = []
    end = HEADER_SIZE
    whole_names: list[list[str]] = []
    if whole:
        TRANSFERS.device_to_host += sum(
            _sizes(e.signature, sizes)[1] for e in whole if e.device is not None
        )
        written = baseline.write_set(writer, {e.name: dict(zip(e.keys, e.sources)) for e in whole},
                                     lambda n: None)  # fmt: skip
        groups, blobs, end = written.groups, list(written.blobs), written.end
        whole_names = [[written.names[i] for i in g.positions()] for g in groups]
    delta_key = None
    payload = sum(g.count * g.schema.stride for g in groups)
    metadata = sum(g.count * len(g.schema.tensors) * kernels.HASH_SIZE for g in groups)
    if deltas:
        delta_key, rec, model_bytes, table_bytes = _write_deltas(store, writer, deltas, end)
        blobs.append((delta_key, rec))
        payload += model_bytes
        metadata += table_bytes
    depth = len(chain.chain_of(store, parent))  # as the chain is now (a rebase shortens it)
    stats = {"models": len(entries), "tensors": sum(len(e.sources) for e in entries),
             "unchanged": unchanged, "changed": len(deltas) + restored, "delta": len(deltas),
             "whole": len(whole), "keyframes": restored, "added": len(added), "removed": len(removed),
             "payload_bytes": payload, "metadata_bytes": metadata,
             "max_delta_chain": max([int(d.info.depth) + 1 for d in deltas], default=0)}  # fmt: skip
    update = UpdateInfo(depth=depth, tolerance=tolerance, max_chain=max_chain, removed=removed,
                        added=added, whole=whole_names, changed=[d.entry.name for d in deltas],
                        delta_blob=delta_key, stats=stats, orders=orders,
                        model_order=model_order, max_recovery=max_recovery)  # fmt: skip
    return WrittenUpdate(groups, blobs, update, logical)


def _deltas(
    rows: list[tuple[ModelEntry, chain.ModelInfo, int]], new_hashes: torch.Tensor
) -> list[_Delta]:
    """The delta models with their new hashes on the host: one gather and one copy
    of just their rows (the hashes of a set on a GPU stay there otherwise)."""
    if not rows:
        return []
    index = torch.cat([torch.arange(first, first + len(e.sources)) for e, _, first in rows])
    host = new_hashes[index.to(new_hashes.device)].cpu()
    if new_hashes.device.type != "cpu":
        TRANSFERS.device_to_host += host.numel()
    out, at = [], 0
    for entry, info, _ in rows:
        hashes = host[at : at + len(entry.sources)]
        at += len(entry.sources)
        out.append(_Delta(entry, hashes, info, [], [], hashes.clone()))
    return out


def _differing_tensors(entries: list[ModelEntry], infos: list[chain.ModelInfo | None],
                       comparable: list[bool], new_hashes: torch.Tensor,
                       sizes_memo: Sizes) -> tuple[list[int], list[int]]:  # fmt: skip
    """Per model, how many of its tensors' hashes differ from the parent's, and their
    bytes: one vectorised comparison over the whole table (models without a comparable
    parent: 1 tensor, all their bytes)."""
    tables: dict[
        int, tuple[int, torch.Tensor]
    ] = {}  # id -> (first row in the concatenation, table)
    starts, counts = [], []
    rows_total = 0
    for entry, info, ok in zip(entries, infos, comparable):
        counts.append(len(entry.sources))
        if not ok or info is None:
            starts.append(-1)
            continue
        if id(info.table) not in tables:
            tables[id(info.table)] = (rows_total, info.table)
            rows_total += info.table.shape[0]
        starts.append(tables[id(info.table)][0] + info.first)
    if not tables:
        return [1] * len(entries), [_sizes(e.signature, sizes_memo)[1] for e in entries]
    sizes: list[int] = []
    for entry in entries:
        sizes.extend(_sizes(entry.signature, sizes_memo)[0])
    device = new_hashes.device  # where the new hashes are: the parent's rows go there
    parent = torch.cat([t for _, t in tables.values()]).to(device)
    count_t = torch.tensor(counts, dtype=torch.int64, device=device)
    start_t = torch.tensor(starts, dtype=torch.int64, device=device)
    model_of = torch.repeat_interleave(torch.arange(len(entries), device=device), count_t)
    before = torch.cumsum(count_t, 0) - count_t
    rows = start_t[model_of] + (torch.arange(new_hashes.shape[0], device=device) - before[model_of])
    valid = start_t[model_of] >= 0
    same = torch.zeros(new_hashes.shape[0], dtype=torch.bool, device=device)
    same[valid] = (new_hashes[valid] == parent[rows[valid]]).all(dim=1)
    differ = torch.zeros(len(entries), dtype=torch.int64, device=device).index_add_(
        0, model_of, (~same).to(torch.int64)
    )
    flags = (~same).cpu().to(torch.int64)
    nbytes = torch.zeros(len(entries), dtype=torch.int64).index_add_(
        0, model_of.cpu(), flags * torch.tensor(sizes, dtype=torch.int64)
    )
    if device.type != "cpu":
        TRANSFERS.host_to_device += parent.numel()
        TRANSFERS.device_to_host += differ.numel() * 8 + flags.numel()
    counts_out = [d if ok else max(d, 1) for d, ok in zip(differ.tolist(), comparable)]
    return counts_out, nbytes.tolist()


def _encode(store: ModelStore, parent: str, deltas: list[_Delta], tolerance: float | None,
            device: torch.device | None) -> None:  # fmt: skip
    """Fills kinds, pieces and recovered hashes: one batched encode per encoding (on the
    CPU the exact one over address tables: no per-tensor work beyond reading the parent's
    address; on a GPU where the new tensors are, only the encodings coming back)."""
    with decoding(parent):
        parents = chain.recover(store, parent, {d.entry.name for d in deltas}, verify=True)
    if device is not None:
        _encode_on(device, parents, deltas, tolerance)
        return
    jobs = _changed_tensors(deltas, parents, tolerance)
    xor = jobs[codec.XOR]
    if xor:
        keep = [before.contiguous() for _, _, _, before in xor]  # recovery's are; kept alive
        widths: dict[torch.dtype, int] = {}
        table = xor_planes_encode_table(
            kernels.int64_table([d.entry.ptrs[t] for d, t, _, _ in xor]),
            kernels.int64_table([b.data_ptr() for b in keep]),
            kernels.int64_table([b.numel() * b.element_size() for b in keep]),
            kernels.int64_table([widths.get(b.dtype) or widths.setdefault(b.dtype, plane_width(b.dtype))
                                 for b in keep]),
        )  # fmt: skip
        del keep
        first: dict[int, int] = {}  # per delta (by position): its first job, and one past its last
        last: dict[int, int] = {}
        for j, ((d, t, _, _), enc) in enumerate(zip(xor, table.views())):
            d.kinds[t], d.pieces[t] = codec.XOR, enc
            first.setdefault(id(d), j)
            last[id(d)] = j + 1
        offsets = table.offsets.tolist()
        for d in deltas:
            if id(d) in first:  # its pieces lie back to back (until a quantized one is added)
                d.span = table.buf[offsets[first[id(d)]] : offsets[last[id(d)]]]
    quant = jobs[codec.QUANT]
    if quant:
        assert tolerance is not None
        _quantize_all(deltas, quant, tolerance)


def _quantize_all(deltas: list[_Delta], quant: list[_Job], tolerance: float) -> None:
    """The quantized encodings of every job (one buffer, back to back), decoded as
    recovery will (one native call over address tables into one buffer), hashed (one
    call) and compared with the parents' hashes as one table: a tensor whose every
    element lies within tolerance of its parent keeps the parent's; the rest are
    recorded, each delta whose pieces are all quantized and back to back as one span."""
    befores = [j[3].contiguous() for j in quant]
    encs, _ = quantize_encode([j[2] for j in quant], befores, tolerance)
    k = len(quant)
    numel = torch.tensor([b.numel() for b in befores], dtype=torch.int64)
    itemsize = torch.tensor([b.element_size() for b in befores], dtype=torch.int64)
    nbytes = numel * itemsize
    padded = (nbytes + 15) // 16 * 16
    out_at = torch.zeros(k, dtype=torch.int64)
    torch.cumsum(padded[:-1], 0, out=out_at[1:])
    out = torch.empty(int(padded.sum()), dtype=torch.uint8)
    outs = out_at + out.data_ptr()
    bad = quantize_decode_table(
        torch.tensor([e.data_ptr() for e in encs], dtype=torch.int64),
        torch.tensor([e.numel() for e in encs], dtype=torch.int64),
        torch.tensor([b.data_ptr() for b in befores], dtype=torch.int64), outs,
        torch.tensor([FLOAT_KINDS[b.dtype] for b in befores], dtype=torch.int64), itemsize, numel,
    )  # fmt: skip
    if bad is not None:  # the encoder's own output: a defect, never the user's input
        raise KernelError(f"quantize_encode wrote an encoding its decoder refuses (segment {bad})")
    got = kernels.blake3_segments(outs, nbytes)
    del out
    first_row: dict[int, int] = {}  # per delta: its first row in the concatenated hashes
    at = 0
    for d in deltas:
        first_row[id(d)], at = at, at + len(d.kinds)
    rows = torch.tensor([first_row[id(d)] + t for d, t, _, _ in quant], dtype=torch.int64)
    parent_rows = torch.cat([d.info.hashes for d in deltas])[rows]
    kept = (got != parent_rows).any(dim=1)
    recovered = torch.cat([d.recovered for d in deltas])
    recovered[rows] = torch.where(kept.unsqueeze(1), got, parent_rows)
    for d, part in zip(deltas, torch.split(recovered, [len(d.kinds) for d in deltas])):
        d.recovered = part
    runs: dict[int, list[int]] = {}  # per delta: its quantized jobs kept
    holed: set[int] = set()  # deltas with a quantized job dropped
    for j, ((d, t, _, _), keep) in enumerate(zip(quant, kept.tolist())):
        if keep:
            d.kinds[t], d.pieces[t] = codec.QUANT, encs[j]
            runs.setdefault(id(d), []).append(j)
        else:
            holed.add(id(d))
    for d in deltas:
        run = runs.get(id(d), [])
        if not run and id(d) not in holed:
            continue  # no quantized job: its xor-planes span (if any) stands
        count = sum(p is not None for p in d.pieces)
        # one span only where its pieces are all quantized, consecutive in the one buffer
        consecutive = (bool(run) and id(d) not in holed and count == len(run)
                       and run[-1] - run[0] + 1 == len(run))  # fmt: skip
        d.span = _span(encs[run[0]], encs[run[-1]]) if consecutive else None


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
        old = [
            parents[d.entry.name][k] for k in d.entry.keys
        ]  # by name: its saved order may differ
        d.kinds = [codec.SAME] * len(old)
        d.pieces = [None] * len(old)
        same = (d.hashes == d.info.hashes).all(dim=1).tolist()
        for t, (new, before) in enumerate(zip(d.entry.sources, old)):
            if not same[t]:
                lossy = (tolerance is not None and new.dtype in FLOAT_KINDS
                         and not d.entry.keys[t].endswith(EXACT_SUFFIXES))  # fmt: skip
                jobs[codec.QUANT if lossy else codec.XOR].append((d, t, new, before))
    return jobs


def _span(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor | None:
    """The bytes from ``first`` to the end of ``last`` (uint8 views of one buffer, in
    that order with nothing between), as one view; None if they are not such views."""
    base = first._base
    if base is None or last._base is not base or base.dim() != 1:
        return None
    lo = first.storage_offset() - base.storage_offset()
    hi = last.storage_offset() - base.storage_offset() + last.numel()
    return base[lo:hi]


def _take_quantized(batch: list[_Job], encs: list[torch.Tensor], recovered: torch.Tensor) -> None:
    """Records each quantized encoding, or none where what recovery would give hashes
    as the parent's tensor (every element within tolerance of it: the parent's stays)."""
    for (d, t, _, _), enc, h in zip(batch, encs, recovered):
        if torch.equal(h, d.info.hashes[t]):
            d.recovered[t] = d.info.hashes[t]
            continue
        d.kinds[t], d.pieces[t], d.recovered[t] = codec.QUANT, enc, h
        d.span = None  # its pieces are in two buffers now


def _encode_on(device: torch.device, parents: dict[str, dict[str, torch.Tensor]],
               deltas: list[_Delta], tolerance: float | None) -> None:  # fmt: skip
    """``_encode`` where the new tensors live on ``device``: the parents go there in one
    copy, the encode (and, for quantized, the decode and hash of what recovery will
    give) run there, and only the hashes and the encodings come back, in one copy
    each; where nvCOMP is installed, the encodings are compressed there first and
    only the compressed model blobs come back (``frames.for_device``)."""
    compress = frames.for_device(device)
    back = (lambda encs: encs) if compress else _to_host
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


def _write_deltas(
    store: ModelStore, writer: PackWriter, deltas: list[_Delta], end: int
) -> tuple[bytes, ContentRecord, int, int]:
    """Writes the model blobs, then the tables and hashes; returns the blob key, its
    content record, the model blobs' bytes and the tables' and hashes' bytes."""
    on_host = [d for d in deltas if d.frames is None]
    packed_host = iter(
        codec.compress_many(  # views of the encodings, held in d.pieces meanwhile
            [_views(d) for d in on_host]
        )
    )
    packed = [d.frames if d.frames is not None else next(packed_host) for d in deltas]
    sizes: Sizes = {}
    datas: list[bytes | memoryview] = []
    lengths: list[tuple[int, int]] = []  # per delta: plain length, codec
    kinds: list[int] = []  # per tensor of every delta
    nbytes: list[int] = []
    raw_srcs: list[int] = []  # the changed tensors of blobs stored plain from host memory
    raw_lens: list[int] = []
    raw_blobs: list[tuple[int, int]] = []  # (delta, plain length) of those blobs
    exact: list[int] = []  # rows (tensors of every delta) stored as they are
    for i, (d, z) in enumerate(zip(deltas, packed)):
        each = _sizes(d.entry.signature, sizes)[0]
        changed = [t for t, p in enumerate(d.pieces) if p is not None]
        plain = sum(each[t] for t in changed)
        if len(z) < plain:
            datas.append(z)
            kinds.extend(d.kinds)
            nbytes.extend(0 if p is None else p.numel() * p.element_size() for p in d.pieces)
            codec_id = codec.ZSTD_FRAMES if d.frames is not None else codec.ZSTD
        else:  # the changed tensors as they are: recovery gives the new tensors exactly
            if d.entry.device is None:  # gathered below, with every other such blob
                raw_srcs.extend(d.entry.ptrs[t] for t in changed)
                raw_lens.extend(each[t] for t in changed)
                raw_blobs.append((i, plain))
                datas.append(b"")
            else:
                raw = [_host(d.entry.sources[t]).contiguous() for t in changed]
                datas.append(b"".join(kernels.tensor_view(r) for r in raw))  # (raw held meanwhile)
            exact.extend(len(kinds) + t for t in changed)  # recovery gives the new tensors
            kinds.extend(codec.RAW if k != codec.SAME else k for k in d.kinds)
            nbytes.extend(0 if p is None else each[t] for t, p in enumerate(d.pieces))
            codec_id = codec.NONE
        lengths.append((sum(nbytes[len(nbytes) - len(d.kinds) :]), codec_id))
    if raw_blobs:  # one native gather of every tensor stored plain, blob after blob
        lens = kernels.int64_table(raw_lens)
        gathered = torch.empty(int(lens.sum()), dtype=torch.uint8)
        kernels.gather(gathered, kernels.int64_table(raw_srcs), lens, lens.cumsum(0) - lens)
        view, at = kernels.tensor_view(gathered), 0
        for i, plain in raw_blobs:
            datas[i] = view[at : at + plain]
            at += plain
    # each tensor's offset in its model's plain blob: the bytes of the tensors before it
    counts = torch.tensor([len(d.kinds) for d in deltas], dtype=torch.int64)
    length_t = torch.tensor(nbytes, dtype=torch.int64)
    before = length_t.cumsum(0) - length_t
    model_first = counts.cumsum(0) - counts
    at_t = before - before[model_first].repeat_interleave(counts)
    tensor_rows = torch.stack([torch.tensor(kinds, dtype=torch.int64), at_t, length_t], dim=1)
    body = sum(len(data) for data in datas)
    hashes = torch.cat([d.recovered for d in deltas]).contiguous()
    if exact:
        rows = torch.tensor(exact, dtype=torch.int64)
        hashes[rows] = torch.cat([d.hashes for d in deltas])[rows]
    start = align_up(end, 64)
    while True:
        offset = start
        model_rows = []
        for d, data, (plain, codec_id) in zip(deltas, datas, lengths):
            model_rows.append(
                (offset, len(data), plain, len(d.kinds), int(d.info.depth) + 1, codec_id)
            )
            offset += len(data)
        table = delta_blob.encode_tables(model_rows, tensor_rows)
        key = delta_blob.blob_key(table, hashes)
        # The key covers the tables and the recovered tensors' hashes, not the model
        # blobs: the same tables over other bytes (deltas of the same tensors against
        # another parent, laid out alike in another pack) must not share it.
        if not _holds_other_bytes(store, key, [row[0] for row in model_rows], datas):
            break
        start += 64  # other offsets in the tables, so another key
    table_at = align_up(offset, 64)
    hashes_at = align_up(table_at + len(table), 64)
    # one vectored write: each model blob from where it is, then the tables and hashes
    pieces = [*datas, table, kernels.tensor_bytes(hashes)]
    places = [row[0] - start for row in model_rows] + [table_at - start, hashes_at - start]
    writer.write_segments(start, kernels.int64_table([kernels.buffer_address(p) for p in pieces]),
                          kernels.int64_table([len(p) for p in pieces]),
                          kernels.int64_table(places), hashes_at + hashes.numel() - start)  # fmt: skip
    del pieces
    rec = ContentRecord(
        writer.pack_id, [], hashes_at, hashes.numel(), refs=1, table=(table_at, len(table))
    )
    return key, rec, body, len(table) + hashes.numel()


def _views(d: _Delta) -> list[memoryview]:
    """A delta's encodings as memoryviews: one over its span where they lie back to back."""
    if d.span is not None:
        return [kernels.tensor_view(d.span)]
    return [kernels.tensor_view(p) for p in d.pieces if p is not None]


def _holds_other_bytes(store: ModelStore, key: bytes, offsets: list[int],
                       datas: list[bytes | memoryview]) -> bool:  # fmt: skip
    """Whether the store has a delta blob under ``key`` whose model blobs are not
    ``datas`` (one that cannot be read counts as other bytes)."""
    raw = store.catalog.get("content", key)
    if raw is None:
        return False
    try:
        rec = ContentRecord.decode(raw)
        spans = [(at + rec.shift, len(data)) for at, data in zip(offsets, datas)]
        store._reader.check_in_pack(rec, spans)
        for (at, length), data in zip(spans, datas):
            if not length:
                continue
            got = torch.empty(length, dtype=torch.uint8)
            store.tier.read_into(rec.pack, at, length, got.data_ptr())
            if kernels.tensor_bytes(got) != data:
                return True
    except MMCoreError:
        return True
    return False


def _host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    TRANSFERS.device_to_host += t.numel() * t.element_size()
    return t.cpu()
