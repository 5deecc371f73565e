"""Decode buffers (``codec.records.buffer``): a large one released is lent again, never
while a tensor over it is alive."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_sets_equal

import mmcore
from mmcore._native import core
from mmcore.codec import records

MB = 1 << 20
BIG = records.LARGE_BYTES + 3 * MB  # (regions come in steps of 2 MiB)


@pytest.fixture
def cache() -> Iterator[None]:
    """An empty cache of 256 MB, its old limit back afterwards."""
    old = records.buffer_cache()["limit"]
    records.buffer_cache(0)
    records.buffer_cache(256 * MB)
    yield
    records.buffer_cache(0)
    records.buffer_cache(old)


def test_a_released_buffer_is_lent_again_and_a_viewed_one_is_not(cache: None) -> None:
    a = records.buffer(BIG)
    assert a.numel() == BIG and a.dtype == torch.uint8
    first = a.data_ptr()
    a.fill_(1)
    view = a[5:9]
    del a  # its view holds it
    assert records.buffer_cache()["idle_buffers"] == 0
    b = records.buffer(BIG)
    assert b.data_ptr() != first
    b.fill_(2)
    assert torch.equal(view, torch.ones(4, dtype=torch.uint8))
    del view
    state = records.buffer_cache()
    assert (state["idle_buffers"], state["idle_bytes"]) == (1, 36 * MB)  # (in steps of 2 MiB)
    c = records.buffer(BIG - 2 * MB)
    assert c.data_ptr() == first and c.numel() == BIG - 2 * MB
    assert records.buffer_cache()["idle_buffers"] == 0
    del b, c
    assert records.buffer_cache()["idle_buffers"] == 2


def test_small_buffers_are_torch_s_own(cache: None) -> None:
    t = records.buffer(records.LARGE_BYTES - 1)
    assert t.numel() == records.LARGE_BYTES - 1
    del t
    assert records.buffer_cache()["idle_buffers"] == 0


def test_the_cache_keeps_its_limit_oldest_out_first(cache: None) -> None:
    records.buffer_cache(10 * MB)
    lent = [core().decode_buffer(n * MB) for n in (4, 4, 2)]
    addresses = [core().buffer_address(b) for b in lent]
    lent.pop(0)  # 4 MB idle
    lent.pop(0)  # 8 MB idle
    del lent[0]  # 10 MB idle
    assert records.buffer_cache() == {"limit": 10 * MB, "idle_bytes": 10 * MB, "idle_buffers": 3}
    big = core().decode_buffer(12 * MB)  # over the limit: unmapped when released
    del big
    assert records.buffer_cache()["idle_bytes"] == 10 * MB
    records.buffer_cache(6 * MB)  # the oldest (4 MB) goes
    assert records.buffer_cache() == {"limit": 6 * MB, "idle_bytes": 6 * MB, "idle_buffers": 2}
    again = core().decode_buffer(3 * MB)  # the idle 4 MB one (the smallest that fits)
    assert core().buffer_address(again) == addresses[1]
    small = core().decode_buffer(MB // 2)  # the idle 2 MB one is over twice that: not lent
    assert core().buffer_address(small) != addresses[2]
    assert records.buffer_cache()["idle_buffers"] == 1
    del again, small
    records.buffer_cache(0)
    assert records.buffer_cache() == {"limit": 0, "idle_bytes": 0, "idle_buffers": 0}
    none = core().decode_buffer(MB)
    del none
    assert records.buffer_cache()["idle_buffers"] == 0


def test_bad_limits_are_refused(cache: None) -> None:
    with pytest.raises(ValueError, match="must be >= 0 bytes, got -1"):
        records.buffer_cache(-1)
    with pytest.raises(ValueError, match="a decode buffer of 0 bytes"):
        core().decode_buffer(0)
    env = {**os.environ, "MMCORE_BUFFER_CACHE": "lots"}
    code = "from mmcore.codec import records; records.buffer(records.LARGE_BYTES)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "MMCORE_BUFFER_CACHE must be a number of bytes, got 'lots'" in run.stderr
    env["MMCORE_BUFFER_CACHE"] = "0"
    code = ("from mmcore.codec import records; t = records.buffer(records.LARGE_BYTES); del t;"
            "print(records.buffer_cache())")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert run.stdout.strip() == "{'limit': 0, 'idle_bytes': 0, 'idle_buffers': 0}"


def test_threads_never_hold_one_buffer_at_once(cache: None) -> None:
    records.buffer_cache(3 * BIG)
    errors: list[str] = []

    def work(k: int) -> None:
        for i in range(25):
            t = records.buffer(BIG if i % 2 else BIG - 4 * MB)
            t[:: 1 << 16].fill_(k)  # a byte a page or so, written and read back
            if not torch.all(t[:: 1 << 16] == k):
                errors.append(f"thread {k}, round {i}: a buffer another thread holds")
            del t

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert records.buffer_cache()["idle_bytes"] <= 3 * BIG + 4 * MB


def test_loads_into_lent_buffers_never_change_loads_still_held(
    store_path: Path, cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "LARGE_BYTES", 1 << 20)  # (the records: 4.8 MB)
    g = torch.Generator().manual_seed(0)
    models = {f"c{k:03d}": {"w": torch.randn(30000, generator=g) * 0.02} for k in range(40)}
    other = {name: {"w": sd["w"] + 1} for name, sd in models.items()}
    with mmcore.open(store_path) as store:
        vid = store.save(models, compress=True)
        vid2 = store.save(other, compress=True)
        a = store.load(vid)
        start = a["c000"]["w"].untyped_storage().data_ptr()
        b = store.load(vid2)
        assert b["c000"]["w"].untyped_storage().data_ptr() != start
        del a
        c = store.load(vid)  # a's buffer, lent again
        assert c["c000"]["w"].untyped_storage().data_ptr() == start
        assert_sets_equal(b, other)
        assert_sets_equal(c, models)
        one = c.pop("c007")
        del b, c  # one model of c still holds its buffer
        d = store.load(vid2)
        assert d["c000"]["w"].untyped_storage().data_ptr() != start
        assert_sets_equal({"c007": one}, {"c007": models["c007"]})
        assert_sets_equal(d, other)
