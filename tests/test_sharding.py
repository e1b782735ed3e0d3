"""The sharded engine with real wireguard-go peers: steering, many workers, crash survival.

Topology: the gateway namespace has one veth per peer namespace (underlay
10.99.<i>.0/24); peer i has tunnel address 10.0.0.<10+i>. Per-worker counters
and peer records are read straight from the gateway's shared memory.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import pytest

from lab.gateway_proc import ShardwgGateway
from lab.harness import Harness
from lab.keys import keypair
from lab.netns import Namespace, unique_ifname, veth_link, wait_for
from lab.ping import ping
from lab.transfer import Transfer
from shardwg.proto.ownership import owner_of
from shardwg.shm import counters as C
from shardwg.shm.layout import Layout
from shardwg.shm.peerslot import decode_peer
from shardwg.shm.placement import decode_table
from shardwg.shm.region import SharedRegion, region_name

pytestmark = [pytest.mark.interop, pytest.mark.netns]

GW_PORT = 51820


@dataclass
class Site:
    gw_ns: Namespace
    gw: ShardwgGateway
    gw_keys: tuple[str, str]
    peers: list[tuple[Namespace, Any, tuple[str, str]]]  # (namespace, WireguardGo, keys)
    peer_conf: list[dict[str, Any]]  # each peer as the gateway's config would list it

    def tunnel_ip(self, i: int) -> str:
        return f"10.0.0.{10 + i}"


def b64(key: str) -> bytes:
    import base64

    return base64.b64decode(key)


def peer_keys(n: int, workers: int, spread: bool) -> list[tuple[str, str]]:
    """n keypairs; with `spread`, owners cover as many workers as possible."""
    keys: list[tuple[str, str]] = []
    used: set[int] = set()
    tries = 0
    while len(keys) < n:
        kp = keypair()
        owner = owner_of(b64(kp[1]), workers)
        tries += 1
        if spread and owner in used and len(used) < min(n, workers) and tries < 500:
            continue
        used.add(owner)
        keys.append(kp)
    return keys


def build_site(
    harness: Harness,
    n_peers: int,
    workers: int,
    gw_initiates: bool = False,
    gw_knows: list[int] | None = None,
    extra_interface: str = "",
    placement: str = "count",
) -> Site:
    """`gw_knows`: which peers the gateway's config lists (default: all). `placement`:
    count keeps owners fixed while these tests measure per-worker traffic."""
    gw_ns = harness(1, "gw")[0]
    gw_keys = keypair()
    keys = peer_keys(n_peers, workers, spread=True)
    peers = []
    gw_peer_conf = []
    for i, kp in enumerate(keys):
        ns = harness(1, f"p{i}")[0]
        veth_link(gw_ns, ns, [f"10.99.{i}.1/24"], [f"10.99.{i}.2/24"], name_a=f"veth{i}")
        wg = harness.wireguard_go(
            ns,
            unique_ifname("wgp"),
            kp[0],
            51821,
            [{
                "public_key": gw_keys[1],
                "allowed_ips": ["10.0.0.0/24"],
                "endpoint": None if gw_initiates else f"10.99.{i}.1:{GW_PORT}",
                "persistent_keepalive": 0,
            }],
            [f"10.0.0.{10 + i}/24"],
        )  # fmt: skip
        peers.append((ns, wg, kp))
        gw_peer_conf.append({
            "public_key": kp[1],
            "allowed_ips": [f"10.0.0.{10 + i}/32"],
            "endpoint": f"10.99.{i}.2:51821" if gw_initiates else None,
        })  # fmt: skip
    known = [gw_peer_conf[i] for i in (gw_knows if gw_knows is not None else range(n_peers))]
    gw = ShardwgGateway(
        gw_ns, unique_ifname("swg"), gw_keys[0], GW_PORT, known, ["10.0.0.1/24"],
        workers=workers, extra_interface=extra_interface, extra_args=["--placement", placement],
    )  # fmt: skip
    return Site(gw_ns, gw, gw_keys, peers, gw_peer_conf)


class ShmView:
    """Read-only view of a running gateway's shared memory."""

    def __init__(self, ifname: str) -> None:
        self.region = SharedRegion.attach(region_name(ifname), readonly=True)
        self.layout = Layout.read_from(self.region.buf)

    def workers(self) -> list[C.WorkerStats]:
        return C.read_all(self.region.buf, self.layout.counters_offset, self.layout.workers)

    def owner(self, key: bytes) -> int:
        """The worker the supervisor's placement table gives the peer."""
        table = decode_table(self.layout.placement_slot(self.region.buf).read())
        assert table is not None
        for i in range(self.layout.peer_capacity):
            rec = self.peer(i)
            if rec is not None and rec.public_key == key:
                return table.owners[i]
        raise KeyError("peer not published")

    def peer(self, index: int) -> Any:
        return decode_peer(self.layout.peer_slot(self.region.buf, index).read())

    def close(self) -> None:
        self.region.close()


