"""Checks of the arguments of public calls, made before anything is read or written.

Each check raises a typed error that names the argument, shows what was given
and says what is accepted, so a wrong call changes nothing and explains itself.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .errors import DeviceUnavailableError, InvalidArgumentError
from .kernels.quantized import check_tolerance

MAX_NAME = 200


def text(value: Any, what: str, *, max_len: int | None = None) -> str:
    """A non-empty str (at most ``max_len`` characters), encodable as UTF-8."""
    limit = f" of at most {max_len} characters" if max_len else ""
    if not isinstance(value, str) or not value or (max_len and len(value) > max_len):
        raise InvalidArgumentError(f"{what} must be a non-empty string{limit}, got {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{what} {value!r} is not valid unicode text") from None
    return value


def ref_name(value: Any) -> str:
    return text(value, "ref", max_len=MAX_NAME)


def version(value: Any) -> str:
    return text(value, "a version id or ref name")


def optional_text(value: Any, what: str) -> str | None:
    return None if value is None else text(value, what)


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be True or False, got {_show(value)}")
    return value


def optional_flag(value: Any, what: str) -> bool | None:
    return None if value is None else flag(value, what)


def path(value: Any) -> str | os.PathLike[str]:
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise InvalidArgumentError(
            f"a store path is a non-empty str or os.PathLike, got {_show(value)}"
        )
    return value


def name_list(value: Any, what: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InvalidArgumentError(f"{what} must be a list of model names, got {_show(value)}")
    return [text(v, f"each of {what}") for v in value]


def tolerance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"tolerance must be a number > 0, got {_show(value)}")
    return check_tolerance(value)  # the quantized encoding's own bound on it


MAX_CHAIN_LIMIT = 10_000


def max_chain(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHAIN_LIMIT:
        raise InvalidArgumentError(
            f"max_chain must be a whole number from 1 to {MAX_CHAIN_LIMIT}, got {_show(value)}"
        )
    return value


def max_recovery(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (1.0 <= value < math.inf)
    ):
        raise InvalidArgumentError(
            f"max_recovery must be a number >= 1 (or None: no bound), got {_show(value)}"
        )
    return float(value)


def device(value: Any) -> torch.device:
    """A torch.device that exists on this machine; a typed error otherwise."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"device must be like 'cpu' or 'cuda:0', got {value!r}") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InvalidArgumentError(
            f"mmcore loads onto 'cpu' or 'cuda' devices, got {str(dev)!r}; load onto the CPU "
            "and move the tensors with .to() yourself"
        )
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {str(dev)!r} was asked for, but this torch ({torch.__version__}) sees no "
            "usable CUDA device; load with device='cpu'"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceUnavailableError(
            f"device {str(dev)!r} does not exist: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return dev


def _show(value: Any) -> str:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({type(value).__name__})"
