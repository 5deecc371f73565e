"""The native BLAKE3 against the reference implementation (the `blake3` package)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import blake3
import pytest
import torch

from mmcore import kernels
from mmcore._native import core

LENGTHS = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 3 * 1024, 16 * 1024 - 1,
           16 * 1024, 16 * 1024 + 1, 31 * 1024 + 5, (1 << 20) + 7]  # fmt: skip


def _bufs(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    rng = random.Random(seed)
    return [torch.frombuffer(bytearray(rng.randbytes(n)), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
            for n in lengths]  # fmt: skip


def _expected(bufs: list[torch.Tensor]) -> list[bytes]:
    return [blake3.blake3(kernels.tensor_bytes(b)).digest() for b in bufs]


def test_isa_is_reported() -> None:
    assert core().blake3_isa() in {"avx512", "avx2", "generic"}


_EVERY_ISA = """
import json, random, sys, blake3, torch
from mmcore import kernels
from mmcore._native import core
from mmcore.kernels.delta import xor_planes_encode_hashed
rng = random.Random(5)
lengths = [0, 1, 64, 65, 1023, 1024, 1025, 16 * 1024 + 1, 100_003] + [rng.randrange(0, 5000) for _ in range(400)]
bufs = [torch.frombuffer(bytearray(rng.randbytes(n)), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        for n in lengths]
want = [blake3.blake3(kernels.tensor_bytes(b)).digest() for b in bufs]
ok = kernels.hash_rows_to_bytes(kernels.blake3_tensors(bufs, threads=2)) == want
_, _, fused = xor_planes_encode_hashed(bufs, [torch.zeros_like(b) for b in bufs])
ok = ok and kernels.hash_rows_to_bytes(fused) == want
print(json.dumps([core().blake3_isa(), ok]))
"""


@pytest.mark.parametrize("cap", ["avx512", "avx2", "generic"])
def test_every_instruction_set_matches_reference(cap: str) -> None:
    """MMCORE_BLAKE3_ISA caps the instruction set, so every lane width this CPU
    has runs here (plain and fused with the xor-planes encoder)."""
    env = dict(os.environ, MMCORE_BLAKE3_ISA=cap)
    out = subprocess.run([sys.executable, "-c", _EVERY_ISA], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(__file__))  # fmt: skip
    isa, ok = json.loads(out.stdout)
    order = ["generic", "avx2", "avx512"]
    assert order.index(isa) <= order.index(cap)
    if cap == "generic":
        assert isa == "generic"
    assert ok, f"{isa}: hashes differ from the blake3 package"


def test_an_unknown_instruction_set_cap_is_refused() -> None:
    env = dict(os.environ, MMCORE_BLAKE3_ISA="sse9")
    code = "from mmcore import kernels; import torch; kernels.blake3_tensors([torch.ones(3)])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(__file__))  # fmt: skip
    assert out.returncode != 0
    assert "ValueError: MMCORE_BLAKE3_ISA must be avx512, avx2 or generic, not 'sse9'" in out.stderr


@pytest.mark.parametrize("length", LENGTHS)
def test_single_segment_matches_reference(length: int) -> None:
    bufs = _bufs([length], seed=length)
    got = kernels.hash_rows_to_bytes(kernels.blake3_tensors(bufs))
    assert got == _expected(bufs)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_table_of_mixed_segments_matches_reference(threads: int) -> None:
    rng = random.Random(threads)
    lengths = (
        LENGTHS
        + [rng.randrange(0, 300_000) for _ in range(60)]
        + [rng.randrange(0, 3000) for _ in range(300)]
    )
    rng.shuffle(lengths)
    bufs = _bufs(lengths, seed=threads)
    got = kernels.hash_rows_to_bytes(kernels.blake3_tensors(bufs, threads=threads))
    assert got == _expected(bufs)


def test_segments_may_alias_and_overlap() -> None:
    base = _bufs([5000], seed=9)[0]
    ptrs = kernels.int64_table(
        [base.data_ptr(), base.data_ptr() + 1, base.data_ptr(), base.data_ptr() + 4000]
    )
    lens = kernels.int64_table([5000, 4999, 1024, 1000])
    got = kernels.hash_rows_to_bytes(kernels.blake3_segments(ptrs, lens))
    data = kernels.tensor_bytes(base)
    assert got == [blake3.blake3(d).digest() for d in (data, data[1:], data[:1024], data[4000:])]


def test_large_segment_many_threads() -> None:
    buf = _bufs([(8 << 20) + 333], seed=3)
    assert kernels.hash_rows_to_bytes(kernels.blake3_tensors(buf, threads=4)) == _expected(buf)


def test_validation_before_native_call() -> None:
    from mmcore.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="int64"):
        kernels.blake3_segments(
            torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
        )
    with pytest.raises(InvalidArgumentError, match="bytes"):
        kernels.blake3_segments(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                                out=torch.empty(3, dtype=torch.uint8))  # fmt: skip
