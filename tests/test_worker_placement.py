"""A placement move between real workers, in memory and without root.

The gateway's workers are the product's (forked through engine.boot with the supervisor's
context; lab/enginetest), its UDP group is steered by receiver index on loopback, and the
supervisor's Placer writes the table and nudges the workers over their control sockets.
After the move: no handshake, the old index still works (its datagrams reach the old
worker and are passed on), the new owner seals from where the old one stopped, and a
datagram accepted before the move is refused after it.
"""

from __future__ import annotations

import os

from lab.bindtest import Wire
from lab.enginetest import MemoryGateway, config, new_key, peer, start_all, wait_for
from lab.tuntest import ipv4_udp
from shardwg.engine import control
from shardwg.engine.placement import Move
from shardwg.engine.placer import Placer
from shardwg.proto.constants import MessageType
from shardwg.shm.placement import Mode, Reason
from tests.test_worker import counter_of

GW_IP, PEER_IP = "10.7.0.1", "10.7.0.2"


def test_move_between_real_workers(gateways: list[MemoryGateway]) -> None:
    p_priv, p_pub = new_key()
    g_priv, g_pub = new_key()
    g = MemoryGateway(config(g_priv, [peer(p_pub, [f"{PEER_IP}/32"])]), workers=2)
    gateways.append(g)
    placer = Placer(Mode.COUNT, 2, g.layout, g.region.buf,
                    lambda: g.broadcast(control.encode(control.Placement())))  # fmt: skip
    placer.start([p_pub], g.slot_of)
    wire = Wire(g.addr, for_b=g.group.sender_towards(1))  # its initiation lands on worker 1
    p = MemoryGateway(config(p_priv, [peer(g_pub, [f"{GW_IP}/32"], wire.a_endpoint)]))
    gateways.append(p)
    try:
        start_all(g, p)
        assert placer.owner(p_pub) == 0
        up = [ipv4_udp(PEER_IP, GW_IP, 5000, 4000, b"up %d" % i) for i in range(3)]
        for pkt in up:
            p.tun[0].write(pkt)
        assert [g.read_tun(5, wire.pump) for _ in up] == [(0, pkt) for pkt in up]
        down = ipv4_udp(GW_IP, PEER_IP, 4000, 5000, b"down before")
        g.tun[0].write(down)
        assert p.read_tun(5, wire.pump) == (0, down)
        assert wait_for(lambda: (r := g.record(p_pub)) is not None and r.current is not None)
        old_up = wire.sent("a>b", MessageType.TRANSPORT)[-1]
        last_down = counter_of(wire.sent("b>a", MessageType.TRANSPORT)[-1])
        handshakes = len(wire.sent("a>b", MessageType.INITIATION))

        placer.move(Move(p_pub, 0, 1), Reason.LOAD)

        def adopted() -> bool:
            placer.tick(placer.clock())
            rec = g.record(p_pub)
            return rec is not None and rec.owner == 1 and not rec.handed
        assert wait_for(adopted, 5)
        assert placer.table.history[0].latency >= 0
        assert wait_for(lambda: [s.peers_owned for s in g.stats()] == [0, 1])

        up2 = ipv4_udp(PEER_IP, GW_IP, 5000, 4000, b"up after")  # still worker 0's index
        p.tun[0].write(up2)
        assert g.read_tun(5, wire.pump) == (1, up2), "the new owner writes it to its queue"
        assert wait_for(lambda: g.stats()[0].handoffs_out >= 1 and g.stats()[1].handoffs_in >= 1)

        down2 = ipv4_udp(GW_IP, PEER_IP, 4000, 5000, os.urandom(100))
        g.tun[0].write(down2)  # the old owner's queue: handed to the new owner
        assert p.read_tun(5, wire.pump) == (0, down2)
        assert counter_of(wire.sent("b>a", MessageType.TRANSPORT)[-1]) == last_down + 1

        replayed = g.total().drops["replayed"]
        wire.inject("a>b", old_up)  # accepted by worker 0 before the move
        assert wait_for(lambda: g.total().drops["replayed"] == replayed + 1, 5, wire.pump)
        assert g.read_tun(0.2, wire.pump) is None
        assert len(wire.sent("a>b", MessageType.INITIATION)) == handshakes
        assert not wire.sent("b>a", MessageType.INITIATION)
        assert g.total().drops.get("handoff_full", 0) == 0
    finally:
        wire.close()


def test_live_changes_keep_counts_even_across_real_workers(
    gateways: list[MemoryGateway],
) -> None:
    """Peers added and removed through LiveConfig with the Placer attached: after every
    change each worker owns its share (spread <= 1), as the workers themselves count it,
    and a removal that left the counts uneven moved exactly one peer, with its session."""
    g_priv, _g_pub = new_key()
    keys = [new_key()[1] for _ in range(5)]
    g = MemoryGateway(config(g_priv, []), workers=3)
    gateways.append(g)
    placer = Placer(Mode.COUNT, 3, g.layout, g.region.buf,
                    lambda: g.broadcast(control.encode(control.Placement())))  # fmt: skip
    placer.start([], g.slot_of)
    g.live.placer = placer
    g.start()
    g.wait_ready()

    def owned() -> list[int]:
        return [s.peers_owned for s in g.stats()]

    peers = []
    for i, key in enumerate(keys):
        peers.append(peer(key, [f"10.8.{i}.0/24"]))
        assert g.live.apply(config(g_priv, list(peers)), "test") == 0
        want = sorted([len(peers) // 3 + (w < len(peers) % 3) for w in range(3)])
        assert wait_for(lambda w=want: sorted(owned()) == w), (owned(), want)
    assert placer.table.moves_total == 0  # adding never moves anyone
    # remove both peers of one worker with two: 3 peers left on 3 workers, one each
    two = next(w for w in range(3) if list(placer.owners.values()).count(w) == 2)
    gone = {k for k, w in placer.owners.items() if w == two}
    assert g.live.apply(config(g_priv, [p for p in peers if p.public_key not in gone]),
                        "test") == 0  # fmt: skip
    assert wait_for(lambda: owned() == [1, 1, 1]), owned()
    assert placer.table.moves_total == 1 and placer.table.history[0].reason == Reason.COUNT
    moved = placer.table.history[0].public_key

    def adopted() -> bool:
        placer.tick(placer.clock())
        rec = g.record(moved)
        return rec is not None and rec.owner == two and not rec.handed
    assert wait_for(adopted, 5)
