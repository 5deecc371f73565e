"""Pure implementations used as test oracles (and nowhere on a hot path)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, in row-major order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return bytes(flat.view(torch.uint8).tolist())


def blake3_digests(chunks: Sequence[bytes]) -> list[bytes]:
    """BLAKE3-256 by the ``blake3`` package (the reference implementation's bindings)."""
    import blake3  # test dependency

    return [blake3.blake3(c).digest() for c in chunks]


def gather(tensors: Sequence[torch.Tensor]) -> bytes:
    return b"".join(tensor_bytes(t) for t in tensors)
