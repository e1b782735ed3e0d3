"""The /metrics page: prometheus_client's text exposition of one custom collector.

One status read per scrape, rendered by generate_latest on a private registry (nothing
global, nothing of the process's own): our per-worker and per-peer families, and
prometheus_wireguard_exporter's three (`wireguard_*`) so existing WireGuard dashboards and
alerts work unchanged. Imported on the first scrape only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from shardwg.observe.status import HEALTHY_BEAT, GatewayStatus

NONE = "(none)"  # `wg show dump`'s text for a peer without allowed IPs

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
    impl, _, detail = st.datapath.partition(" ")  # "impl (detail)", detail may hold (...)
    if detail.startswith("(") and detail.endswith(")"):
        detail = detail[1:-1]
    g = GaugeMetricFamily(
        "shardwg_datapath_info",
        "The data path the workers run (impl: native or python), always 1",
        labels=["interface", "impl", "detail"],
    )
    g.add_metric([iface, impl, detail], 1)
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
    if st.placement is not None:
        moves = CounterMetricFamily(
            "shardwg_placement_moves",
            "Peers moved between workers by placement (mode: load, count or hash)",
            labels=["interface", "mode"],
        )
        moves.add_metric([iface, st.placement.mode], st.placement.moves)
        yield moves
        last = GaugeMetricFamily(
            "shardwg_placement_last_move_seconds",
            "Unix time of the latest placement move, with its peer, workers and reason",
            labels=["interface", "public_key", "src", "dst", "reason"],
        )
        for m in st.placement.recent[:1]:
            last.add_metric([iface, m.public_key, str(m.src), str(m.dst), m.reason], m.time)
        yield last


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
    spread = GaugeMetricFamily(
        "shardwg_peer_spread",
        "1 for a peer every worker carries, with why (policy: --spread on, override: its "
        "Spread = on, packets: its Spread = packets, traffic: --spread auto found its worker "
        "saturated by it, fewer: --spread auto with fewer peers than workers found its "
        "worker busy with it)",
        labels=[*labels, "reason"],
    )
    now = time.time()
    for p in st.peers:
        key = [st.interface, p.public_key, str(p.owner)]
        rx.add_metric(key, p.rx_bytes)
        tx.add_metric(key, p.tx_bytes)
        last.add_metric(key, p.latest_handshake)
        age.add_metric(key, round(now - p.latest_handshake, 3) if p.latest_handshake else -1)
        if p.spread:
            spread.add_metric([*key, p.spread], 1)
    yield from (rx, tx, last, age, spread)


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
