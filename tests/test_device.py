"""Two sans-IO devices, a full handshake and transport both ways, in memory."""

from __future__ import annotations

from pairs import ADDR_B, Pair, ipv4_packet

from shardwg.proto.constants import DropReason
from shardwg.proto.intake import UNDER_LOAD_BACKLOG


def drop(reason: DropReason) -> int:
    return -1 - int(reason)


def test_handshake_then_data_both_ways() -> None:
    p = Pair()
    pkt = ipv4_packet("10.0.0.1", "10.0.0.2", b"hello")
    assert p.send(p.a, pkt) == 0  # staged: no session yet, handshake started
    p.pump()
    # initiation, response, then the staged packet as key confirmation
    assert p.delivered_b == [pkt]
    assert p.peer_b.current is not None and p.peer_a.current is not None
    assert p.peer_b.current.send_key == p.peer_a.current.recv_key
    # responder learned A's endpoint from the handshake (roaming)
    assert p.peer_a.endpoint is not None
    reply = ipv4_packet("10.0.0.2", "10.0.0.1", b"world" * 50)
    assert p.send(p.b, reply) > 0
    p.pump()
    assert p.delivered_a == [reply]


def test_psk_handshake() -> None:
    p = Pair(psk=bytes(range(32)))
    p.send(p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"x"))
    p.pump()
    assert len(p.delivered_b) == 1


def test_responder_waits_for_key_confirmation() -> None:
    p = Pair()
    p.peer_b.send_initiation(p.now, p.wall)
    # deliver only the initiation; hold back everything from A after it
    p.drop_filter = lambda tag, data: tag == "a->b" and data[0] == 4
    p.pump()
    assert p.peer_a.next is not None and p.peer_a.current is None
    # B has no confirmed session: its packet is staged, not sent
    assert p.send(p.b, ipv4_packet("10.0.0.2", "10.0.0.1", b"x")) == 0
    p.drop_filter = lambda tag, data: False
    p.send(p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"confirm"))
    p.pump()
    assert p.peer_a.current is not None and p.peer_a.next is None
    assert len(p.delivered_a) == 1  # B's staged packet flushed after confirmation


def test_inner_source_outside_allowed_ips_dropped() -> None:
    p = Pair()
    p.send(p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"x"))
    p.pump()
    p.send(p.a, ipv4_packet("10.9.9.9", "10.0.0.2", b"spoof"))
    p.pump()
    assert drop(DropReason.SOURCE_NOT_ALLOWED) in p.drops
    assert len(p.delivered_b) == 1


def test_replayed_transport_dropped() -> None:
    p = Pair()
    p.send(p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"x"))
    p.pump()
    data = [d for tag, d in p.wire if tag == "a->b" and d[0] == 4][-1]
    p.deliver(p.b, data, ("192.0.2.1", 51820))
    assert p.drops[-1] == drop(DropReason.REPLAYED)
    assert len(p.delivered_b) == 1


def test_roaming_updates_endpoint() -> None:
    p = Pair()
    p.send(p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"x"))
    p.pump()
    p.send(p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"y"))
    _, data = p.a.outbox.pop()
    p.deliver(p.b, data, ("198.51.100.7", 40000))
    assert p.peer_a.endpoint == ("198.51.100.7", 40000)
    assert p.peer_b.endpoint == ADDR_B


def test_unknown_index_and_garbage_counted() -> None:
    p = Pair()
    p.deliver(p.b, b"\x04\x00\x00\x00" + bytes(28), ("192.0.2.1", 1))
    assert p.drops[-1] == drop(DropReason.UNKNOWN_INDEX)
    p.deliver(p.b, b"\x09" + bytes(40), ("192.0.2.1", 1))
    assert p.drops[-1] == drop(DropReason.BAD_TYPE)
    p.deliver(p.b, b"\x01" + bytes(147), ("192.0.2.1", 1))
    assert p.drops[-1] == drop(DropReason.BAD_MAC1)


def test_ipv6_inner_packet() -> None:
    p = Pair()
    import struct

    payload = b"v6!"
    src = bytes.fromhex("fd000000000000000000000000000001")
    dst = bytes.fromhex("fd000000000000000000000000000002")
    pkt = struct.pack(">IHBB16s16s", 6 << 28, len(payload), 17, 64, src, dst) + payload
    p.send(p.a, pkt)
    p.pump()
    assert p.delivered_b == [pkt]


def test_cookie_replies_are_budgeted_under_load() -> None:
    """Under load an initiation without mac2 gets a cookie reply, up to a per-worker budget."""
    p = Pair()
    p.b.intake.note_backlog(UNDER_LOAD_BACKLOG - 1, p.now)
    assert not p.b.intake.under_load(p.now)
    p.b.intake.note_backlog(UNDER_LOAD_BACKLOG, p.now)  # as a worker's deep queue does
    assert p.b.intake.under_load(p.now + 0.03)
    p.b.intake.cookie_rate = 10.0
    replies = 0
    for i in range(30):
        p.peer_b.last_initiation_sent = -1e9
        p.wall += 1
        p.peer_b.send_initiation(p.now, p.wall)
        _peer, init = p.a.outbox.pop()
        src = bytes([192, 0, 2, 1]) + (51820).to_bytes(2, "big")
        result = p.b.receive_handshake(init, ("192.0.2.1", 51820), src, p.now + i * 0.001, p.wall)
        if isinstance(result, bytes):
            replies += 1
        else:
            assert result == DropReason.COOKIE_REQUIRED
    assert 9 <= replies <= 12  # the bucket's burst, plus what 30 ms refill
