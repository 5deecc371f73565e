"""Delta encodings of tensors against a parent: ``xor-planes`` (exact) and
``quantized`` (error-bounded). Byte layouts are in docs/FORMAT.md.

Every function takes lists of (new, parent) tensors, validates them before any
native call, and dispatches on their device: the native CPU kernels, the CUDA
kernels when built and the tensors are on a GPU, or else the pure-torch
reference (``mmcore.kernels.reference``). All produce identical bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError
from ._segments import (
    ENCODING_VERSION,
    FLOAT_KINDS,
    QUANT_HEADER,
    QUANTIZED,
    XOR_HEADER,
    XOR_PLANES,
    check_pairs,
    plane_width,
)
from .quantized import QuantStats, _frame, _layout, quantize_decode, quantize_encode
from .xor_planes import xor_planes_decode, xor_planes_encode, xor_planes_encode_hashed

__all__ = [
    "ENCODING_VERSION",
    "FLOAT_KINDS",
    "QUANTIZED",
    "QUANT_HEADER",
    "XOR_HEADER",
    "XOR_PLANES",
    "DeltaBatch",
    "QuantStats",
    "_frame",
    "_layout",
    "encode_against",
    "plane_width",
    "quantize_decode",
    "quantize_encode",
    "xor_planes_decode",
    "xor_planes_encode",
    "xor_planes_encode_hashed",
]


@dataclass
class DeltaBatch:
    """What a save needs per segment: the new bytes' hash, whether they equal the
    parent's (then nothing is encoded), the encoding, and statistics."""

    hashes: torch.Tensor  # (n, 32) uint8, BLAKE3 of each new tensor
    unchanged: torch.Tensor  # (n,) bool: hash equal to the parent's
    encoded: list[torch.Tensor | None]  # None where unchanged
    changed: torch.Tensor  # (n,) int64: differing words (xor-planes) or elements (quantized)
    max_delta: torch.Tensor  # (n,) float64: largest finite |new - parent| (quantized; else 0)


def encode_against(
    new: Sequence[torch.Tensor],
    parent: Sequence[torch.Tensor],
    *,
    encoding: str = "xor-planes",
    tolerance: float | None = None,
    parent_hashes: torch.Tensor | None = None,
) -> DeltaBatch:
    """Hashes every new tensor, skips those whose hash equals the parent's, and
    encodes the rest (``xor-planes``, exact; or ``quantized`` within ``tolerance``)."""
    from . import blake3_tensors

    if encoding not in ("xor-planes", "quantized"):
        raise InvalidArgumentError(
            f"encoding must be 'xor-planes' or 'quantized', got {encoding!r}"
        )
    if (encoding == "quantized") != (tolerance is not None):
        raise InvalidArgumentError(
            "tolerance is required for 'quantized' and not accepted for 'xor-planes'"
        )
    check_pairs(new, parent)
    n = len(new)
    hashes = blake3_tensors(new)
    if parent_hashes is None:
        parent_hashes = blake3_tensors(parent)
    if parent_hashes.shape != (n, 32):
        raise InvalidArgumentError(
            f"parent_hashes must have shape ({n}, 32), got {tuple(parent_hashes.shape)}"
        )
    unchanged = (hashes.cpu() == parent_hashes.cpu()).all(dim=1)
    todo = [i for i in range(n) if not bool(unchanged[i])]
    encoded: list[torch.Tensor | None] = [None] * n
    changed = torch.zeros(n, dtype=torch.int64)
    max_delta = torch.zeros(n, dtype=torch.float64)
    if todo:
        sub_new, sub_parent = [new[i] for i in todo], [parent[i] for i in todo]
        if encoding == "quantized":
            assert tolerance is not None
            blobs, stats = quantize_encode(sub_new, sub_parent, tolerance)
            changed[todo] = stats.changed.cpu()
            max_delta[todo] = stats.max_delta.cpu()
        else:
            blobs, counts = xor_planes_encode(sub_new, sub_parent)
            changed[todo] = counts.cpu()
        for i, blob in zip(todo, blobs):
            encoded[i] = blob
    return DeltaBatch(hashes, unchanged, encoded, changed, max_delta)
