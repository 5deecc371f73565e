"""Pauses Python's cyclic GC while building many small objects.

Creating tens of thousands of tensors and dicts triggers repeated full
collections that walk every live object (the user's models included); the
objects built here hold no reference cycles, so the pause is safe.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
