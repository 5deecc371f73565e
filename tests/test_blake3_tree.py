"""The GPU BLAKE3's kernels (csrc/blake3_tree.h), run thread by thread on the
CPU by the native emulation, against the reference implementation: the launch
plan, the coalesced loads and their tails, unaligned segments and the tree
merged in CTAs and stages, without a GPU."""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

import blake3
import pytest
import torch

from mmcore import kernels
from mmcore._native import core
from mmcore.kernels import delta
from mmcore.kernels._segments import XOR_HEADER
from mmcore.kernels.cuda import blake3_plan, run_blake3_plan

THREADS = 128  # slots per CTA (tree::kThreads)
TASK = struct.Struct("<QIIII")  # first, segment, count, slot, root


def _emulate(bufs: list[torch.Tensor], fused: Sequence[int] = (0, 0, 0, 0, 0)) -> list[bytes]:
    """cuda.blake3_segments' launches, each stage run by the CPU emulation."""
    ptrs = kernels.int64_table([b.data_ptr() for b in bufs])
    lens = kernels.int64_table([b.numel() * b.element_size() for b in bufs])
    plan, stages, nodes = blake3_plan(lens.tolist())
    tables = torch.frombuffer(bytearray(plan), dtype=torch.uint8)
    node_buf = torch.zeros(nodes * 8, dtype=torch.int32)
    out = torch.zeros((len(bufs), 32), dtype=torch.uint8)
    run_blake3_plan(core().blake3_tree_emulate_stage, stages, tables.data_ptr(), ptrs.data_ptr(),
                    lens.data_ptr(), node_buf.data_ptr(), out.data_ptr(), fused)  # fmt: skip
    return [bytes(row.tolist()) for row in out]


def _random_bytes(rng: random.Random, n: int) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(rng.randbytes(n)), dtype=torch.uint8)
        if n
        else torch.empty(0, dtype=torch.uint8)
    )


def _reference(bufs: list[torch.Tensor]) -> list[bytes]:
    return [blake3.blake3(kernels.tensor_bytes(b)).digest() for b in bufs]


# Around every boundary the kernels handle: 16-byte loads, 64-byte blocks,
# 1 KiB chunks, a full task (128 chunks), and two and three stages.
EDGES = [0, 1, 15, 16, 17, 63, 64, 65, 1023, 1024, 1025, 2048, 3000, 128 * 1024 - 1, 128 * 1024,
         128 * 1024 + 1, 129 * 1024, (1 << 20) + 7, 128 * 128 * 1024, 128 * 128 * 1024 + 1]  # fmt: skip


@pytest.mark.parametrize("length", EDGES)
def test_one_segment(length: int) -> None:
    bufs = [_random_bytes(random.Random(length), length)]
    assert _emulate(bufs) == _reference(bufs)


def test_a_table_packs_segments_into_ctas() -> None:
    rng = random.Random(5)
    lengths = [rng.choice([0, 192, 9216, 4096, 1024, 1500, 130_000]) for _ in range(600)]
    bufs = [_random_bytes(rng, n) for n in lengths]
    assert _emulate(bufs) == _reference(bufs)


def test_unaligned_segments_take_the_byte_path() -> None:
    rng = random.Random(9)
    base = _random_bytes(rng, 300_000)
    starts = [0, 1, 3, 7, 8, 15, 16, 17, 4097]
    bufs = [base[s : s + n] for s in starts for n in (0, 5, 64, 1024 + 17, 140_000)]
    assert _emulate(bufs) == _reference(bufs)


def test_segments_may_alias() -> None:
    base = _random_bytes(random.Random(2), 5000)
    bufs = [base, base[:4000], base, base[1000:]]
    assert _emulate(bufs) == _reference(bufs)


def _tasks(plan: bytes, stage: tuple[int, int, int, int, int]) -> list[tuple[int, ...]]:
    tasks_at, _, count, _, _ = stage
    return [TASK.unpack_from(plan, tasks_at + i * TASK.size) for i in range(count)]


