"""ZipNN (the lossless float compressor on PyPI) as a peer of the harness: on a
set's baseline bytes, and on the XOR of a set with its parent (the bytes an
update stores before entropy coding). And mmcore's own encoder of those XOR
deltas, timed alone, for the like-for-like comparison.

ZipNN 0.5.4 rewrites the buffer it compresses in place (seen here: the bytes
passed to ``compress`` differ afterwards); the harness hands it a fresh copy,
made before the clock starts.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from mmcore import codec, kernels
from mmcore.kernels.delta import plane_width
from mmcore.kernels.xor_planes import xor_planes_encode_table

from .methods import set_bytes

StateDicts = dict[str, dict[str, torch.Tensor]]


@functools.cache
def _zipnn_module() -> Any:
    try:
        with warnings.catch_warnings():  # zipnn 0.5 calls torch.jit.script at import
            warnings.simplefilter("ignore", DeprecationWarning)
            import zipnn
    except ImportError:
        return None
    return zipnn


def zipnn_version() -> str | None:
    """The installed ZipNN's version, or None when it is not installed."""
    if _zipnn_module() is None:
        return None
    from importlib.metadata import version

    return version("zipnn")


def zipnn_codec() -> Any:
    """A ZipNN compressor for float32 bytes (ZipNN must be installed)."""
    return _zipnn_module().ZipNN(bytearray_dtype="float32", input_format="byte")


def xor_bytes(new: StateDicts, parent: StateDicts) -> torch.Tensor:
    """The XOR of each tensor's bytes with its parent's, all tensors in one uint8 tensor."""
    a, b = set_bytes(new), set_bytes(parent)
    if a.numel() % 4 == 0:
        return (a.view(torch.int32) ^ b.view(torch.int32)).view(torch.uint8)
    return a ^ b


class MMCoreXorEncoder:
    """mmcore's lossless update encoder over EVERY tensor of a set (the bytes ZipNN
    gets), ready to run: a call encodes xor-planes against the parent for the whole
    table in one native call, then compresses one zstd frame per model, as the update
    path writes a changed model, and returns the compressed bytes. The address tables
    are built here, before the clock starts (the update path has them from hashing the
    set). Unchanged models are not skipped (the update path skips them by hash)."""

    def __init__(self, new: StateDicts, parent: StateDicts) -> None:
        # the addressed tensors, held while the tables point at them
        self.news = [t.detach().cpu().contiguous() for sd in new.values() for t in sd.values()]
        self.olds = [parent[m][k].detach().cpu().contiguous() for m, sd in new.items() for k in sd]
        self.tables = [kernels.int64_table(x) for x in (
            [t.data_ptr() for t in self.news], [t.data_ptr() for t in self.olds],
            [t.numel() * t.element_size() for t in self.news],
            [plane_width(t.dtype) for t in self.news])]  # fmt: skip
        self.ends = [0, *torch.tensor([len(sd) for sd in new.values()]).cumsum(0).tolist()]

    def __call__(self) -> int:
        table = xor_planes_encode_table(*self.tables)
        whole = kernels.tensor_view(table.buf)
        at = table.offsets[self.ends].tolist()  # each model's encodings lie together
        frames = codec.compress_many([[whole[a:b]] for a, b in zip(at, at[1:])])
        return sum(len(f) for f in frames)


def timed_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
