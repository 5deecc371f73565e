"""An HTTP/1.1 proxy on 127.0.0.1 between an S3 client and its server that injects
faults request by request: latency, connection resets, ``503 SlowDown`` replies, and
a blackhole (the server unreachable: connections refused) while a test stops and
restarts the server. Each client connection gets its own upstream connection;
requests and responses are relayed whole (Content-Length or chunked bodies)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: 132\r\n\r\n"
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>".ljust(132)
)


class _Closed(Exception):
    pass


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> bytes:
    while True:
        at = buf.find(marker)
        if at >= 0:
            head = bytes(buf[: at + len(marker)])
            del buf[: at + len(marker)]
            return head
        data = sock.recv(65536)
        if not data:
            raise _Closed
        buf += data


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        data = sock.recv(max(65536, n - len(buf)))
        if not data:
            raise _Closed
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _message(sock: socket.socket, buf: bytearray, *, response_to: bytes | None = None) -> bytes:
    """One whole HTTP message (headers and body) read from ``sock``."""
    head = _read_until(sock, buf, b"\r\n\r\n")
    if response_to is not None:
        status = int(head.split(b" ", 2)[1])
        if response_to == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            return head
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        body = bytearray()
        while True:
            line = _read_until(sock, buf, b"\r\n")
            size = int(line.split(b";")[0], 16)
            body += line + _read_exact(sock, buf, size + 2)
            if size == 0:
                return head + bytes(body)
    length = int(_header(head, b"content-length") or b"0")
    return head + _read_exact(sock, buf, length)


class FaultProxy:
    """``port`` forwards to ``upstream``. Faults apply to the next requests, counted:
    ``slowdown(n)``, ``reset(n)`` (the connection dropped with a TCP RST instead of a
    reply), ``lose(n)`` (the server does it, the reply is lost), ``latency(seconds)``
    (before each request), ``blackhole(on)``. A ``when`` predicate on the request line
    picks which requests count."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._slowdowns = 0
        self._resets = 0
        self._losses = 0
        self._delay = 0.0
        self._blackhole = False
        self._when: Callable[[bytes], bool] = lambda line: True
        self.requests: list[bytes] = []
        self.in_flight = 0  # requests read from a client, not yet answered
        self.injected: list[str] = []
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True, name="faultproxy").start()

    # -- faults ----------------------------------------------------------
    def slowdown(self, n: int, when: Callable[[bytes], bool] | None = None) -> None:
        with self._lock:
            self._slowdowns, self._when = n, when or (lambda line: True)

    def reset(self, n: int, when: Callable[[bytes], bool] | None = None) -> None:
        with self._lock:
            self._resets, self._when = n, when or (lambda line: True)

    def lose(self, n: int, when: Callable[[bytes], bool] | None = None) -> None:
        """The next ``n`` requests reach the server, and their replies are lost (RST)."""
        with self._lock:
            self._losses, self._when = n, when or (lambda line: True)

    def latency(self, seconds: float) -> None:
        self._delay = seconds

    def blackhole(self, on: bool) -> None:
        self._blackhole = on

    def settle(self, timeout: float = 30.0) -> None:
        """Waits until no request is in flight (one a killed client sent still reaches
        the server, and acts there)."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._stopping = True
        self._listener.close()

    # -- relaying --------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._blackhole:
                self.injected.append("blackhole: a connection refused")
                _rst(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault(self, line: bytes) -> str | None:
        with self._lock:
            if not self._when(line):
                return None
            if self._slowdowns:
                self._slowdowns -= 1
                return "slowdown"
            if self._resets:
                self._resets -= 1
                return "reset"
            if self._losses:
                self._losses -= 1
                return "lose"
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        cbuf, ubuf = bytearray(), bytearray()
        counted = False
        try:
            while True:
                request = _message(client, cbuf)
                line = request.split(b"\r\n", 1)[0]
                with self._lock:
                    self.in_flight += 1
                counted = True
                self.requests.append(line)
                if self._delay:
                    time.sleep(self._delay)
                fault = "blackhole" if self._blackhole else self._fault(line)
                if fault:
                    self.injected.append(f"{fault}: {line.decode(errors='replace')}")
                if fault == "slowdown":
                    client.sendall(SLOWDOWN)
                    return
                if fault in ("reset", "blackhole"):
                    _rst(client)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=60)
                upstream.sendall(request)
                response = _message(upstream, ubuf, response_to=line.split(b" ", 1)[0])
                if fault == "lose":
                    _rst(client)
                    return
                client.sendall(response)
                with self._lock:
                    self.in_flight -= 1
                counted = False
        except (_Closed, OSError, ValueError):
            pass
        finally:
            if counted:
                with self._lock:
                    self.in_flight -= 1
            client.close()
            if upstream is not None:
                upstream.close()


def _rst(sock: socket.socket) -> None:
    """Closes with a TCP RST (SO_LINGER 0): the peer sees "connection reset"."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