def test_plan_fills_ctas_and_covers_every_chunk() -> None:
    rng = random.Random(4)
    lens = [rng.choice([0, 100, 9216, 1 << 20, 300_000]) for _ in range(300)]
    plan, stages, nodes = blake3_plan(lens)
    assert nodes == sum(s[2] for s in stages)
    chunks = [max(1, -(-n // 1024)) for n in lens]
    tasks = _tasks(plan, stages[0])
    covered = [0] * len(lens)
    for first, seg, count, _slot, root in tasks:
        assert first == covered[seg] and 1 <= count <= THREADS  # in order, no gap, no overlap
        covered[seg] += count
        assert root == (chunks[seg] <= THREADS)
    assert covered == chunks
    cta_first = struct.unpack_from(f"<{stages[0][3] + 1}I", plan, stages[0][1])
    for c in range(stages[0][3]):
        mine = tasks[cta_first[c] : cta_first[c + 1]]
        slots = [t[3] for t in mine]
        assert slots[0] == 0 and slots == sorted(slots)
        assert all(t[3] + t[2] <= THREADS for t in mine)
        if c + 1 < stages[0][3]:  # a CTA closes only when the next task does not fit
            assert mine[-1][3] + mine[-1][2] + tasks[cta_first[c + 1]][2] > THREADS
    # stage 1 finishes each segment of more than one task (1 MiB: 8 tasks, 300,000 B: 3)
    assert len(stages) == 2
    later = [(seg, count, root) for _, seg, count, _, root in _tasks(plan, stages[1])]
    assert later == [(s, -(-c // THREADS), 1) for s, c in enumerate(chunks) if c > THREADS]


def test_stages_of_one_gib() -> None:
    _, stages, nodes = blake3_plan([1 << 30])
    assert [s[2] for s in stages] == [8192, 64, 1]  # tasks per stage
    assert [s[3] for s in stages] == [8192, 64, 1]  # CTAs per stage
    assert nodes == 8192 + 64 + 1


@pytest.mark.parametrize("misaligned", [False, True])
def test_fused_xor_planes_match_the_cpu(misaligned: bool) -> None:
    """Stage 0 with the xor-planes of every chunk: the same hashes, and the
    planes and changed counts of the CPU kernel (every width, tails, outputs
    off 16-byte boundaries)."""
    g = torch.Generator().manual_seed(7)
    sizes = [0, 1, 3, 16, 17, 255, 256, 257, 70_001, 300_000]
    new, parent = [], []
    for dtype in (torch.uint8, torch.float16, torch.float32, torch.float64):
        for n in sizes:
            p = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
            q = p.clone()
            q[::7] ^= 1  # about one byte in seven changed
            if misaligned and n > 1:  # start one element past the allocation
                p = torch.cat([p[: dtype.itemsize], p])[dtype.itemsize :]
                q = torch.cat([q[: dtype.itemsize], q])[dtype.itemsize :]
            new.append(q.view(dtype))
            parent.append(p.view(dtype))
    widths = [t.element_size() for t in new]
    nbytes = [t.numel() * t.element_size() for t in new]
    shift = 3 if misaligned else 0
    bufs = [torch.zeros(nb + 16 + shift, dtype=torch.uint8) for nb in nbytes]
    outs = [b[shift:] for b in bufs]
    changed = torch.zeros(len(new), dtype=torch.int64)
    tables = [
        kernels.int64_table([o.data_ptr() for o in outs]),
        kernels.int64_table([nb // w for nb, w in zip(nbytes, widths)]),
        torch.tensor(widths, dtype=torch.int32),
    ]
    keep = kernels.int64_table([t.data_ptr() for t in parent])
    fused = [keep.data_ptr(), *(t.data_ptr() for t in tables), changed.data_ptr()]
    got = _emulate(new, fused)
    assert got == _reference([t.view(torch.uint8) for t in new])
    want, want_changed = delta.xor_planes_encode(new, parent)
    for o, w, nb in zip(outs, want, nbytes):
        assert torch.equal(o[:nb], w[XOR_HEADER.size :])
    assert torch.equal(changed, want_changed)
