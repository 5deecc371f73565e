"""The dtypes mmcore stores, by the names written into manifests.

A name is decoded only through this table: nothing read from a store is ever
evaluated.
"""

from __future__ import annotations

import torch

from .errors import FormatVersionError, InvalidModelSetError

_CANDIDATES = (
    "float64", "float32", "float16", "bfloat16",
    "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8",
    "uint64", "uint32", "uint16", "uint8", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)  # fmt: skip

BY_NAME: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in _CANDIDATES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
NAME_OF: dict[torch.dtype, str] = {dtype: name for name, dtype in BY_NAME.items()}
ITEMSIZE: dict[torch.dtype, int] = {dtype: dtype.itemsize for dtype in BY_NAME.values()}
COMPLEX = frozenset(d for d in BY_NAME.values() if d.is_complex)


def name_of(dtype: torch.dtype, *, where: str) -> str:
    try:
        return NAME_OF[dtype]
    except KeyError:
        raise InvalidModelSetError(
            f"{where}: dtype {dtype} cannot be stored; supported: {', '.join(BY_NAME)}"
        ) from None


def from_name(name: str) -> torch.dtype:
    try:
        return BY_NAME[name]
    except KeyError:
        raise FormatVersionError(
            f"the store holds a tensor of dtype {name!r}, which this torch "
            f"({torch.__version__}) or mmcore version does not know; upgrade them to read it"
        ) from None
