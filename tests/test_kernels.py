"""gather / scatter against the pure reference."""

from __future__ import annotations

import pytest
import torch

from mmcore import kernels
from mmcore.errors import InvalidArgumentError
from mmcore.kernels import reference


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, generator=g) for n in (0, 1, 7, 48, 2304, 100_000)] + [
        torch.arange(9, dtype=torch.int16)
    ]


def test_gather_matches_reference() -> None:
    ts = _tensors()
    lens = kernels.int64_table([t.numel() * t.element_size() for t in ts])
    offsets = torch.cumsum(lens, 0) - lens
    dst = torch.empty(int(lens.sum()), dtype=torch.uint8)
    kernels.gather(dst, kernels.int64_table([t.data_ptr() for t in ts]), lens, offsets)
    assert kernels.tensor_bytes(dst) == reference.gather(ts)


def test_scatter_inverts_gather() -> None:
    ts = _tensors()
    lens = kernels.int64_table([t.numel() * t.element_size() for t in ts])
    offsets = torch.cumsum(lens, 0) - lens
    src = torch.frombuffer(bytearray(reference.gather(ts)), dtype=torch.uint8)
    outs = [torch.empty_like(t) for t in ts]
    kernels.scatter(src, kernels.int64_table([o.data_ptr() for o in outs]), lens, offsets)
    for o, t in zip(outs, ts):
        assert torch.equal(o, t)


def test_gather_rejects_out_of_bounds() -> None:
    t = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match="past the end"):
        kernels.gather(torch.empty(8, dtype=torch.uint8), kernels.int64_table([t.data_ptr()]),
                       kernels.int64_table([16]), kernels.int64_table([0]))  # fmt: skip


def test_gather_rejects_mismatched_tables() -> None:
    with pytest.raises(InvalidArgumentError, match="same length"):
        kernels.gather(torch.empty(8, dtype=torch.uint8), kernels.int64_table([0, 0]),
                       kernels.int64_table([1]), kernels.int64_table([0]))  # fmt: skip
