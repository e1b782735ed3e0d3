"""The real worker, in memory and without root: handshakes, transport, handoffs, a crash.

Every worker here is the product's `Worker`, booted by `engine.boot.boot_worker` in a forked
process from the same context the supervisor builds; only its TUN queue is a socketpair
(lab/tuntest) and its UDP sockets live on 127.0.0.1 (lab/bindtest). The netns tests
(test_sharding, test_interop) run the same paths against the kernel and wireguard-go.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from msgspec.structs import replace

from lab.bindtest import LoopbackGroup, Wire
from lab.enginetest import MemoryGateway, config, key_owned_by, new_key, peer, start_all, wait_for
from lab.tuntest import TunQueue, ipv4_udp
from shardwg.config.model import Config
from shardwg.io import tun as tun_io
from shardwg.io.vnet import VNET_HDR_LEN, ZERO_HDR
from shardwg.proto.constants import MessageType
from shardwg.proto.ownership import owner_of

GW_IP, PEER_IP = "10.7.0.1", "10.7.0.2"


def counter_of(datagram: bytes) -> int:
    """The nonce counter of a transport message (little-endian u64 at offset 8)."""
    assert datagram[0] == MessageType.TRANSPORT
    return int(struct.unpack_from("<Q", datagram, 8)[0])


def test_the_tun_double_reads_and_writes_like_a_queue() -> None:
    """What the worker relies on: one frame per read, EAGAIN (not an error) when empty, one
    frame per write, the vnet header in front."""
    with TunQueue() as q:
        packets = [ipv4_udp(GW_IP, PEER_IP, 1, 2, os.urandom(n)) for n in (0, 100, 1400)]
        for pkt in packets:
            q.write(pkt)
        bufs = [memoryview(bytearray(2048)) for _ in range(8)]
        sizes = [0] * 8
        assert tun_io.read_batch(q.fd, bufs, sizes, 8) == 3
        got = [bytes(b[VNET_HDR_LEN:n]) for b, n in zip(bufs[:3], sizes[:3], strict=True)]
        assert got == packets
        assert tun_io.read_batch(q.fd, bufs, sizes, 8) == 0
        assert tun_io.write_packet(q.fd, ZERO_HDR + packets[1])
        assert q.read(1.0) == packets[1] and q.read(0.0) is None


def test_a_chosen_sender_keeps_hashing_to_its_member() -> None:
    """The handoff test's premise: initiation-sized datagrams from `sender_towards(i)` land
    on member i every time (the steering program hashes type 1 like a runt)."""
    group = LoopbackGroup(2)
    try:
        for member in (0, 1):
            sender = group.sender_towards(member)
            initiation = bytes([MessageType.INITIATION, 0, 0, 0]) + os.urandom(144)
            for _ in range(5):
                sender.sendto(initiation, group.addr)
                assert group.member_hit() == member
            sender.close()
    finally:
        group.close()


def test_handshake_and_transport_both_ways(gateways: list[MemoryGateway]) -> None:
    a_priv, a_pub = new_key()
    b_priv, b_pub = new_key()
    b = MemoryGateway(config(b_priv, [peer(a_pub, [f"{GW_IP}/32"])]))
    gateways.append(b)
    a = MemoryGateway(config(a_priv, [peer(b_pub, [f"{PEER_IP}/32"], b.addr)]))
    gateways.append(a)
    start_all(a, b)

    out = ipv4_udp(GW_IP, PEER_IP, 4000, 5000, os.urandom(300))
    a.tun[0].write(out)  # no session yet: A stages it and initiates
    got = b.read_tun(timeout=5)
    assert got == (0, out), "A's packet did not come out of B's TUN unchanged"

    back = [ipv4_udp(PEER_IP, GW_IP, 5000, 4000, os.urandom(n)) for n in (1, 200, 1372)]
    for pkt in back:
        b.tun[0].write(pkt)  # B learned A's endpoint from the handshake
    assert [a.read_tun() for _ in back] == [(0, pkt) for pkt in back]

    assert wait_for(lambda: a.total().rx_packets >= 4 and b.total().tx_packets >= 3)
    sa, sb = a.total(), b.total()
    assert sa.handshakes_sent >= 1 and sa.handshakes_completed == 1
    assert sb.handshakes_received >= 1 and sb.handshakes_completed == 1
    assert sum(sa.drops.values()) == 0 and sum(sb.drops.values()) == 0
    rec = b.session(a_pub)  # B published the session
    assert rec.endpoint == ("127.0.0.1", a.group.port)


def test_a_jumbo_packet_is_handed_over_whole(gateways: list[MemoryGateway]) -> None:
    """MTU 9000: packets the host puts on the non-owner's queue (with the TUN steering
    program that is rare: an old kernel's fallback, a flow during a move) reach the peer
    whole through the handoff ring, whose slots the layout sizes from the MTU. (This was a
    netns test until the TUN's routes sent every such flow to its owner.)"""
    p_priv, p_pub = key_owned_by(1, 2)
    owner, other = owner_of(p_pub, 2), 0
    g_priv, g_pub = new_key()
    jumbo = replace(config(g_priv, [peer(p_pub, [f"{PEER_IP}/32"])]).interface, mtu=9000)
    g = MemoryGateway(Config(jumbo, [peer(p_pub, [f"{PEER_IP}/32"])]), workers=2)
    gateways.append(g)
    assert g.layout.ring_slot_size >= 9000
    wire = Wire(g.addr, for_b=g.group.sender_towards(owner))
    p_cfg = config(p_priv, [peer(g_pub, [f"{GW_IP}/32"], wire.a_endpoint)])
    p = MemoryGateway(Config(replace(p_cfg.interface, mtu=9000), p_cfg.peers))
    gateways.append(p)
    try:
        start_all(g, p)
        p.tun[0].write(ipv4_udp(PEER_IP, GW_IP, 5000, 4000, b"hello"))
        assert g.read_tun(timeout=5, pump=wire.pump)[0] == owner
        out = [ipv4_udp(GW_IP, PEER_IP, 4000, 5000, os.urandom(8900 + i)) for i in range(4)]
        before = g.stats()[other].handoffs_out
        for pkt in out:
            g.tun[other].write(pkt)
        got = [p.read_tun(timeout=5, pump=wire.pump) for _ in out]
        assert got == [(0, pkt) for pkt in out]
        assert wait_for(lambda: g.stats()[other].handoffs_out == before + len(out))
        assert sum(sum(s.drops.values()) for s in g.stats()) == 0
    finally:
        wire.close()


def test_handoff_between_two_workers(gateways: list[MemoryGateway]) -> None:
    """The peer's initiation lands on the worker that does not own it and is handed to the
    owner; a packet the host puts on the non-owner's queue is handed over and sealed by the
    owner. Datagrams after the handshake reach the owner directly (steering)."""
    p_priv, p_pub = key_owned_by(1, 2)  # owned by the gateway's worker 1
    owner, other = owner_of(p_pub, 2), 0
    assert owner == 1
    g_priv, g_pub = new_key()
    g = MemoryGateway(config(g_priv, [peer(p_pub, [f"{PEER_IP}/32"])]), workers=2)
    gateways.append(g)
    wire = Wire(g.addr, for_b=g.group.sender_towards(other))  # P's datagrams hash to worker 0
    p = MemoryGateway(config(p_priv, [peer(g_pub, [f"{GW_IP}/32"], wire.a_endpoint)]))
    gateways.append(p)
    try:
        start_all(g, p)

        first = ipv4_udp(PEER_IP, GW_IP, 5000, 4000, b"from the peer")
        p.tun[0].write(first)
        assert g.read_tun(timeout=5, pump=wire.pump) == (owner, first)
        # a worker's counters reach shared memory within a turn of its loop (<= 50 ms)
        assert wait_for(
            lambda: (
                (st := g.stats())[owner].handshakes_completed == 1
                and st[other].handoffs_out >= 1
                and st[owner].handoffs_in >= 1
            )
        )
        st = g.stats()
        assert st[other].handshakes_completed == 0 and st[owner].handshakes_completed == 1
        assert len(wire.sent("a>b", MessageType.INITIATION)) >= 1

        out = [ipv4_udp(GW_IP, PEER_IP, 4000, 5000, os.urandom(64 + i)) for i in range(5)]
        before = g.stats()[other].handoffs_out
        for pkt in out:
            g.tun[other].write(pkt)  # the host hashed this flow to the non-owner's queue
        got = [p.read_tun(timeout=5, pump=wire.pump) for _ in out]
        assert got == [(0, pkt) for pkt in out]
        assert wait_for(lambda: g.stats()[other].handoffs_out == before + len(out))
        st = g.stats()
        assert st[other].tx_packets == 0, "only the owner seals and sends"
        assert sum(sum(s.drops.values()) for s in st) == 0
    finally:
        wire.close()


def test_killed_worker_resumes_from_its_slot_without_handshake(
    gateways: list[MemoryGateway],
) -> None:
    """SIGKILL the gateway's worker mid-session; its replacement restores the session from
    shared memory: traffic goes on both ways with no handshake, its first nonce is past
    every counter its predecessor reserved, and an old datagram replayed is refused."""
    p_priv, p_pub = new_key()
    g_priv, g_pub = new_key()
    g = MemoryGateway(config(g_priv, [peer(p_pub, [f"{PEER_IP}/32"])]))
    gateways.append(g)
    wire = Wire(g.addr)
    p = MemoryGateway(config(p_priv, [peer(g_pub, [f"{GW_IP}/32"], wire.a_endpoint)]))
    gateways.append(p)
    try:
        start_all(g, p)
        up = [ipv4_udp(PEER_IP, GW_IP, 5000, 4000, b"up %d" % i) for i in range(3)]
        for pkt in up:
            p.tun[0].write(pkt)
        assert [g.read_tun(5, wire.pump) for _ in up] == [(0, pkt) for pkt in up]
        down = ipv4_udp(GW_IP, PEER_IP, 4000, 5000, b"down before")
        g.tun[0].write(down)
        assert p.read_tun(5, wire.pump) == (0, down)

        rec = g.session(p_pub)
        assert rec.current is not None
        reserved = rec.current.send_reserved
        old_up = wire.sent("a>b", MessageType.TRANSPORT)[-1]
        handshakes = len(wire.sent("a>b", MessageType.INITIATION))
        old_pid = g.pids[0]

        g.kill(0)
        g.replace(0)
        g.wait_ready()
        assert g.pids[0] != old_pid and g.stats()[0].restarts == 1
        logged = len(wire.log)

        down2 = ipv4_udp(GW_IP, PEER_IP, 4000, 5000, b"down after")
        g.tun[0].write(down2)
        assert p.read_tun(5, wire.pump) == (0, down2)
        sent_after = [d.data for d in wire.log[logged:] if d.direction == "b>a"]
        assert sent_after and sent_after[0][0] == MessageType.TRANSPORT
        assert counter_of(sent_after[0]) >= reserved, "nonce reuse after the restart"

        up2 = ipv4_udp(PEER_IP, GW_IP, 5000, 4000, b"up after")
        p.tun[0].write(up2)
        assert g.read_tun(5, wire.pump) == (0, up2)

        replayed = g.total().drops["replayed"]
        wire.inject("a>b", old_up)  # accepted by the dead worker
        wire.inject("a>b", wire.sent("a>b", MessageType.TRANSPORT)[-1])  # by the replacement
        assert wait_for(lambda: g.total().drops["replayed"] == replayed + 2, 5, wire.pump)
        assert g.read_tun(0.2, wire.pump) is None

        assert len(wire.sent("a>b", MessageType.INITIATION)) == handshakes
        assert not [d for d in wire.log[logged:] if d.data[0] != MessageType.TRANSPORT]
    finally:
        wire.close()


def test_counters_reach_shared_memory_soon_after_traffic_stops(
    gateways: list[MemoryGateway],
) -> None:
    """A worker flushes its counters at most every flush interval (5 ms). A burst that ends
    inside an interval must still be published within about one interval once the worker
    goes idle, not at its next 50 ms timer tick: `shardwg status` and the hostile tests read
    these counters right after traffic stops. Ten bursts of two datagrams 1 ms apart: with
    the flush left to the timer tick every burst came 32-40 ms late."""
    g = MemoryGateway(config(new_key()[0], [peer(new_key()[1], [f"{PEER_IP}/32"])]))
    gateways.append(g)
    g.start()
    g.wait_ready()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    late = []
    try:
        for trial in range(10):
            seen = g.total().rx_packets
            time.sleep(0.06)  # idle: the first datagram's turn flushes, the second's does not
            sender.sendto(b"\xff" * 32, g.addr)
            time.sleep(0.001)
            sender.sendto(b"\xff" * 32, g.addr)
            t0 = time.monotonic()
            while g.total().rx_packets < seen + 2 and time.monotonic() - t0 < 1.0:
                time.sleep(0.0005)
            waited = time.monotonic() - t0
            assert g.total().rx_packets == seen + 2, "the burst was never counted"
            if waited > 0.03:
                late.append((trial, round(waited * 1000, 1)))
    finally:
        sender.close()
    assert not late, f"published late (trial, ms): {late}"
