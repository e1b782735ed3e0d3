"""shardwg against a real wireguard-go peer, in network namespaces, in both roles.

Topology: namespace `gw` runs `shardwg run`, namespace `peer` runs wireguard-go;
a veth pair joins them (underlay 10.99.0.0/24 and fd99::/64); the tunnel carries
10.0.0.0/24 and fd00::/64. Nothing leaves the namespaces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from lab.gateway_proc import ShardwgGateway
from lab.harness import Harness
from lab.keys import genpsk, keypair
from lab.netns import Namespace, unique_ifname, veth_link
from lab.ping import icmp_echo, ping
from lab.transfer import Transfer

pytestmark = [pytest.mark.interop, pytest.mark.netns]

GW_PORT, PEER_PORT = 51820, 51821


@dataclass
class Topology:
    gw_ns: Namespace
    peer_ns: Namespace
    gw_keys: tuple[str, str]
    peer_keys: tuple[str, str]


@pytest.fixture
def topo(netns_factory: Harness) -> Topology:
    gw_ns, peer_ns = netns_factory(2)
    veth_link(gw_ns, peer_ns, ["10.99.0.1/24", "fd99::1/64"], ["10.99.0.2/24", "fd99::2/64"])
    return Topology(gw_ns, peer_ns, keypair(), keypair())


def start_pair(
    harness: Harness,
    t: Topology,
    *,
    gw_initiates: bool,
    psk: str | None = None,
    v6_underlay: bool = False,
    workers: int = 1,
    gw_keepalive: int = 0,
    gw_args: list[str] | None = None,
) -> tuple[ShardwgGateway, Any]:
    gw_ep = "[fd99::1]" if v6_underlay else "10.99.0.1"
    peer_ep = "[fd99::2]" if v6_underlay else "10.99.0.2"
    wg = harness.wireguard_go(
        t.peer_ns,
        unique_ifname("wgp"),
        t.peer_keys[0],
        PEER_PORT,
        [{
            "public_key": t.gw_keys[1],
            "preshared_key": psk,
            "allowed_ips": ["10.0.0.1/32", "fd00::1/128"],
            "endpoint": None if gw_initiates else f"{gw_ep}:{GW_PORT}",
        }],
        ["10.0.0.2/24", "fd00::2/64"],
    )  # fmt: skip
    gw = ShardwgGateway(
        t.gw_ns,
        unique_ifname("swg"),
        t.gw_keys[0],
        GW_PORT,
        [{
            "public_key": t.peer_keys[1],
            "preshared_key": psk,
            "allowed_ips": ["10.0.0.2/32", "fd00::2/128"],
            "endpoint": f"{peer_ep}:{PEER_PORT}" if gw_initiates else None,
            "persistent_keepalive": gw_keepalive,
        }],
        ["10.0.0.1/24", "fd00::1/64"],
        workers=workers,
        extra_args=gw_args,
    )  # fmt: skip
    return gw, wg


def test_shardwg_initiates(netns_factory: Harness, topo: Topology) -> None:
    gw, wg = start_pair(netns_factory, topo, gw_initiates=True)
    try:
        t0 = time.monotonic()
        assert ping(topo.gw_ns, "10.0.0.2", count=1, timeout=10), gw.log_text()
        handshake_ms = (time.monotonic() - t0) * 1000
        assert wg.latest_handshake(topo.gw_keys[1]) > 0
        assert ping(topo.gw_ns, "10.0.0.2", count=5, timeout=10)
        assert ping(topo.peer_ns, "10.0.0.1", count=5, timeout=10)
        print(f"first ping incl. handshake: {handshake_ms:.1f} ms")
    finally:
        assert gw.stop() == 0
        assert "removed" in gw.log_text()


def test_wireguard_go_initiates(netns_factory: Harness, topo: Topology) -> None:
    gw, wg = start_pair(netns_factory, topo, gw_initiates=False)
    try:
        assert ping(topo.peer_ns, "10.0.0.1", count=3, timeout=10), gw.log_text()
        assert ping(topo.gw_ns, "10.0.0.2", count=3, timeout=10)
        # shardwg learned wireguard-go's endpoint from the handshake (roaming)
        assert wg.latest_handshake(topo.gw_keys[1]) > 0
    finally:
        assert gw.stop() == 0


@pytest.mark.parametrize("direction", ["gw_to_peer", "peer_to_gw"])
def test_tcp_20mb_sha256(netns_factory: Harness, topo: Topology, direction: str) -> None:
    gw, _wg = start_pair(netns_factory, topo, gw_initiates=direction == "gw_to_peer")
    try:
        if direction == "gw_to_peer":
            tr = Transfer(topo.peer_ns, topo.gw_ns, "10.0.0.2", 5201, 20 * 1024 * 1024)
        else:
            tr = Transfer(topo.gw_ns, topo.peer_ns, "10.0.0.1", 5201, 20 * 1024 * 1024)
        sent, received, n, secs = tr.run()
        assert n == 20 * 1024 * 1024
        assert sent == received
        print(f"{direction}: 20 MiB in {secs:.2f} s = {n * 8 / secs / 1e6:.0f} Mbit/s")
    finally:
        assert gw.stop() == 0


@pytest.mark.parametrize(("direction", "mode"),
                         [("gw_to_peer", "on"), ("peer_to_gw", "on"), ("gw_to_peer", "off")])
def test_tcp_with_tun_offloads(netns_factory: Harness, topo: Topology, direction: str,
                               mode: str) -> None:  # fmt: skip
    """--tun-offload on: TSO/USO super-packets from the TUN are cut and checksummed by the
    seal kernel; off: plain reads. Either way, with either data path (SHARDWG_NATIVE)."""
    gw, _wg = start_pair(netns_factory, topo, gw_initiates=direction == "gw_to_peer",
                         workers=2, gw_args=["--tun-offload", mode])  # fmt: skip
    try:
        if direction == "gw_to_peer":
            tr = Transfer(topo.peer_ns, topo.gw_ns, "10.0.0.2", 5203, 20 * 1024 * 1024)
        else:
            tr = Transfer(topo.gw_ns, topo.peer_ns, "10.0.0.1", 5203, 20 * 1024 * 1024)
        sent, received, n, secs = tr.run()
        assert n == 20 * 1024 * 1024 and sent == received
        assert ping(topo.gw_ns, "fd00::2", count=2, timeout=10)  # IPv6 through split too
        text = gw.log_text()
        assert (f"TUN offloads {'wanted' if mode == 'on' else 'off'}" in text), text
        if mode == "on":  # taken (this kernel has TSO), or refused and said so once
            assert text.count("offloads on:") + text.count("refused TUN offloads") == 1, text
        print(f"offload {direction}: {n * 8 / secs / 1e6:.0f} Mbit/s")
    finally:
        assert gw.stop() == 0


def test_preshared_key(netns_factory: Harness, topo: Topology) -> None:
    gw, wg = start_pair(netns_factory, topo, gw_initiates=True, psk=genpsk())
    try:
        assert ping(topo.gw_ns, "10.0.0.2", count=3, timeout=10), gw.log_text()
    finally:
        gw.stop()


def test_preshared_key_mismatch_fails(netns_factory: Harness, topo: Topology) -> None:
    # the peer keeps one psk, the gateway another: no session may form
    wg_psk, gw_psk = genpsk(), genpsk()
    gw, wg = start_pair(netns_factory, topo, gw_initiates=True, psk=gw_psk)
    try:
        wg.set_peer(topo.gw_keys[1], preshared_key=wg_psk)
        assert not ping(topo.gw_ns, "10.0.0.2", count=1, timeout=4)
    finally:
        gw.stop()


def test_ipv6_tunnel_over_ipv6_underlay(netns_factory: Harness, topo: Topology) -> None:
    gw, wg = start_pair(netns_factory, topo, gw_initiates=True, v6_underlay=True)
    try:
        assert ping(topo.gw_ns, "fd00::2", count=3, timeout=10), gw.log_text()
        assert ping(topo.peer_ns, "fd00::1", count=3, timeout=10)
        assert ping(topo.gw_ns, "10.0.0.2", count=3, timeout=10)
        assert (wg.endpoint(topo.gw_keys[1]) or "").startswith("[fd99::1]")
        tr = Transfer(topo.peer_ns, topo.gw_ns, "fd00::2", 5202, 5 * 1024 * 1024)
        sent, received, n, _ = tr.run()
        assert sent == received and n == 5 * 1024 * 1024
    finally:
        gw.stop()


@pytest.mark.slow
def test_rekey_keeps_the_flow(netns_factory: Harness, topo: Topology) -> None:
    """A continuous ping across REKEY_AFTER_TIME: the session is replaced, the flow goes on."""
    gw, wg = start_pair(netns_factory, topo, gw_initiates=True)
    try:
        assert ping(topo.gw_ns, "10.0.0.2", count=1, timeout=10)
        first = wg.latest_handshake(topo.gw_keys[1])
        assert first > 0
        # 150 s of pings at 5/s: replies for >= 99 % of them
        sent = 750
        got = topo.gw_ns.call(icmp_echo, "10.0.0.2", sent, 152.0, 0.2, timeout=170)
        second = wg.latest_handshake(topo.gw_keys[1])
        assert second >= first + 115, (first, second)  # a new handshake ~120 s after the first
        assert got >= sent * 0.99, f"{got}/{sent} replies"
        assert "handshake complete" in gw.log_text()
    finally:
        gw.stop()
