"""Faults between an s3:// store and its server (a SeaweedFS of this module's own,
behind tests/faultproxy.py): 503 SlowDown, connection resets before a request and
after the server did it, latency, the server stopped and restarted in the middle of
a save and of a load, and a writer SIGKILLed during its upload.

After each: the operation succeeded (retried) or raised a typed error; no partial
version is visible; every earlier version loads exactly; and gc after the grace
period leaves exactly the live packs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_sets_equal, small_set

import mmcore
from mmcore.errors import MMCoreError, RemoteStoreError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    from seaweed import serving

    yield from serving()  # (its own: these tests stop and restart it)


@pytest.fixture
def proxy(server: Any) -> Iterator[Any]:
    from faultproxy import FaultProxy

    p = FaultProxy(server.ports["s3"])
    try:
        yield p
    finally:
        p.close()


def _options(server: Any, proxy: Any) -> dict[str, Any]:
    return server.options(endpoint=proxy.endpoint, max_retries=6, retry_timeout_s=30,
                          timeout_s=20)  # fmt: skip


@pytest.fixture
def store(server: Any, proxy: Any) -> Iterator[tuple[mmcore.ModelStore, str]]:
    from seaweed import BUCKET

    url = f"s3://{BUCKET}/{os.urandom(6).hex()}"
    with mmcore.open(url, storage_options=_options(server, proxy)) as s:
        s.gc_grace_s = 0.0
        yield s, url


def _holds_exactly(store: mmcore.ModelStore, saved: dict[str, dict[str, Any]]) -> None:
    """The store's versions are ``saved`` (id -> models), each loads exactly, and gc
    leaves exactly the packs live versions use."""
    store.catalog.refresh()
    assert {i.id for i in store.versions()} == set(saved)
    for vid, models in saved.items():
        assert_sets_equal(store.load(vid), models)
    store.gc(grace_s=0)
    live = {store.storage.content(g.blob).pack for v in saved for g in store.manifest(v).groups}
    live |= {store.storage.content(b).pack for v in saved
             for b in ([store.manifest(v).update.delta_blob]
                       if store.manifest(v).update is not None else [])}  # fmt: skip
    assert set(store.tier.list()) == live
    assert store.check().problems == []


def _attempt(store: mmcore.ModelStore, saved: dict[str, Any], models: Any, **kw: Any) -> None:
    """A save that either returns (recorded in ``saved``) or raises a typed error."""
    try:
        saved[store.save(models, **kw)] = models
    except MMCoreError as exc:
        assert isinstance(exc, RemoteStoreError), exc


def is_put(line: bytes) -> bool:
    return line.startswith(b"PUT ")


def test_slowdown_replies_are_retried(store: Any, proxy: Any) -> None:
    s, _ = store
    saved = {s.save(small_set(20, seed=1)): small_set(20, seed=1)}
    proxy.slowdown(3)
    saved[s.save(small_set(20, seed=2))] = small_set(20, seed=2)
    proxy.slowdown(2)
    assert_sets_equal(s.load(next(iter(saved))), small_set(20, seed=1))
    assert sum(i.startswith("slowdown") for i in proxy.injected) == 5
    _holds_exactly(s, saved)


def test_connection_resets_in_a_save(store: Any, proxy: Any) -> None:
    s, _ = store
    saved = {s.save(small_set(20, seed=1)): small_set(20, seed=1)}
    for n in (1, 3):
        proxy.reset(n, is_put)
        _attempt(s, saved, small_set(20, seed=10 + n))
    assert any(i.startswith("reset") for i in proxy.injected)
    _holds_exactly(s, saved)


def test_replies_lost_after_the_server_acted(store: Any, proxy: Any) -> None:
    """The pack's PUT and the commit's conditional PUT land, their replies are lost:
    the retry of the commit finds it in the log (its token), not a conflict."""
    s, _ = store
    saved = {s.save(small_set(10, seed=1), ref="main"): small_set(10, seed=1)}
    proxy.lose(1, lambda line: b"/catalog/log/" in line and is_put(line))
    _attempt(s, saved, small_set(10, seed=2), ref="main")
    proxy.lose(1, lambda line: b"/packs/" in line and is_put(line))
    _attempt(s, saved, small_set(10, seed=3), ref="main")
    assert len(proxy.injected) == 2
    _holds_exactly(s, saved)
    assert s.refs()["main"] in saved


def test_latency_on_every_request(store: Any, proxy: Any) -> None:
    s, _ = store
    proxy.latency(0.02)
    v1 = s.save(small_set(30, seed=1))
    v2 = s.save(small_set(30, seed=2), approach="update", parent=v1)
    _holds_exactly(s, {v1: small_set(30, seed=1), v2: small_set(30, seed=2)})


def _restart_when(server: Any, proxy: Any, seen: Any) -> threading.Thread:
    """Stops the server once a request matching ``seen`` passed the proxy, and starts
    it again a second later (the proxy refuses connections meanwhile)."""

    def run() -> None:
        deadline = time.monotonic() + 60
        while not any(seen(r) for r in proxy.requests) and time.monotonic() < deadline:
            time.sleep(0.005)
        proxy.blackhole(True)
        server.stop()
        time.sleep(1.0)
        server.start()
        proxy.blackhole(False)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_the_server_restarts_during_a_save_and_a_load(server: Any, store: Any, proxy: Any) -> None:
    s, _ = store
    big = small_set(3000, seed=4)
    saved = {s.save(small_set(20, seed=1)): small_set(20, seed=1)}
    proxy.requests.clear()
    proxy.latency(0.01)
    restart = _restart_when(server, proxy, lambda line: b"/packs/" in line and is_put(line))
    _attempt(s, saved, big)
    restart.join()
    assert any(i.startswith("blackhole") for i in proxy.injected)  # the save met the stop
    proxy.injected.clear()
    vid = next(iter(saved))
    proxy.requests.clear()
    restart = _restart_when(server, proxy, lambda line: line.startswith(b"GET "))
    try:
        assert_sets_equal(s.load(vid), small_set(20, seed=1))
    except MMCoreError as exc:  # a typed error, never a wrong tensor
        assert isinstance(exc, RemoteStoreError), exc
    restart.join()
    assert any(i.startswith("blackhole") for i in proxy.injected)  # the load met it
    proxy.latency(0.0)
    _holds_exactly(s, saved)


def test_a_writer_killed_during_its_upload(server: Any, store: Any, proxy: Any,
                                           tmp_path: Path) -> None:  # fmt: skip
    s, url = store
    saved = {s.save(small_set(10, seed=1), ref="main"): small_set(10, seed=1)}
    proxy.requests.clear()
    proxy.latency(0.05)  # a slow upload, to be killed in
    script = tmp_path / "writer.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import mmcore
        from conftest import small_set
        s = mmcore.open({url!r}, storage_options={_options(server, proxy)!r})
        s.save(small_set(20000, seed=9), ref="main")
        print("saved")
    """)
    )
    writer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(b"/packs/" in r and is_put(r) for r in proxy.requests):
        assert writer.poll() is None and time.monotonic() < deadline, "no upload seen"
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    proxy.latency(0.0)
    proxy.settle()  # what it sent before it died reaches the server
    _holds_exactly(s, saved)
    assert s.refs()["main"] == next(iter(saved))
