"""`--metrics ADDR:PORT`: Prometheus text format on /metrics and readiness on /healthz.

The page is prometheus_client's text exposition of a custom collector (one status read per
scrape) on a private registry: our per-worker and per-peer families, plus the three of
prometheus_wireguard_exporter that existing WireGuard dashboards read.

Served from the supervisor's select loop with non-blocking sockets, not a
thread: the supervisor forks replacement workers at any moment, and forking
while another thread holds a lock is how children deadlock. A client gets a few
seconds and 8 KiB to send its request; nothing it does can block the loop.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

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


_PER_WORKER: tuple[tuple[str, str, str, str], ...] = (
    ("heartbeat_age_seconds", "heartbeat_age", "gauge", "Seconds since the last heartbeat"),
    ("peers", "peers_owned", "gauge", "Peers owned by the worker"),
    ("restarts", "restarts", "counter", "Times the worker was replaced"),
    *((f, f, "counter", text) for f, text in _WORKER_COUNTERS),
    ("cpu_seconds", "cpu_seconds", "counter",
     "CPU time (user + system) of the current worker process"),
    ("initiations_offered", "initiations_offered", "gauge", "Cookie-less initiations/s arriving"),
    ("initiation_share", "initiation_share", "gauge", "Share of them the kernel filter admits"),
)  # fmt: skip


def parse_addr(text: str) -> tuple[str, int]:
    """`127.0.0.1:9586`, `[::1]:9586` or `:9586` (loopback)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics wants ADDR:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


# what generate_latest writes (0.0.4 text), whatever the newest format prometheus_client knows
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NONE = "(none)"  # `wg show dump`'s text for a peer without allowed IPs


class GatewayCollector(Collector):
    """Every family of one scrape from one status read: our per-worker and per-peer families,
    and prometheus_wireguard_exporter's three (`wireguard_*`, labels interface, public_key,
    allowed_ips as `wg show dump` writes them) so existing WireGuard dashboards and alerts
    work unchanged."""

    def __init__(self, status: Callable[[], GatewayStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        yield from worker_families(st)
        yield from peer_families(st)
        yield from exporter_families(st)


def worker_families(st: GatewayStatus) -> Iterator[Metric]:
    iface = st.interface
    g = GaugeMetricFamily("shardwg_workers", "Worker processes configured", labels=["interface"])
    g.add_metric([iface], st.workers)
    yield g
    g = GaugeMetricFamily(
        "shardwg_under_load", "1 while handshakes need cookies", labels=["interface"]
    )
    g.add_metric([iface], int(st.under_load))
    yield g
    labels = ["interface", "worker"]
    up = GaugeMetricFamily(
        "shardwg_worker_up", "1 if the worker process is alive and beating", labels=labels
    )
    for w in st.worker_stats:
        up.add_metric([iface, str(w.worker)], int(w.alive and w.heartbeat_age < HEALTHY_BEAT))
    yield up
    for name, attr, kind, text in _PER_WORKER:
        fam: Metric
        if kind == "counter":
            fam = CounterMetricFamily(f"shardwg_worker_{name}", text, labels=labels)
        else:
            fam = GaugeMetricFamily(f"shardwg_worker_{name}", text, labels=labels)
        for w in st.worker_stats:
            fam.add_metric([iface, str(w.worker)], getattr(w, attr))
        yield fam
    drops = CounterMetricFamily(
        "shardwg_worker_drops", "Packets dropped, by reason", labels=[*labels, "reason"]
    )
    for w in st.worker_stats:
        for reason, n in sorted(w.drops.items()):
            drops.add_metric([iface, str(w.worker), reason], n)
    yield drops


def peer_families(st: GatewayStatus) -> Iterator[Metric]:
    labels = ["interface", "public_key", "worker"]
    rx = CounterMetricFamily("shardwg_peer_rx_bytes", "Bytes received from the peer", labels=labels)
    tx = CounterMetricFamily("shardwg_peer_tx_bytes", "Bytes sent to the peer", labels=labels)
    last = GaugeMetricFamily(
        "shardwg_peer_last_handshake_seconds",
        "Unix time of the last handshake (0: never)",
        labels=labels,
    )
    age = GaugeMetricFamily(
        "shardwg_peer_handshake_age_seconds",
        "Seconds since the last handshake (-1: never)",
        labels=labels,
    )
    now = time.time()
    for p in st.peers:
        key = [st.interface, p.public_key, str(p.owner)]
        rx.add_metric(key, p.rx_bytes)
        tx.add_metric(key, p.tx_bytes)
        last.add_metric(key, p.latest_handshake)
        age.add_metric(key, round(now - p.latest_handshake, 3) if p.latest_handshake else -1)
    yield from (rx, tx, last, age)


def exporter_families(st: GatewayStatus) -> Iterator[Metric]:
    """prometheus_wireguard_exporter's names, types and labels, for every configured peer."""
    labels = ["interface", "public_key", "allowed_ips"]
    sent = CounterMetricFamily("wireguard_sent_bytes", "Bytes sent to the peer", labels=labels)
    received = CounterMetricFamily(
        "wireguard_received_bytes", "Bytes received from the peer", labels=labels
    )
    handshake = GaugeMetricFamily(
        "wireguard_latest_handshake_seconds",
        "Unix time of the last handshake (0: never)",
        labels=labels,
    )
    for p in st.peers:
        key = [st.interface, p.public_key, ",".join(p.allowed_ips) or NONE]
        sent.add_metric(key, p.tx_bytes)
        received.add_metric(key, p.rx_bytes)
        handshake.add_metric(key, p.latest_handshake)
    yield from (sent, received, handshake)


def render(status: Callable[[], GatewayStatus] | GatewayStatus) -> str:
    """The text exposition of one scrape, written by prometheus_client on a private registry
    (nothing global, nothing of the process's own)."""
    fn = status if callable(status) else (lambda: status)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(fn))
    return generate_latest(registry).decode()


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
