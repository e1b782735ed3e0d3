"""`--metrics ADDR:PORT`: Prometheus text format on /metrics and readiness on /healthz.

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

_WORKER_COUNTERS = (
    ("rx_packets", "Datagrams received from the network"),
    ("rx_bytes", "Bytes received from the network"),
    ("tx_packets", "Datagrams sent to the network"),
    ("tx_bytes", "Bytes sent to the network"),
    ("handshakes_sent", "Handshake initiations sent"),
    ("handshakes_received", "Handshake messages received"),
    ("handshakes_completed", "Handshakes completed"),
    ("handoffs_in", "Packets handed to this worker by others"),
    ("handoffs_out", "Packets this worker handed to owners"),
    ("kernel_drops", "Datagrams the kernel dropped on the worker's sockets (full buffer, filter)"),
)


def parse_addr(text: str) -> tuple[str, int]:
    """`127.0.0.1:9586`, `[::1]:9586` or `:9586` (loopback)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics wants ADDR:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(st: GatewayStatus) -> str:
    out: list[str] = []
    iface = _esc(st.interface)

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP shardwg_{name} {text}")
        out.append(f"# TYPE shardwg_{name} {kind}")

    family("workers", "gauge", "Worker processes configured")
    out.append(f'shardwg_workers{{interface="{iface}"}} {st.workers}')
    family("under_load", "gauge", "1 while handshakes need cookies")
    out.append(f'shardwg_under_load{{interface="{iface}"}} {int(st.under_load)}')
    family("worker_up", "gauge", "1 if the worker process is alive and beating")
    for w in st.worker_stats:
        up = int(w.alive and w.heartbeat_age < HEALTHY_BEAT)
        out.append(f'shardwg_worker_up{{interface="{iface}",worker="{w.worker}"}} {up}')
    per_worker: list[tuple[str, str, str, str]] = [
        ("heartbeat_age_seconds", "heartbeat_age", "gauge", "Seconds since the last heartbeat"),
        ("peers", "peers_owned", "gauge", "Peers owned by the worker"),
        ("restarts_total", "restarts", "counter", "Times the worker was replaced"),
        *((f"{f}_total", f, "counter", text) for f, text in _WORKER_COUNTERS),
        ("initiations_offered", "initiations_offered", "gauge",
         "Cookie-less initiations/s arriving"),
        ("initiation_share", "initiation_share", "gauge",
         "Share of them the kernel filter admits"),
    ]  # fmt: skip
    for name, attr, kind, text in per_worker:
        family(f"worker_{name}", kind, text)
        for w in st.worker_stats:
            out.append(
                f'shardwg_worker_{name}{{interface="{iface}",worker="{w.worker}"}}'
                f" {getattr(w, attr)}"
            )
    family("worker_drops_total", "counter", "Packets dropped, by reason")
    for w in st.worker_stats:
        for reason, n in sorted(w.drops.items()):
            out.append(
                f'shardwg_worker_drops_total{{interface="{iface}",worker="{w.worker}",'
                f'reason="{_esc(reason)}"}} {n}'
            )
    now = time.time()
    for name, kind, text in (
        ("peer_rx_bytes_total", "counter", "Bytes received from the peer"),
        ("peer_tx_bytes_total", "counter", "Bytes sent to the peer"),
        ("peer_last_handshake_seconds", "gauge", "Unix time of the last handshake (0: never)"),
        ("peer_handshake_age_seconds", "gauge", "Seconds since the last handshake (-1: never)"),
    ):
        family(name, kind, text)
        for p in st.peers:
            if name == "peer_rx_bytes_total":
                value: float = p.rx_bytes
            elif name == "peer_tx_bytes_total":
                value = p.tx_bytes
            elif name == "peer_last_handshake_seconds":
                value = p.latest_handshake
            else:
                value = round(now - p.latest_handshake, 3) if p.latest_handshake else -1
            out.append(
                f'shardwg_{name}{{interface="{iface}",public_key="{_esc(p.public_key)}",'
                f'worker="{p.owner}"}} {value}'
            )
    return "\n".join(out) + "\n"


class MetricsServer:
    """Non-blocking HTTP/1.0 responder for /metrics and /healthz."""

    def __init__(
        self,
        addr: tuple[str, int],
        status: Callable[[], GatewayStatus],
        ready: Callable[[GatewayStatus], tuple[bool, str]],
    ) -> None:
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
                code, body, ctype = 405, "method not allowed\n", "text/plain"
            elif path.split("?")[0] == "/metrics":
                code, body = 200, render(self.status())
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            elif path.split("?")[0] in ("/healthz", "/readyz"):
                ok, why = self.ready(self.status())
                code, body, ctype = (200 if ok else 503), why + "\n", "text/plain"
            else:
                code, body, ctype = 404, "not found\n", "text/plain"
        except Exception as exc:  # reading status failed: say so, never crash the loop
            code, body, ctype = 500, f"error: {exc}\n", "text/plain"
        reason = {
            200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"
        }  # fmt: skip
        data = body.encode()
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
