"""`shardwg show` against a live sharded gateway: counters match the traffic sent."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from test_sharding import build_site

from lab.harness import Harness
from lab.ping import ping
from shardwg.datapath import select

pytestmark = [pytest.mark.interop, pytest.mark.netns]

SEND_UDP = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"x" * 100, (sys.argv[1], 9))
    time.sleep(0.002)
"""


def test_show_counts_packets_per_worker(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 2, 2)
    try:
        for ns, _wg, _kp in site.peers:
            assert ping(ns, "10.0.0.1", count=2, timeout=10)
        time.sleep(0.3)
        before = site.gw.show_json()
        ns, _wg, kp = site.peers[0]
        owner = {p["public_key"]: p["owner"] for p in before["peers"]}[kp[1]]
        assert sorted(p["owner"] for p in before["peers"]) == [0, 1]  # one peer per worker
        ns.run([sys.executable, "-c", SEND_UDP, "10.0.0.1", "300"], timeout=30)
        time.sleep(0.3)  # counters flush every 5 ms; peer records every second
        after = site.gw.show_json()
        delta = [
            a["rx_packets"] - b["rx_packets"]
            for a, b in zip(after["worker_stats"], before["worker_stats"], strict=True)
        ]
        assert 300 <= delta[owner] <= 302, delta  # allow a stray keepalive
        assert delta[1 - owner] <= 2, delta
        assert after["workers"] == 2 and after["interface"] == site.gw.ifname
        keys = {p["public_key"]: p for p in after["peers"]}
        assert keys[kp[1]]["owner"] == owner
        human = subprocess.run(
            [sys.executable, "-m", "shardwg", "show", site.gw.ifname],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert "workers:" in human and kp[1] in human
        want = select.describe()  # the gateway inherits this process's environment
        assert after["datapath"] == want and f"  data path: {want}" in human.splitlines()
        print("\n" + human)
    finally:
        assert site.gw.stop() == 0
