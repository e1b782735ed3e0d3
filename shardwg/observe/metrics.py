"""`--metrics ADDR:PORT`: Prometheus text format on /metrics and readiness on /healthz.

The page itself is written by shardwg.observe.exposition (prometheus_client): our per-worker
and per-peer families and prometheus_wireguard_exporter's three.

Served from the supervisor's select loop with non-blocking sockets, not a
thread: the supervisor forks replacement workers at any moment, and forking
while another thread holds a lock is how children deadlock. A client gets a few
seconds and 8 KiB to send its request; nothing it does can block the loop.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

from shardwg.observe.status import GatewayStatus

MAX_CLIENTS = 32
CLIENT_TIMEOUT = 3.0
MAX_REQUEST = 8192
HEALTHY_BEAT = 1.0  # a worker whose heartbeat is older than this is not ready


def parse_addr(text: str) -> tuple[str, int]:
    """`127.0.0.1:9586`, `[::1]:9586` or `:9586` (loopback)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics wants ADDR:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


def render(status: Callable[[], GatewayStatus] | GatewayStatus) -> str:
    """The /metrics page (shardwg.observe.exposition: a gateway without --metrics never loads
    prometheus_client)."""
    from shardwg.observe.exposition import render as _render

    return _render(status)


class MetricsServer:
    """Non-blocking HTTP/1.0 responder for /metrics and /healthz."""

    def __init__(
        self,
        addr: tuple[str, int],
        status: Callable[[], GatewayStatus],
        ready: Callable[[GatewayStatus], tuple[bool, str]],
    ) -> None:
        import shardwg.observe.exposition  # noqa: F401 - now, before workers fork, not mid-scrape

        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.status = status
        self.ready = ready
        self.clients: dict[socket.socket, tuple[float, bytearray]] = {}

    def fds(self) -> list[socket.socket]:
        return [self.sock, *self.clients]

    def poll(self) -> None:
        now = time.monotonic()
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while len(self.clients) < MAX_CLIENTS:
                conn, _ = self.sock.accept()
                conn.setblocking(False)
                self.clients[conn] = (now, bytearray())
        for conn, (born, buf) in list(self.clients.items()):
            try:
                chunk = conn.recv(4096)
            except BlockingIOError:
                chunk = None
            except OSError:
                self._drop(conn)
                continue
            if chunk == b"" or (chunk is not None and len(buf) + len(chunk) > MAX_REQUEST):
                self._drop(conn)
                continue
            if chunk:
                buf += chunk
            if b"\r\n\r\n" in buf or b"\n\n" in buf:
                self._answer(conn, bytes(buf))
            elif now - born > CLIENT_TIMEOUT:
                self._drop(conn)

    def _answer(self, conn: socket.socket, request: bytes) -> None:
        line = request.split(b"\n", 1)[0].decode("latin-1").split()
        path = line[1] if len(line) >= 2 else ""
        try:
            if line and line[0] not in ("GET", "HEAD"):
                code, body, ctype = 405, b"method not allowed\n", "text/plain"
            elif path.split("?")[0] == "/metrics":
                code, body, ctype = 200, render(self.status).encode(), CONTENT_TYPE
            elif path.split("?")[0] in ("/healthz", "/readyz"):
                ok, why = self.ready(self.status())
                code, body, ctype = (200 if ok else 503), (why + "\n").encode(), "text/plain"
            else:
                code, body, ctype = 404, b"not found\n", "text/plain"
        except Exception as exc:  # reading status failed: say so, never crash the loop
            code, body, ctype = 500, f"error: {exc}\n".encode(), "text/plain"
        reason = {
            200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"
        }  # fmt: skip
        data = body
        head = (
            f"HTTP/1.0 {code} {reason.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            conn.settimeout(1.0)
            conn.sendall(head + (b"" if line and line[0] == "HEAD" else data))
        except OSError:
            pass
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self.clients.pop(conn, None)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        for conn in list(self.clients):
            self._drop(conn)
        self.sock.close()
