"""`--metrics ADDR:PORT`: Prometheus text format on /metrics and readiness on /healthz.

The page itself is written by shardwg.observe.exposition (prometheus_client): our per-worker
and per-peer families and prometheus_wireguard_exporter's three.

Served from the supervisor's select loop with non-blocking sockets, not a
thread: the supervisor forks replacement workers at any moment, and forking
while another thread holds a lock is how children deadlock. A client gets a few
seconds and 8 KiB to send its request; nothing it does can block the loop. The
/metrics page itself is rendered and sent by a short-lived forked child
(`MetricsServer`), as rendering grows with the peer count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable

from shardwg.observe.status import GatewayStatus

MAX_CLIENTS = 32
CLIENT_TIMEOUT = 3.0
MAX_REQUEST = 8192
MAX_RENDERERS = 2  # /metrics answers being rendered by children at once
RENDER_DEADLINE = 30  # seconds a rendering child may live (SIGALRM)


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
    """Non-blocking HTTP/1.0 responder for /metrics and /healthz.

    prometheus_client's exposition costs ~45 us per sample (330 ms for 1,000 peers, 3.3 s for
    10,000, in which time the loop would serve no UAPI request), so a /metrics request is
    answered by a forked child: it reads the status, renders and sends, then exits, while the
    loop goes on. At most MAX_RENDERERS at once (503 beyond), each
    ended by SIGALRM after RENDER_DEADLINE seconds. The owner must count `renderers` as its
    own processes (they hold inherited descriptors until they exit). /healthz stays in the
    loop: it is cheap."""

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
        self.renderers: set[int] = set()  # pids of children rendering a /metrics answer

    def fds(self) -> list[socket.socket]:
        return [self.sock, *self.clients]

    def poll(self) -> None:
        self._reap_renderers()
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
        method = line[0] if line else ""
        path = (line[1] if len(line) >= 2 else "").split("?")[0]
        if method in ("GET", "HEAD") and path == "/metrics":
            self._render_in_child(conn, method == "HEAD")
            return
        self._send(conn, *self._page(method, path), head_only=method == "HEAD")
        self._drop(conn)

    def _page(self, method: str, path: str) -> tuple[int, bytes, str]:
        try:
            if method not in ("GET", "HEAD"):
                return 405, b"method not allowed\n", "text/plain"
            if path == "/metrics":
                return 200, render(self.status).encode(), CONTENT_TYPE
            if path in ("/healthz", "/readyz"):
                ok, why = self.ready(self.status())
                return (200 if ok else 503), (why + "\n").encode(), "text/plain"
            return 404, b"not found\n", "text/plain"
        except Exception as exc:  # reading status failed: say so, never crash the loop
            return 500, f"error: {exc}\n".encode(), "text/plain"

    @staticmethod
    def _send(
        conn: socket.socket, code: int, body: bytes, ctype: str, head_only: bool,
        timeout: float = 1.0,
    ) -> None:  # fmt: skip
        reason = {
            200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"
        }  # fmt: skip
        head = (
            f"HTTP/1.0 {code} {reason.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            conn.settimeout(timeout)
            conn.sendall(head + (b"" if head_only else body))
        except OSError:
            pass

    def _render_in_child(self, conn: socket.socket, head_only: bool) -> None:
        if len(self.renderers) >= MAX_RENDERERS:
            busy = b"busy: other scrapes are being rendered; retry\n"
            self._send(conn, 503, busy, "text/plain", head_only)
            self._drop(conn)
            return
        try:
            pid = os.fork()
        except OSError as exc:
            self._send(conn, 500, f"error: {exc}\n".encode(), "text/plain", head_only)
            self._drop(conn)
            return
        if pid == 0:  # pragma: no cover - the child: answer, then leave without cleanup
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.alarm(RENDER_DEADLINE)
                self._send(conn, *self._page("GET", "/metrics"), head_only, timeout=10.0)
                code = 0
            finally:
                os._exit(code)
        self.renderers.add(pid)
        self._drop(conn)  # the child has its own copy of the connection

    def _reap_renderers(self) -> None:
        for pid in list(self.renderers):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by the owner's waitpid(-1)
                done = pid
            if done:
                self.renderers.discard(pid)

    def _drop(self, conn: socket.socket) -> None:
        self.clients.pop(conn, None)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        for conn in list(self.clients):
            self._drop(conn)
        self.sock.close()
        for pid in list(self.renderers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.renderers.clear()
