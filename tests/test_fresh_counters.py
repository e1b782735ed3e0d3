"""Transfer counters are exact at every read (issue 13, item 1).

wireguard-go's `wg show` counters are exact whenever they are read, and scripts and exporters
poll them. The gateway's must be too: a UAPI `get`, `shardwg show` and /metrics report every
packet counted before the request. Checked against a real wireguard-go peer, whose counters
are exact: both sides count whole datagrams, so after N pings (and before any keepalive or
handshake can intervene) what the gateway received equals what the peer sent, and the other
way round.
"""

from __future__ import annotations

import pytest

from lab.gateway_proc import ShardwgGateway
from lab.harness import Harness
from lab.netns import unique_ifname
from lab.ping import ping_rtts
from lab.topology import wireguard_go_peer_site

pytestmark = [pytest.mark.interop, pytest.mark.netns]
METRICS = "127.0.0.1:9586"


def _gateway_views(gw: ShardwgGateway, peer_pub: str) -> dict[str, tuple[int, int]]:
    """(rx, tx) of the peer as `wg show dump` (UAPI), `shardwg show --json` and /metrics say."""
    views: dict[str, tuple[int, int]] = {}
    for line in gw.ns.run(["wg", "show", gw.ifname, "dump"]).stdout.splitlines()[1:]:
        f = line.split("\t")
        if f[0] == peer_pub:
            views["uapi"] = (int(f[5]), int(f[6]))
    for p in gw.show_json()["peers"]:
        if p["public_key"] == peer_pub:
            views["show"] = (p["rx_bytes"], p["tx_bytes"])
    text = gw.ns.python(
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read().decode())"
    )
    got = {}
    for line in text.splitlines():
        if f'public_key="{peer_pub}"' in line and line.startswith("shardwg_peer_"):
            got[line.split("{")[0]] = int(float(line.rsplit(" ", 1)[1]))
    views["metrics"] = (got["shardwg_peer_rx_bytes_total"], got["shardwg_peer_tx_bytes_total"])
    return views


def test_counters_exact_after_1_10_and_1000_packets(netns_factory: Harness) -> None:
    gw_ns, p_ns, gw_keys, p_keys, wg = wireguard_go_peer_site(netns_factory)
    gw = netns_factory.gateway(
        gw_ns, unique_ifname("swg"), gw_keys[0], 51820,
        [{"public_key": p_keys[1], "allowed_ips": ["10.0.0.10/32"]}], ["10.0.0.1/24"],
        workers=2, extra_args=["--metrics", METRICS],
    )  # fmt: skip
    assert len(ping_rtts(p_ns, "10.0.0.1", 1, 10)) == 1, gw.log_text()  # handshake
    seen = []
    for n in (1, 10, 1000):
        before = _gateway_views(gw, p_keys[1])
        peer_rx0, peer_tx0 = wg.transfer(gw_keys[1])
        replies = len(ping_rtts(p_ns, "10.0.0.1", n, 30, interval=0.002))
        after = _gateway_views(gw, p_keys[1])
        peer_rx, peer_tx = wg.transfer(gw_keys[1])
        want = (peer_tx - peer_tx0, peer_rx - peer_rx0)  # the gateway's (rx, tx) deltas
        got = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
        seen.append((n, replies, want, got))
        assert replies == n
        assert want[0] > 0 and want[1] > 0
        assert got == {"uapi": want, "show": want, "metrics": want}, seen
    print("n, replies, (rx, tx) deltas wireguard-go says, what the gateway said:", seen)