def concurrent_transfers(site: Site, size: int, port0: int = 6000) -> list[tuple[str, str, int]]:
    """Every peer sends `size` bytes to the gateway at once; returns the hashes."""
    transfers = [
        Transfer(site.gw_ns, ns, "10.0.0.1", port0 + i, size)
        for i, (ns, _wg, _kp) in enumerate(site.peers)
    ]
    clients = [t.start_client() for t in transfers]
    results = []
    for t, c in zip(transfers, clients, strict=True):
        sent, received, n, _secs = t.finish(c)
        results.append((sent, received, n))
    return results


def test_steering_six_peers_four_workers(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 6, 4)
    try:
        for i, (ns, _wg, _kp) in enumerate(site.peers):
            assert ping(ns, "10.0.0.1", count=2, timeout=10), site.gw.log_text()
            assert ping(site.gw_ns, site.tunnel_ip(i), count=2, timeout=10)
        results = concurrent_transfers(site, 10 * 1024 * 1024)
        for sent, received, n in results:
            assert n == 10 * 1024 * 1024 and sent == received
        time.sleep(1.2)  # one publish interval for traffic counters
        shm = ShmView(site.gw.ifname)
        try:
            stats = shm.workers()
            owners = [shm.owner(b64(kp[1])) for _ns, _wg, kp in site.peers]
            assert sorted(owners) == [0, 0, 1, 1, 2, 3]  # by count, not by chance
            for w, s in enumerate(stats):
                owned = owners.count(w)
                assert s.peers_owned == owned
                if owned:
                    assert s.rx_packets > 7000 * owned, (w, s)
                # every transport datagram reached the worker that holds its session
                assert s.drops.get("unknown_index", 0) == 0, (w, s.drops)
            for i, (_ns, _wg, kp) in enumerate(site.peers):
                rec = shm.peer(i)
                assert rec is not None and rec.public_key == b64(kp[1])
                assert rec.owner == owners[i]
                assert rec.rx_bytes > 10 * 1024 * 1024
            print("\nper-worker counters (worker: peers, rx packets, tx packets, handoffs in/out):")
            for s in stats:
                print(f"  {s.worker}: {s.peers_owned} peers, rx {s.rx_packets}, tx {s.tx_packets},"
                      f" handoffs {s.handoffs_in}/{s.handoffs_out}")  # fmt: skip
        finally:
            shm.close()
    finally:
        assert site.gw.stop() == 0


def test_sixteen_workers_on_two_cores(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 4, 16, gw_initiates=True)
    try:
        for i in range(len(site.peers)):
            assert ping(site.gw_ns, site.tunnel_ip(i), count=2, timeout=15), site.gw.log_text()
        for sent, received, n in concurrent_transfers(site, 10 * 1024 * 1024):
            assert n == 10 * 1024 * 1024 and sent == received
    finally:
        assert site.gw.stop() == 0


def test_kill_worker_mid_transfer(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 2, 2)
    try:
        for ns, _wg, _kp in site.peers:
            assert ping(ns, "10.0.0.1", count=2, timeout=10), site.gw.log_text()
        handshakes = [wg.latest_handshake(site.gw_keys[1]) for _ns, wg, _kp in site.peers]
        assert all(handshakes)
        shm = ShmView(site.gw.ifname)
        try:
            victim = shm.owner(b64(site.peers[0][2][1]))
            old_pid = shm.workers()[victim].pid
            size = 60 * 1024 * 1024
            transfers = [
                Transfer(site.gw_ns, ns, "10.0.0.1", 6100 + i, size)
                for i, (ns, _wg, _kp) in enumerate(site.peers)
            ]
            clients = [t.start_client() for t in transfers]
            assert wait_for(lambda: shm.workers()[victim].rx_bytes > 2_000_000, 20)
            killed_at = time.monotonic()
            os.kill(old_pid, signal.SIGKILL)
            assert wait_for(
                lambda: shm.workers()[victim].pid not in (0, old_pid)
                and shm.workers()[victim].heartbeat > killed_at,
                5,
                interval=0.01,
            )
            replaced_in = time.monotonic() - killed_at
            for t, c in zip(transfers, clients, strict=True):
                sent, received, n, _secs = t.finish(c)
                assert n == size and sent == received
            assert replaced_in < 1.0, replaced_in
            after = [wg.latest_handshake(site.gw_keys[1]) for _ns, wg, _kp in site.peers]
            assert after == handshakes, "a new handshake was needed"
            assert "resumed 1 session" in site.gw.log_text()
            print(f"\nworker {victim} replaced in {replaced_in * 1000:.0f} ms")
        finally:
            shm.close()
    finally:
        assert site.gw.stop() == 0
