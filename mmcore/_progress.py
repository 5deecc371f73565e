"""Progress bars for long work: shown on a terminal for large jobs only."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Below this many bytes a save or load is over before a bar is worth drawing.
MIN_BYTES_FOR_BAR = 256 << 20


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool | None) -> Iterator[Callable[[int], None]]:
    """Yields ``update(nbytes)``; thread-safe. ``enabled=None``: a terminal and a big job."""
    show = enabled if enabled is not None else (sys.stderr.isatty() and total >= MIN_BYTES_FOR_BAR)
    if not show:
        yield lambda n: None
        return
    from tqdm import tqdm

    lock = threading.Lock()
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:

        def update(n: int) -> None:
            with lock:
                bar.update(n)

        yield update
