"""--metrics: /metrics parses as Prometheus text, /healthz follows the workers' heartbeats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_sharding import ShmView, build_site

from lab.harness import Harness
from lab.netns import wait_for
from lab.ping import ping
from shardwg.observe.metrics import parse_addr

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
