"""Reading blobs back: whole groups, single models, and verification.

A group is read with one positioned read into one buffer; its tensors are
views of that buffer, built (in C++ via ``unbind``) while a reader thread is
still moving the bytes, so Python's per-tensor cost overlaps the I/O.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .. import dtypes, kernels
from ..errors import IntegrityError
from ..manifest import ContentRecord, GroupRecord, Manifest
from ..modelset import Schema
from ..store.packs import PayloadTier

StateDict = dict[str, torch.Tensor]


def _segment_table(base: int, schema: Schema, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = kernels.int64_table([s.offset for s in schema.tensors])
    lens = kernels.int64_table([s.nbytes for s in schema.tensors])
    rows = torch.arange(count, dtype=torch.int64).mul_(schema.stride).add_(base).unsqueeze(1)
    return (rows + offsets.unsqueeze(0)).reshape(-1), lens.repeat(count)


def _first_mismatch(computed: torch.Tensor, stored: torch.Tensor) -> int | None:
    if torch.equal(computed, stored):
        return None
    bad = (computed != stored).any(dim=1).nonzero()
    return int(bad[0, 0])


def _views(buf: torch.Tensor, schema: Schema, count: int) -> list[StateDict]:
    """count state dicts whose tensors are views of ``buf`` (count x stride bytes)."""
    rows = buf.view(count, schema.stride) if schema.stride else buf.new_empty((count, 0))
    columns = []
    for spec in schema.tensors:
        dtype = dtypes.from_name(spec.dtype)
        col = rows[:, spec.offset : spec.offset + spec.nbytes]
        if dtype != torch.uint8:
            col = col.view(dtype)
        columns.append(col.view((count, *spec.shape)).unbind(0))
    names = [spec.name for spec in schema.tensors]
    return [dict(zip(names, row)) for row in zip(*columns)] if names else [{} for _ in range(count)]


class BlobReader:
    def __init__(self, tier: PayloadTier, content: Callable[[bytes], ContentRecord]) -> None:
        self.tier = tier
        self.content = content

    def _check(self, manifest: Manifest, group: GroupRecord, first_pos: int, computed: torch.Tensor,
               stored: torch.Tensor) -> None:
        bad = _first_mismatch(computed, stored)
        if bad is None:
            return
        ntensors = len(group.schema.tensors)
        pos, ti = divmod(bad, ntensors)
        model = manifest.models[group.positions()[first_pos + pos]]
        tensor = group.schema.tensors[ti].name
        raise IntegrityError(
            f"version {manifest.id}: model {model!r}, tensor {tensor!r} does not match its "
            "recorded BLAKE3 hash: the stored bytes are corrupted",
            model=model,
            tensor=tensor,
        )

    def read_group(self, manifest: Manifest, group: GroupRecord, *, verify: bool,
                   device: torch.device, pool: ThreadPoolExecutor) -> list[StateDict]:
        rec = self.content(group.blob)
        schema = group.schema
        buf = torch.empty(rec.payload_length, dtype=torch.uint8)
        stored = torch.empty((rec.hashes_length // kernels.HASH_SIZE, kernels.HASH_SIZE), dtype=torch.uint8)
        seg_ptrs, seg_lens = _segment_table(buf.data_ptr(), schema, group.count)

        def io() -> torch.Tensor | None:
            self.tier.read_into(rec.pack, rec.payload_offset, rec.payload_length, buf.data_ptr())
            if not verify:
                return None
            self.tier.read_into(rec.pack, rec.hashes_offset, rec.hashes_length, stored.data_ptr())
            return kernels.blake3_segments(seg_ptrs, seg_lens)

        future = pool.submit(io)
        on_cpu = device.type == "cpu"
        models = _views(buf, schema, group.count) if on_cpu else []
        computed = future.result()
        if computed is not None:
            self._check(manifest, group, 0, computed, stored)
        if not on_cpu:
            models = _views(buf.to(device), schema, group.count)
        return models

    def read_model(self, manifest: Manifest, group: GroupRecord, pos: int, *, verify: bool,
                   device: torch.device) -> StateDict:
        rec = self.content(group.blob)
        schema = group.schema
        buf = torch.empty(schema.stride, dtype=torch.uint8)
        self.tier.read_into(rec.pack, rec.payload_offset + pos * schema.stride, schema.stride, buf.data_ptr())
        if verify:
            ntensors = len(schema.tensors)
            stored = torch.empty((ntensors, kernels.HASH_SIZE), dtype=torch.uint8)
            nbytes = ntensors * kernels.HASH_SIZE
            self.tier.read_into(rec.pack, rec.hashes_offset + pos * nbytes, nbytes, stored.data_ptr())
            ptrs, lens = _segment_table(buf.data_ptr(), schema, 1)
            self._check(manifest, group, pos, kernels.blake3_segments(ptrs, lens), stored)
        if device.type != "cpu":
            buf = buf.to(device)
        return _views(buf, schema, 1)[0]

    def verify_group(self, manifest: Manifest, group: GroupRecord) -> None:
        """Re-hashes every byte of the group, and checks the hash table against the blob key."""
        from .baseline import blob_key

        rec = self.content(group.blob)
        buf = torch.empty(rec.payload_length, dtype=torch.uint8)
        stored = torch.empty((rec.hashes_length // kernels.HASH_SIZE, kernels.HASH_SIZE), dtype=torch.uint8)
        self.tier.read_into(rec.pack, rec.payload_offset, rec.payload_length, buf.data_ptr())
        self.tier.read_into(rec.pack, rec.hashes_offset, rec.hashes_length, stored.data_ptr())
        ptrs, lens = _segment_table(buf.data_ptr(), group.schema, group.count)
        self._check(manifest, group, 0, kernels.blake3_segments(ptrs, lens), stored)
        if blob_key(group, group.count, stored) != group.blob:
            raise IntegrityError(
                f"version {manifest.id}: the hash table of a blob in pack {rec.pack} does not "
                "match its content address: the stored hashes are corrupted"
            )
