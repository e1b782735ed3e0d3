"""Jumbo MTU end to end against wireguard-go, with hand-overs (issue 13 item 7).

Topology as in test_interop: namespace `gw` runs `shardwg run --workers 2`, namespace
`peer` runs wireguard-go, a veth pair (MTU 9200) joins them; both tunnels have MTU
9000. One-way UDP from the gateway's side, from 8 source ports, so the TUN hashes
flows onto both queues and the worker that does not own the peer must hand every
8,000-byte packet over a shared-memory ring. Every datagram is counted at the peer.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time

import pytest

from lab.gateway_proc import ShardwgGateway
from lab.harness import Harness
from lab.keys import keypair
from lab.netns import Namespace, unique_ifname, veth_link
from lab.ping import ping
from lab.transfer import Transfer
from lab.wggo import WireguardGo

pytestmark = [pytest.mark.interop, pytest.mark.netns]

MTU = 9000
GW_PORT, PEER_PORT = 51820, 51821
PORTS, PER_PORT, SIZE = 8, 100, 8000

_RECEIVER = r"""
import socket, sys, time
size, want, idle = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.bind(("10.0.0.2", 5000))
print("listening", flush=True)
got = bad = 0
s.settimeout(30.0)  # until the first datagram
try:
    while got + bad < want:
        data = s.recv(65535)
        if len(data) == size:
            got += 1
        else:
            bad += 1
        s.settimeout(idle)
except socket.timeout:
    pass
print(got, bad, flush=True)
"""


def _send(count: int, size: int, ports: int) -> int:
    """From `ports` source ports, round robin, `count` datagrams each, paced."""
    socks = []
    for _ in range(ports):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("10.0.0.1", 0))
        socks.append(s)
    payload = bytes(size)
    sent = 0
    for _ in range(count):
        for s in socks:
            s.sendto(payload, ("10.0.0.2", 5000))
            sent += 1
        time.sleep(0.004)
    return sent


def _start(
    netns_factory: Harness, mtu: int, gw_args: list[str] | None = None
) -> tuple[Namespace, Namespace, ShardwgGateway, WireguardGo]:
    gw_ns, peer_ns = netns_factory(2)
    veth_link(gw_ns, peer_ns, ["10.99.0.1/24"], ["10.99.0.2/24"], mtu=mtu + 200)
    gw_keys, peer_keys = keypair(), keypair()
    wg = netns_factory.wireguard_go(
        peer_ns, unique_ifname("wgp"), peer_keys[0], PEER_PORT,
        [{"public_key": gw_keys[1], "allowed_ips": ["10.0.0.1/32"], "endpoint": None}],
        ["10.0.0.2/24"], mtu=mtu,
    )  # fmt: skip
    gw = netns_factory.gateway(
        gw_ns, unique_ifname("swg"), gw_keys[0], GW_PORT,
        [{"public_key": peer_keys[1], "allowed_ips": ["10.0.0.2/32"],
          "endpoint": f"10.99.0.2:{PEER_PORT}"}],
        ["10.0.0.1/24"], workers=2, mtu=mtu, extra_args=gw_args,
    )  # fmt: skip
    assert ping(gw_ns, "10.0.0.2", count=1, timeout=10), gw.log_text()
    return gw_ns, peer_ns, gw, wg


@pytest.mark.parametrize("spread", ["off", "on"])
def test_jumbo_one_way_udp_from_many_ports_is_all_delivered(
    netns_factory: Harness, spread: str
) -> None:
    """Jumbo one-way flows from many ports get there whole: with --spread off each goes to
    the owner's queue by the TUN's route (one-way flows went by hash before, and half were
    handed over: tests/test_worker.py keeps a jumbo handoff test), with --spread on the
    flows take both queues and the non-owner seals its own."""
    gw_ns, peer_ns, gw, _wg = _start(netns_factory, MTU, ["--spread", spread])
    want = PORTS * PER_PORT
    rx = peer_ns.popen(
        [sys.executable, "-c", _RECEIVER, str(SIZE), str(want), "3.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert rx.stdout is not None
    assert select.select([rx.stdout], [], [], 15)[0] and "listening" in rx.stdout.readline()
    sent = gw_ns.call(_send, PER_PORT, SIZE, PORTS, timeout=60)
    out, err = rx.communicate(timeout=60)
    got, bad = (int(x) for x in out.split())
    status = gw.show_json(interval=0.5)
    drops = status["drops_total"]
    # Packets read on the non-owner's queue: handed over, or dropped trying.
    handed = sum(w["handoffs_out"] for w in status["worker_stats"]) + drops.get("handoff_full", 0)
    print(f"\nMTU {MTU}: {got}/{sent} datagrams of {SIZE} B delivered, {handed} handed over, "
          f"drops {drops}")  # fmt: skip
    sealed = [w["tx_packets"] for w in status["worker_stats"]]
    if spread == "off":
        assert handed == 0 and min(sealed) == 0, (handed, sealed)  # all on the owner's queue
    else:
        assert min(sealed) > 0, f"one worker sealed everything ({sealed}): proves nothing"
    assert (got, bad) == (sent, 0), f"{got}/{sent} delivered ({bad} of another size); drops {drops}"


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "tun-offload"])
def test_jumbo_tcp_transfer(netns_factory: Harness, offload: bool) -> None:
    """With --tun-offload the TUN hands over super-packets that are cut into MTU-sized
    segments: their buffers must hold a 9000-byte segment too."""
    gw_ns, peer_ns, gw, _wg = _start(netns_factory, MTU, ["--tun-offload"] if offload else None)
    size = 64 << 20
    result = Transfer(peer_ns, gw_ns, "10.0.0.2", 5001, size).run()
    sha = "ok" if result.ok else "MISMATCH"
    how = " (tun offload)" if offload else ""
    print(f"\nMTU {MTU} TCP{how} gw -> wireguard-go: {size >> 20} MiB in {result.seconds:.2f} s, "
          f"{result.mbit_s / 1000:.2f} Gbit/s, sha256 {sha}")  # fmt: skip
    assert result.ok and result.received_bytes == size, gw.log_text()
