"""Placement with real wireguard-go peers in namespaces: one peer per worker, every time,
and a hot peer moved to a lighter worker mid-transfer without a handshake.

Owners are read the way a user reads them, from `shardwg show --json`.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from test_sharding import build_site

from lab.harness import Harness
from lab.ping import ping
from lab.transfer import Transfer

pytestmark = [pytest.mark.interop, pytest.mark.netns]
MiB = 1024 * 1024


@pytest.mark.parametrize("peers,trials", [(2, 4), (4, 2)])
def test_n_peers_on_n_workers_one_each_every_time(
    netns_factory: Harness, peers: int, trials: int
) -> None:
    """Fresh keys every trial: by hash, 2 peers share a worker half of the time."""
    for trial in range(trials):
        site = build_site(netns_factory, peers, peers, placement="load")  # the default
        try:
            for i, (ns, _wg, _kp) in enumerate(site.peers):
                assert ping(ns, "10.0.0.1", count=1, timeout=10), site.gw.log_text()
                assert ping(site.gw_ns, site.tunnel_ip(i), count=1, timeout=10)
            st = site.gw.show_json()
            owners = sorted(p["owner"] for p in st["peers"])
            assert owners == list(range(peers)), (trial, st["peers"])
            assert [w["peers_owned"] for w in st["worker_stats"]] == [1] * peers
            assert st["placement"]["mode"] == "load" and st["placement"]["moves"] == 0
        finally:
            assert site.gw.stop() == 0
    print(f"\n{peers} peers on {peers} workers: one per worker in {trials}/{trials} trials")


def test_hot_peer_moves_without_a_handshake(netns_factory: Harness) -> None:
    """3 peers on 2 workers: two on worker 0 carry a transfer each, worker 1 idles. One of
    them moves to worker 1 within 5 s; both transfers keep their sha256 and nobody
    handshakes again."""
    site = build_site(netns_factory, 3, 2, placement="load")
    try:
        for ns, _wg, _kp in site.peers:
            assert ping(ns, "10.0.0.1", count=2, timeout=10), site.gw.log_text()
        st = site.gw.show_json()
        owner = {p["public_key"]: p["owner"] for p in st["peers"]}
        pair = [i for i, (_ns, _wg, kp) in enumerate(site.peers) if owner[kp[1]] == 0]
        assert len(pair) == 2 and st["placement"]["moves"] == 0, st["peers"]
        handshakes = [wg.latest_handshake(site.gw_keys[1]) for _ns, wg, _kp in site.peers]
        size = 160 * MiB
        transfers = [
            Transfer(site.gw_ns, site.peers[i][0], "10.0.0.1", 6700 + i, size, timeout=180)
            for i in pair
        ]
        clients = [t.start_client() for t in transfers]
        moved_at = imbalance = None
        last_rx = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and moved_at is None:
            st = site.gw.show_json()
            now = time.monotonic()
            rx = st["worker_stats"][0]["rx_bytes"]
            if imbalance is None and last_rx is not None and rx - last_rx > 2 * MiB:
                imbalance = now  # worker 0 carries both transfers from here on
            last_rx = rx
            pl = st["placement"]
            if pl["moves"] and pl["recent"][0]["latency"] >= 0:
                moved_at = now
                move = pl["recent"][0]
            time.sleep(0.1)
        results = [t.finish(c) for t, c in zip(transfers, clients, strict=True)]
        for r in results:
            assert r.received_bytes == size and r.ok, r
        assert moved_at is not None, "no move: " + site.gw.log_text()[-3000:]
        assert move["reason"] == "load" and move["src"] == 0 and move["dst"] == 1, move
        assert imbalance is not None
        took = moved_at - imbalance
        after = [wg.latest_handshake(site.gw_keys[1]) for _ns, wg, _kp in site.peers]
        assert after == handshakes, "a move needed a handshake"
        st = site.gw.show_json()
        owners = {p["public_key"]: p["owner"] for p in st["peers"]}
        assert owners[move["public_key"]] == 1
        assert st["placement"]["moves"] == 1, st["placement"]  # no flapping back
        drops = [w["drops"] for w in st["worker_stats"]]
        mbit = [round(r.mbit_s) for r in results]
        print(f"\nmove decided at {move['ratio']:.2f}x the mean, adopted in "
              f"{move['latency'] * 1000:.0f} ms, {took:.1f} s after the imbalance began;"
              f" transfers {mbit} Mbit/s; drops {drops}")  # fmt: skip
        assert took < 5.0  # 3 hot samples of 1 s, then the adoption
        human = subprocess.run(
            [sys.executable, "-m", "shardwg", "show", site.gw.ifname],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert "placement: load (1 move)" in human and "load: worker 0 at" in human, human
    finally:
        assert site.gw.stop() == 0
