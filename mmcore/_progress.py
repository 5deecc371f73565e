"""Progress bars for long work: shown on a terminal for large jobs only."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Below this many models a save is over before a bar is worth drawing.
MIN_ITEMS_FOR_BAR = 5000


@contextmanager
def progress_bar(
    total: int | None,
    desc: str,
    enabled: bool | None,
    *,
    unit: str = "B",
    min_total: int = MIN_ITEMS_FOR_BAR,
) -> Iterator[Callable[[int], None]]:
    """Yields ``update(n)``; thread-safe. ``enabled=None``: on a terminal, for big jobs only."""
    big = total is None or total >= min_total
    show = enabled if enabled is not None else (sys.stderr.isatty() and big)
    if not show:
        yield lambda n: None
        return
    from tqdm import tqdm

    lock = threading.Lock()
    scale = unit == "B"
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, leave=False) as bar:

        def update(n: int) -> None:
            with lock:
                bar.update(n)

        yield update
