"""Typed access to a decoded msgpack record: every field is checked for its
type and range, so a damaged catalog record gives a CorruptRecordError that
names the record and the field, never a KeyError or a TypeError.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import CorruptRecordError

DAMAGED = "the store's catalog is damaged; restore the store from a copy"
_MAX_INT = (1 << 63) - 1
_HEX = frozenset("0123456789abcdef")


class Record:
    def __init__(self, raw: dict[Any, Any], what: str) -> None:
        self.raw = raw
        self.what = what

    def corrupt(self, problem: str) -> CorruptRecordError:
        return CorruptRecordError(f"{self.what} record: {problem}; {DAMAGED}")

    def _get(self, key: str) -> Any:
        if key not in self.raw:
            raise self.corrupt(f"field {key!r} is missing")
        return self.raw[key]

    def _bad(self, key: str, want: str, value: Any) -> CorruptRecordError:
        return self.corrupt(f"field {key!r} should be {want}, is {type(value).__name__}")

    def integer(self, key: str, *, minimum: int = 0) -> int:
        return self.check_integer(self._get(key), key, minimum=minimum)

    def check_integer(self, value: Any, key: str, *, minimum: int = 0) -> int:
        if type(value) is not int:  # bool is an int subclass: refused
            raise self._bad(key, "an integer", value)
        if not minimum <= value <= _MAX_INT:
            raise self.corrupt(f"field {key!r} is {value}, out of range")
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self._bad(key, "a finite number", value)
        return float(value)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string or nil", value)
        return value

    def binary(self, key: str) -> bytes:
        value = self._get(key)
        if not isinstance(value, bytes):
            raise self._bad(key, "bytes", value)
        return value

    def optional_binary(self, key: str) -> bytes | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, bytes):
            raise self._bad(key, "bytes or nil", value)
        return value

    def array(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, "a list", value)
        return value

    def text_list(self, key: str) -> list[str]:
        return self.check_text_list(self.array(key), key)

    def check_text_list(self, values: Any, key: str) -> list[str]:
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise self.corrupt(f"field {key!r} should hold lists of strings only")
        return values

    def submap(self, key: str) -> Record:
        value = self._get(key)
        if not isinstance(value, dict):
            raise self._bad(key, "a map", value)
        return Record(value, f"{self.what} {key}")

    def optional_map(self, key: str) -> dict[str, Any]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._bad(key, "a map or nil", value)
        return value

    def map_list(self, key: str) -> list[Record]:
        values = self.array(key)
        if not all(isinstance(v, dict) for v in values):
            raise self.corrupt(f"field {key!r} should hold maps only")
        return [Record(v, f"{self.what} {key}[{i}]") for i, v in enumerate(values)]

    def integer_pair(self, key: str) -> tuple[int, int]:
        value = self._get(key)
        if not isinstance(value, list) or len(value) != 2:
            raise self._bad(key, "a pair of integers", value)
        return self.check_integer(value[0], key), self.check_integer(value[1], key)

    def integer_pairs(self, key: str) -> list[tuple[int, int]]:
        out = []
        for pair in self.array(key):
            if not isinstance(pair, list) or len(pair) != 2:
                raise self._bad(key, "a list of integer pairs", pair)
            out.append((self.check_integer(pair[0], key), self.check_integer(pair[1], key)))
        return out

    def pack_id(self, key: str) -> str:
        value = self.text(key)
        if len(value) != 16 or not set(value) <= _HEX:
            raise self.corrupt(f"field {key!r} is {value!r}, not a pack id (16 hex digits)")
        return value


def ref_target(ref: str, raw: bytes) -> str:
    """The version id a ref's value names; CorruptRecordError if it names none."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptRecordError(
            f"ref {ref!r} holds {raw[:20]!r}, not a version id: the store's catalog is damaged"
        ) from None
