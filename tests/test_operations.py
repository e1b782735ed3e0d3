"""Managing a running sharded gateway with the real `wg` tool, SIGHUP and the UAPI socket.

Three wireguard-go peers know the gateway; the gateway starts knowing peers 0
and 1. Every change is checked against its effect on real traffic.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import pytest
from test_sharding import Site, build_site

from lab.harness import Harness
from lab.netns import wait_for
from lab.ping import icmp_echo, ping

pytestmark = [pytest.mark.interop, pytest.mark.netns]


def wg(site: Site, *args: str) -> str:
    return site.gw_ns.run(["wg", *args]).stdout


def peer_block(site: Site, i: int) -> str:
    p = site.peer_conf[i]
    return (f"[Peer]\nPublicKey = {p['public_key']}\n"
            f"AllowedIPs = {', '.join(p['allowed_ips'])}\n")  # fmt: skip


def test_wg_show_set_remove(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 3, 2, gw_knows=[0, 1])
    ifname = site.gw.ifname
    try:
        assert ping(site.peers[0][0], "10.0.0.1", count=2, timeout=10)
        out = wg(site, "show", ifname)
        assert site.peer_conf[0]["public_key"] in out and "latest handshake" in out
        assert site.peer_conf[2]["public_key"] not in out
        dump = wg(site, "show", ifname, "dump").splitlines()
        assert len(dump) == 3  # interface line + 2 peers
        iface = dump[0].split("\t")
        assert iface[1] == site.gw_keys[1] and iface[2] == "51820"
        conf = wg(site, "showconf", ifname)
        assert "PrivateKey" in conf and "ListenPort = 51820" in conf

        # a peer the gateway does not know cannot get in...
        assert not ping(site.peers[2][0], "10.0.0.1", count=1, timeout=3)
        # ...until `wg set` adds it, live
        wg(site, "set", ifname, "peer", site.peer_conf[2]["public_key"],
           "allowed-ips", "10.0.0.12/32", "persistent-keepalive", "25")  # fmt: skip
        assert ping(site.peers[2][0], "10.0.0.1", count=2, timeout=10), site.gw.log_text()
        assert "every 25 seconds" in wg(site, "show", ifname)
        # and its owner publishes it like a configured peer: endpoint, handshake, transfer
        # (the worker's slot map dated from its fork, so a live-added peer never showed up)
        key2 = site.peer_conf[2]["public_key"]

        def live_peer_published() -> bool:
            row = [r.split("\t") for r in wg(site, "show", ifname, "dump").splitlines()[1:]]
            mine = [r for r in row if r[0] == key2]
            return bool(mine) and mine[0][2] == "10.99.2.2:51821" and int(mine[0][4]) > 0

        assert wait_for(live_peer_published, 5), wg(site, "show", ifname, "dump")

        # removing peer 1 cuts it off; peer 0 is undisturbed
        wg(site, "set", ifname, "peer", site.peer_conf[1]["public_key"], "remove")
        assert site.peer_conf[1]["public_key"] not in wg(site, "show", ifname)
        assert not ping(site.peers[1][0], "10.0.0.1", count=1, timeout=3)
        assert ping(site.peers[0][0], "10.0.0.1", count=2, timeout=10)

        # allowed IPs move with `wg set`
        wg(site, "set", ifname, "peer", site.peer_conf[2]["public_key"],
           "allowed-ips", "10.0.0.12/32,10.0.9.0/24")  # fmt: skip
        assert "10.0.9.0/24" in wg(site, "show", ifname, "allowed-ips")
        assert "workers:" in site.gw.show().stdout
    finally:
        assert site.gw.stop() == 0


def test_wg_set_private_key_and_listen_port(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2, gw_initiates=True)
    ifname = site.gw.ifname
    try:
        assert ping(site.gw_ns, "10.0.0.10", count=2, timeout=10)
        wg(site, "set", ifname, "listen-port", "51900")
        assert wait_for(lambda: wg(site, "show", ifname, "listen-port").strip() == "51900", 10)
        # the gateway initiates again from its new port; the peer roams to it
        assert ping(site.gw_ns, "10.0.0.10", count=2, timeout=15), site.gw.log_text()
        new_key = site.gw_ns.run(["wg", "genkey"]).stdout.strip()
        path = os.path.join(site.gw.tmp, "newkey")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, new_key.encode() + b"\n")
        os.close(fd)
        wg(site, "set", ifname, "private-key", path)
        new_pub = site.gw_ns.run(["wg", "pubkey"], input=new_key + "\n").stdout.strip()
        assert wg(site, "show", ifname, "public-key").strip() == new_pub
        # the peer still expects the old key: no session can form any more
        assert not ping(site.gw_ns, "10.0.0.10", count=1, timeout=4)
    finally:
        assert site.gw.stop() == 0


class Pinger(threading.Thread):
    """A continuous ping from a namespace while the test does something else."""

    def __init__(self, site: Site, peer: int, count: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.site, self.peer, self.count, self.seconds = site, peer, count, seconds
        self.got = -1

    def run(self) -> None:
        ns = self.site.peers[self.peer][0]
        self.got = ns.call(icmp_echo, "10.0.0.1", self.count, self.seconds, 0.05,
                           timeout=self.seconds + 15)  # fmt: skip


def test_syncconf_adds_and_removes_while_a_third_keeps_pinging(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 3, 2, gw_knows=[0, 1])
    ifname = site.gw.ifname
    try:
        for i in (0, 1):
            assert ping(site.peers[i][0], "10.0.0.1", count=1, timeout=10)
        pinger = Pinger(site, 0, count=100, seconds=5.2)
        pinger.start()
        time.sleep(1.0)
        conf = wg(site, "showconf", ifname)
        # keep [Interface] and peer 0, drop peer 1, add peer 2
        head = conf.split("[Peer]")[0]
        text = head + "\n" + peer_block(site, 0) + "\n" + peer_block(site, 2)
        path = os.path.join(site.gw.tmp, "sync.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, text.encode())
        os.close(fd)
        wg(site, "syncconf", ifname, path)
        assert ping(site.peers[2][0], "10.0.0.1", count=2, timeout=10), site.gw.log_text()
        assert not ping(site.peers[1][0], "10.0.0.1", count=1, timeout=3)
        pinger.join(timeout=30)
        assert pinger.got == 100, f"peer 0 lost pings during syncconf: {pinger.got}/100"
    finally:
        assert site.gw.stop() == 0


def test_sighup_reload_keeps_unchanged_sessions(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 3, 2, gw_knows=[0, 1])
    try:
        for i in (0, 1):
            assert ping(site.peers[i][0], "10.0.0.1", count=1, timeout=10)
        hs0 = site.peers[0][1].latest_handshake(site.gw_keys[1])
        text = site.gw.config_path.read_text()
        parts = text.split("[Peer]")
        # drop the second [Peer] (peer 1), append peer 2
        new = parts[0] + "[Peer]" + parts[1] + "\n" + peer_block(site, 2)
        site.gw.config_path.write_text(new)
        os.kill(site.gw.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: "reload: 1 peer(s) added, 1 removed" in site.gw.log_text(), 10)
        assert ping(site.peers[2][0], "10.0.0.1", count=2, timeout=10)
        assert not ping(site.peers[1][0], "10.0.0.1", count=1, timeout=3)
        assert ping(site.peers[0][0], "10.0.0.1", count=2, timeout=10)
        assert site.peers[0][1].latest_handshake(site.gw_keys[1]) == hs0  # no new handshake
    finally:
        assert site.gw.stop() == 0


def _uapi_garbage(path: str, rounds: int, seed: int) -> int:
    """Random and truncated requests straight to the socket; returns how many were sent."""
    rng = random.Random(seed)
    valid = [b"get=1\n\n", b"set=1\nfwmark=0\n\n", b"set=1\nlisten_port=0\n\n"]
    sent = 0
    for _ in range(rounds):
        choice = rng.random()
        if choice < 0.3:
            data = rng.randbytes(rng.randint(0, 300))
        elif choice < 0.6:
            v = rng.choice(valid)
            data = v[: rng.randint(0, len(v))]
        else:
            lines = [b"set=1"] + [
                rng.choice([b"public_key=", b"allowed_ip=", b"endpoint=", b"private_key=", b"x="])
                + rng.randbytes(rng.randint(0, 70)).hex().encode()[: rng.randint(0, 70)]
                for _ in range(rng.randint(0, 6))
            ]
            data = b"\n".join(lines) + rng.choice([b"\n\n", b"\n", b""])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(path)
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                s.recv(4096)
            except OSError:
                pass
        sent += 1
    return sent


def test_uapi_fuzz_leaves_gateway_serving(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    try:
        assert ping(site.peers[0][0], "10.0.0.1", count=1, timeout=10)
        path = f"/var/run/wireguard/{site.gw.ifname}.sock"
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert _uapi_garbage(path, 400, seed=3) == 400
        assert site.gw.proc.poll() is None, site.gw.log_text()
        assert site.peer_conf[0]["public_key"] in wg(site, "show", site.gw.ifname)
        assert ping(site.peers[0][0], "10.0.0.1", count=2, timeout=10)
    finally:
        assert site.gw.stop() == 0
