"""Timing and memory helpers: medians of repeated runs, peak RSS by sampling."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def timed(
    fn: Callable[[], T], repeat: int = 3, setup: Callable[[], Any] | None = None
) -> tuple[float, T]:
    """Median wall time of ``repeat`` runs (``setup`` runs untimed before each) and the last result."""
    times = []
    result: Any = None
    for _ in range(repeat):
        result = None  # before setup: a result that maps a file would keep its pages cached
        gc.collect()
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss(interval: float = 0.002) -> Iterator[dict[str, int]]:
    """Samples this process's RSS while the block runs; yields {'start', 'peak'} (bytes)."""
    result = {"start": rss_bytes(), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        peak = result["start"]
        while not stop.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(interval)
        result["peak"] = max(peak, rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def evict(paths: list[Path]) -> None:
    """Drops files from the page cache (no root needed), for cold-read timings."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def assert_same_models(got: Any, want: Any) -> None:
    """``got`` ({name: {tensor name: tensor}}) holds ``want``'s models, tensors and
    bytes, in the same orders: every bit compared."""
    import torch

    assert list(got) == list(want)
    for n, sd in want.items():
        assert list(got[n]) == list(sd), n
        for k, t in sd.items():
            a, b = got[n][k].contiguous().reshape(-1), t.contiguous().reshape(-1)
            assert a.dtype == b.dtype and got[n][k].shape == t.shape, (n, k)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (n, k)
