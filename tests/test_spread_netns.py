"""One peer spread over 2 real workers, in namespaces (issue 12 item 3): with a wireguard-go
peer and with a shardwg peer, 4 TCP streams each way put at least a quarter of the peer's
datagrams on every worker in each direction (a shardwg peer's sending direction: see the
known limit below), and 20 MB transfers each way keep their sha256."""

from __future__ import annotations

import pytest

from lab.bench_onepeer import OnePeer
from lab.bench_pairs import TUNNEL
from lab.harness import Harness
from lab.transfer import Transfer

pytestmark = [pytest.mark.interop, pytest.mark.netns]


@pytest.mark.parametrize("peer_kind", ["wggo", "shardwg"])
def test_one_peer_over_two_workers_both_directions(peer_kind: str) -> None:
    with Harness() as h:
        op = OnePeer(h, peer_kind, 2, "on")
        for a_sends in (True, False):
            shares = []
            for _attempt in range(3):  # 4 flows may all hash to one TUN queue (1 in 8)
                shares = op.tcp(4, 3, a_sends)["shares"]
                if min(shares) >= 0.25:
                    break
            if peer_kind == "shardwg" and a_sends:
                # Known limit, not yet solved (issue 12 stays open for it): between two
                # shardwg ends the ACKs of a flow come back spread and are written to the TUN
                # by whichever worker opened them; the TUN's flow table then steers the
                # flow's data to that queue, so the sending gateway's flows collapse onto
                # one worker (0.86/0.14 and 1.0/0.0 measured). No share is claimed for this
                # direction; its transfer below must still keep its sha256.
                continue
            assert min(shares) >= 0.25, (a_sends, shares)
        size = 20 << 20
        for server, client, addr, port in ((op.b_ns, op.a_ns, TUNNEL[1], 5301),
                                           (op.a_ns, op.b_ns, TUNNEL[0], 5302)):  # fmt: skip
            res = Transfer(server, client, addr, port, size, seed=port).run()
            assert res.ok and res.received_bytes == size, res
