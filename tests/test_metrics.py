"""--metrics: /metrics parses as Prometheus text, /healthz follows the workers' heartbeats."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_sharding import ShmView, build_site

from lab.harness import Harness
from lab.netns import wait_for
from lab.ping import ping
from shardwg.datapath import select
from shardwg.observe.cpus import cpu_seconds
from shardwg.observe.metrics import parse_addr
from shardwg.observe.status import read_status

pytestmark = [pytest.mark.interop, pytest.mark.netns]

GET = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", 9586), timeout=5)
s.sendall(("GET %s HTTP/1.0\r\n\r\n" % sys.argv[1]).encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"""


def http_get(site, path: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    out = site.gw_ns.run([sys.executable, "-c", GET, path], timeout=15).stdout
    head, _, body = out.partition("\n\n")  # text mode turned \r\n into \n
    return int(head.split()[1]), body


def test_parse_addr() -> None:
    assert parse_addr("127.0.0.1:9586") == ("127.0.0.1", 9586)
    assert parse_addr("[::1]:9") == ("::1", 9)
    assert parse_addr(":9586") == ("127.0.0.1", 9586)
    for bad in ("9586", "x:y", "1.2.3.4:0", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            parse_addr(bad)


def test_metrics_and_healthz(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 2, 2)
    # the lab's gateway helper takes extra CLI args
    site.gw.stop()
    from lab.gateway_proc import ShardwgGateway

    gw = ShardwgGateway(
        site.gw_ns, site.gw.ifname, site.gw_keys[0], 51820, site.peer_conf, ["10.0.0.1/24"],
        workers=2, extra_args=["--metrics", "127.0.0.1:9586"],
    )  # fmt: skip
    site.gw = gw
    try:
        for ns, _wg, _kp in site.peers:
            assert ping(ns, "10.0.0.1", count=2, timeout=10), gw.log_text()
        time.sleep(1.2)
        code, body = http_get(site, "/metrics")
        assert code == 200, body
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert "shardwg_worker_rx_packets" in families  # counters lose _total in the parser
        rx = {s.labels["worker"]: s.value for s in families["shardwg_worker_rx_packets"].samples}
        assert set(rx) == {"0", "1"} and sum(rx.values()) > 0
        peers = families["shardwg_peer_last_handshake_seconds"].samples
        assert len(peers) == 2 and all(s.value > 0 for s in peers)
        (info,) = families["shardwg_datapath_info"].samples
        impl = select.current()
        assert info.labels["impl"] == impl.name and info.labels["detail"] == impl.detail
        assert info.value == 1
        assert http_get(site, "/healthz")[0] == 200
        assert http_get(site, "/nope")[0] == 404

        # a stopped worker makes the gateway not ready until the supervisor replaces it
        shm = ShmView(gw.ifname)
        try:
            victim = shm.workers()[1].pid
            os.kill(victim, signal.SIGSTOP)
            assert wait_for(lambda: http_get(site, "/healthz")[0] == 503, 5, interval=0.2)
            assert wait_for(lambda: shm.workers()[1].pid != victim, 10)
            assert wait_for(lambda: http_get(site, "/healthz")[0] == 200, 10, interval=0.2)
        finally:
            shm.close()
            subprocess.run(["kill", "-CONT", str(victim)], check=False)
        assert "stuck" in gw.log_text()
    finally:
        assert gw.stop() == 0


# -- prometheus_wireguard_exporter's families -------------------------------------------

EXPORTER = {  # family (as the parser names it) -> (type, `wg show dump` column)
    "wireguard_sent_bytes": ("counter", 6),
    "wireguard_received_bytes": ("counter", 5),
    "wireguard_latest_handshake_seconds": ("gauge", 4),
}


def metrics_gateway(netns_factory: Harness, n_peers: int = 2):  # type: ignore[no-untyped-def]
    """build_site's gateway replaced by one serving --metrics on 127.0.0.1:9586."""
    from lab.gateway_proc import ShardwgGateway

    site = build_site(netns_factory, n_peers, 2)
    site.gw.stop()
    site.gw = ShardwgGateway(
        site.gw_ns, site.gw.ifname, site.gw_keys[0], 51820, site.peer_conf, ["10.0.0.1/24"],
        workers=2, extra_args=["--metrics", "127.0.0.1:9586"],
    )  # fmt: skip
    return site


def served_names(body: str) -> set[str]:
    """Every metric name a query could use: sample names, and `_total` names of counters
    whose families have no sample yet (drops by reason before any drop)."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(body):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(fam.name + "_total")
    return names


DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "shardwg.json"
_METRIC = re.compile(r"\b(?:shardwg|wireguard)_[a-zA-Z0-9_]+")


def dashboard_queries(node: object) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str) and "(" in value:
                found.append(value)
            else:
                found += dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_queries(item)
    return found


def dashboard_metric_names() -> set[str]:
    return {m for q in dashboard_queries(json.loads(DASHBOARD.read_text())) for m in
            _METRIC.findall(q)}  # fmt: skip


def test_dashboard_shape() -> None:
    """Stacked per-worker CPU and packet panels, the exporter's families, our datasource."""
    dash = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dash["panels"]}
    stacked = [p for p in panels.values()
               if p.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
               .get("stacking", {}).get("mode") == "normal"]  # fmt: skip
    stacked_exprs = " ".join(t["expr"] for p in stacked for t in p["targets"])
    assert "rate(shardwg_worker_cpu_seconds_total" in stacked_exprs
    assert "rate(shardwg_worker_rx_packets_total" in stacked_exprs
    names = dashboard_metric_names()
    assert {"wireguard_sent_bytes_total", "wireguard_received_bytes_total",
            "wireguard_latest_handshake_seconds"} <= names  # fmt: skip
    assert len(names) >= 15 and all("{{worker}}" in t["legendFormat"]
                                    for p in stacked for t in p["targets"])  # fmt: skip
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
    # the check itself catches a name we do not serve
    assert _METRIC.findall('rate(shardwg_worker_bogus_total{x="y"}[1m])') == [
        "shardwg_worker_bogus_total"
    ]


def test_exporter_families_match_wg_show_dump(netns_factory: Harness) -> None:
    site = metrics_gateway(netns_factory)
    try:
        for ns, _wg, _kp in site.peers:
            assert ping(ns, "10.0.0.1", count=3, timeout=10), site.gw.log_text()
        time.sleep(1.3)  # owners publish peer records once a second

        def dump() -> dict[str, list[str]]:
            rows = site.gw_ns.run(["wg", "show", site.gw.ifname, "dump"]).stdout.splitlines()
            return {r.split("\t")[0]: r.split("\t") for r in rows[1:]}

        pids = {str(w.worker): w.pid for w in read_status(site.gw.ifname, interval=0).worker_stats}
        cpu_lo = {w: cpu_seconds(pid) for w, pid in pids.items()}
        before = dump()
        code, body = http_get(site, "/metrics")
        after = dump()
        cpu_hi = {w: cpu_seconds(pid) for w, pid in pids.items()}
        assert code == 200, body
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert len(before) == 2
        for name, (kind, column) in EXPORTER.items():
            fam = families[name]
            assert fam.type == kind, (name, fam.type)
            by_key = {s.labels["public_key"]: s for s in fam.samples}
            assert set(by_key) == set(before), name  # every peer, no other
            for key, sample in by_key.items():
                assert sample.name == name + ("_total" if kind == "counter" else "")
                assert set(sample.labels) == {"interface", "public_key", "allowed_ips"}
                assert sample.labels["interface"] == site.gw.ifname
                assert sample.labels["allowed_ips"] == before[key][3]  # "10.0.0.10/32"
                lo, hi = sorted((int(before[key][column]), int(after[key][column])))
                assert lo <= sample.value <= hi, (name, key, sample.value, lo, hi)
                assert sample.value > 0, (name, key)  # pings went both ways after a handshake
        cpu = {s.labels["worker"]: s.value for s in families["shardwg_worker_cpu_seconds"].samples}
        print(f"\nworker CPU seconds: /proc before {cpu_lo}, exporter {cpu}, /proc after {cpu_hi}")
        # each worker's own /proc figure, read around the scrape. Not "> 0": /proc counts in
        # 10 ms ticks, and a worker that served one handshake and 3 pings may have none yet.
        assert set(cpu) == set(pids) == {"0", "1"}
        assert all(cpu_lo[w] <= v <= cpu_hi[w] for w, v in cpu.items()), (cpu_lo, cpu, cpu_hi)
        unknown = dashboard_metric_names() - served_names(body)
        assert not unknown, f"deploy/grafana queries metrics the gateway does not serve: {unknown}"
    finally:
        assert site.gw.stop() == 0


def test_exporter_families_without_a_network() -> None:
    """A configured peer not yet published appears with zeros; no allowed IPs is "(none)"."""
    from shardwg.observe.metrics import render
    from shardwg.observe.status import GatewayStatus, PeerStatus, with_config

    published = PeerStatus("A" * 43 + "=", 1, "192.0.2.1:51820", 1700000123, 10, 20, True)
    gone = PeerStatus("B" * 43 + "=", 0, None, 0, 1, 1, False)  # removed, slot not wiped yet
    st = GatewayStatus("wg0", 51820, 2, 1, 1.0, True, False, [published, gone], [], {})
    new_key = "C" * 43 + "="
    st = with_config(st, {published.public_key: ["10.0.0.2/32", "10.9.0.0/16"], new_key: []})
    families = {f.name: f for f in text_string_to_metric_families(render(st))}
    sent = {s.labels["public_key"]: s for s in families["wireguard_sent_bytes"].samples}
    assert set(sent) == {published.public_key, new_key}
    assert sent[published.public_key].value == 20
    assert sent[published.public_key].labels["allowed_ips"] == "10.0.0.2/32,10.9.0.0/16"
    assert sent[new_key].labels["allowed_ips"] == "(none)" and sent[new_key].value == 0
    hs = {s.labels["public_key"]: s.value
          for s in families["wireguard_latest_handshake_seconds"].samples}  # fmt: skip
    assert hs == {published.public_key: 1700000123, new_key: 0}
    assert families["wireguard_received_bytes"].type == "counter"


def test_datapath_info_names_the_whole_data_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """impl and detail labels as `select.describe` put them together, for every data path."""
    from test_layout import data_path_descriptions

    from shardwg.observe.metrics import render
    from shardwg.observe.status import GatewayStatus

    for datapath in data_path_descriptions(monkeypatch):
        st = GatewayStatus("wg0", 51820, 2, 1, 1.0, True, False, [], [], {}, datapath=datapath)
        families = {f.name: f for f in text_string_to_metric_families(render(st))}
        (info,) = families["shardwg_datapath_info"].samples
        assert f"{info.labels['impl']} ({info.labels['detail']})" == datapath


def test_a_slow_render_never_blocks_the_loop() -> None:
    """/metrics is rendered by a forked child: while one renders (slowly, as 10,000 peers
    would), /healthz answers at once, a third concurrent scrape gets 503, and the page
    arrives whole."""
    import socket

    from shardwg.observe.metrics import MAX_RENDERERS, MetricsServer
    from shardwg.observe.status import GatewayStatus, PeerStatus

    parent = os.getpid()

    def status() -> GatewayStatus:
        if os.getpid() != parent:
            time.sleep(1.5)  # the render child only
        peer = PeerStatus("A" * 43 + "=", 0, None, 0, 5, 7, False, ["10.0.0.2/32"])
        return GatewayStatus("wg0", 51820, 1, parent, 1.0, True, False, [peer], [], {})

    srv = MetricsServer(("127.0.0.1", 0), status, lambda st: (True, "ok"))
    port = srv.sock.getsockname()[1]

    def request(path: str) -> socket.socket:
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return c

    def pump_until(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            srv.poll()
            if cond():
                return True
            time.sleep(0.01)
        return False

    def read_all(c: socket.socket) -> bytes:
        data = b""
        while chunk := c.recv(65536):
            data += chunk
        c.close()
        return data

    try:
        scrapes = [request("/metrics") for _ in range(MAX_RENDERERS)]
        assert pump_until(lambda: len(srv.renderers) == MAX_RENDERERS, 3)
        busy = request("/metrics")
        health = request("/healthz")
        t0 = time.monotonic()
        assert pump_until(lambda: not srv.clients, 3)
        assert time.monotonic() - t0 < 0.5  # answered while both renders still run
        assert read_all(health).startswith(b"HTTP/1.0 200") and srv.renderers
        assert read_all(busy).startswith(b"HTTP/1.0 503")
        for c in scrapes:
            page = read_all(c)
            assert page.startswith(b"HTTP/1.0 200") and b"version=0.0.4" in page
            body = page.split(b"\r\n\r\n", 1)[1].decode()
            fams = {f.name: f for f in text_string_to_metric_families(body)}
            assert fams["wireguard_sent_bytes"].samples[0].value == 7
        assert pump_until(lambda: not srv.renderers, 3)  # children reaped
    finally:
        srv.close()
