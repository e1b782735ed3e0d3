"""SessionPublisher: what a worker writes to its peers' slots, and what a replacement restores.

Sans-IO devices (tests/pairs.py) over a plain buffer with the real layout: the publisher's
promises (a send block published before use, the receive floor raised before a packet is
accepted) are checked word by word, then a "dead" device's sessions are restored into a new
one that must neither reuse a nonce nor accept a replay.
"""

from __future__ import annotations

import struct

import pytest
from pairs import ADDR_A, Pair, ipv4_packet

from shardwg.proto import crypto
from shardwg.proto.constants import MAX_DATAGRAM, DropReason
from shardwg.proto.device import Device
from shardwg.proto.keypair import RESERVATION_BLOCK
from shardwg.shm.layout import Layout
from shardwg.shm.peerslot import PeerRecord, decode_peer
from shardwg.shm.publisher import SessionPublisher
from shardwg.shm.secrets import SecretArea

SLOT = 2


def record(layout: Layout, buf: bytearray, index: int = SLOT) -> PeerRecord | None:
    return decode_peer(layout.peer_slot(buf, index).read())


def counter_of(datagram: bytes) -> int:
    return int(struct.unpack_from("<Q", datagram, 8)[0])


class Published:
    """A handshaken pair; B publishes its peer A to SLOT of a shared buffer."""

    def __init__(self) -> None:
        self.p = Pair()
        self.layout = Layout(workers=2, peer_capacity=4)
        self.buf = bytearray(self.layout.total_size)
        self.slot_of = {self.p.peer_a.public_key: SLOT}
        self.secrets = SecretArea(self.layout.peer_capacity, bytearray(1 << 16))
        self.pub = SessionPublisher(
            self.layout, self.buf, dict(self.slot_of), worker_id=1, secrets=self.secrets
        )
        self.pub.track(self.p.peer_a)
        self.p.send(self.p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"hello"))
        self.p.pump()
        assert self.p.peer_a.current is not None
        self.pub.publish(self.p.peer_a)  # the worker does this on SESSION_DERIVED / COMPLETE

    def a_to_b(self, n: int) -> list[bytes]:
        """n packets A -> B through the pump; the datagrams as they crossed."""
        return self._send(self.p.a, "10.0.0.1", "10.0.0.2", "a->b", n)

    def b_to_a(self, n: int) -> list[bytes]:
        return self._send(self.p.b, "10.0.0.2", "10.0.0.1", "b->a", n)

    def _send(self, frm: Device, src: str, dst: str, tag: str, n: int) -> list[bytes]:
        start = len(self.p.wire)
        for i in range(n):
            self.p.send(frm, ipv4_packet(src, dst, b"%s%d" % (tag[:1].encode(), i)))
        self.p.pump()
        return [d for t, d in self.p.wire[start:] if t == tag]


def test_track_publishes_a_peer_before_any_session() -> None:
    p = Pair()
    layout = Layout(workers=1, peer_capacity=4)
    buf = bytearray(layout.total_size)
    pub = SessionPublisher(
        layout,
        buf,
        {p.peer_b.public_key: 1},
        worker_id=0,
        secrets=SecretArea(4, bytearray(1 << 16)),
    )
    pub.track(p.peer_b)
    rec = record(layout, buf, 1)
    assert rec is not None and rec.public_key == p.peer_b.public_key
    assert rec.owner == 0 and rec.endpoint == p.peer_b.endpoint and rec.current is None
    pub.track(p.peer_a)  # no slot assigned: nothing written anywhere
    assert all(record(layout, buf, i) is None for i in (0, 2, 3))


def test_session_published_with_a_send_block_reserved_ahead() -> None:
    s = Published()
    kp = s.p.peer_a.current
    assert kp is not None
    rec = record(s.layout, s.buf)
    assert rec is not None and rec.current is not None
    assert rec.current.local_index == kp.local_index
    assert rec.current.remote_index == kp.remote_index
    assert rec.current.send_reserved == kp.send_counter + RESERVATION_BLOCK
    assert rec.endpoint == ADDR_A  # learned in the handshake


def test_a_used_up_block_is_republished_before_its_first_counter_is_used() -> None:
    s = Published()
    kp = s.p.peer_a.current
    assert kp is not None
    first = record(s.layout, s.buf)
    assert first is not None and first.current is not None
    block_end = first.current.send_reserved
    sent = s.b_to_a(block_end - kp.send_counter)  # every counter of the first block
    assert counter_of(sent[-1]) == block_end - 1
    rec = record(s.layout, s.buf)
    assert rec is not None and rec.current is not None
    assert rec.current.send_reserved == block_end  # not yet: the block is not used up
    s.b_to_a(1)  # uses counter block_end: the next block must be in shared memory first
    rec = record(s.layout, s.buf)
    assert rec is not None and rec.current is not None
    assert rec.current.send_reserved == block_end + RESERVATION_BLOCK


def test_receive_floor_rises_with_every_accepted_packet() -> None:
    s = Published()
    sent = s.a_to_b(5)
    rec = record(s.layout, s.buf)
    assert rec is not None and rec.current is not None
    assert rec.current.recv_floor == counter_of(sent[-1]) + 1  # no publish() was called


def test_replacement_resumes_without_nonce_reuse_or_replay() -> None:
    s = Published()
    before = s.a_to_b(3)
    s.b_to_a(2)
    reserved = record(s.layout, s.buf).current.send_reserved  # type: ignore[union-attr]

    # B "dies"; a new device with B's key and a new publisher restore from the slot
    b2 = Device(s.p.key_b, s.p.b.random_bytes, worker_id=1)
    peer_a2 = b2.add_peer(s.p.peer_a.public_key, allowed_ips=["10.0.0.1/32", "fd00::1/128"])
    pub2 = SessionPublisher(s.layout, s.buf, dict(s.slot_of), worker_id=1, secrets=s.secrets)
    assert pub2.restore(peer_a2, s.p.now)
    assert peer_a2.current is not None and peer_a2.endpoint == ADDR_A
    s.p.b, s.p.peer_a = b2, peer_a2

    out = bytearray(MAX_DATAGRAM)
    for old in before:  # everything the dead device accepted is refused
        res = b2.receive_transport(memoryview(old), len(old), ADDR_A, memoryview(out),
                                   s.p.now, s.p.wall)  # fmt: skip
        assert res == -1 - DropReason.REPLAYED
    delivered = len(s.p.delivered_b)
    s.a_to_b(1)
    assert len(s.p.delivered_b) == delivered + 1  # fresh packets pass, no handshake
    sent = s.b_to_a(1)
    assert len(sent) == 1 and counter_of(sent[0]) >= reserved
    assert s.p.delivered_a[-1] == ipv4_packet("10.0.0.2", "10.0.0.1", b"b0")
    rec = record(s.layout, s.buf)
    assert rec is not None and rec.current is not None
    assert rec.current.send_reserved > counter_of(sent[0])


def test_publish_dirty_writes_only_moved_endpoints() -> None:
    """Counters reach the record's rx/tx words at every count (Peer.traffic), so they are no
    reason to rewrite the record; a moved endpoint is."""
    s = Published()
    peer = s.p.peer_a
    slot = s.layout.peer_slot(s.buf, SLOT)
    seq = slot.sequence()
    s.pub.publish_dirty()
    assert slot.sequence() == seq  # nothing moved since the last publish
    s.a_to_b(1)
    s.b_to_a(1)
    assert slot.sequence() == seq  # the floor and traffic words alone are not a publish
    rec = record(s.layout, s.buf)
    assert rec is not None and peer.rx_bytes > 0 and peer.tx_bytes > 0
    assert (rec.rx_bytes, rec.tx_bytes) == (peer.rx_bytes, peer.tx_bytes)
    s.pub.publish_dirty()
    assert slot.sequence() == seq  # the counters are there already: no rewrite
    peer.endpoint = ("192.0.2.9", 51821)
    s.pub.publish_dirty()
    assert slot.sequence() > seq
    rec = record(s.layout, s.buf)
    assert rec is not None and rec.endpoint == ("192.0.2.9", 51821)
    s.pub.forget(peer.public_key)
    seq = slot.sequence()
    s.a_to_b(1)
    peer.endpoint = ("192.0.2.10", 51821)
    s.pub.publish_dirty()
    assert slot.sequence() == seq


class _Unwritable:
    """A peer slot whose writes fail (the publisher's cached SeqlockSlot stand-in)."""

    def write(self, _data: object) -> None:
        raise OSError("no room")


def test_publish_dirty_retries_a_failed_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record that could not be written is written by the next publish_dirty, even if
    nothing about the peer moved in between."""
    s = Published()
    slot = s.layout.peer_slot(s.buf, SLOT)
    seq = slot.sequence()
    peer = s.p.peer_a
    peer.last_handshake_wall += 1.0
    with monkeypatch.context() as m:
        m.setitem(s.pub._slots, SLOT, _Unwritable())
        assert not s.pub.publish(peer)
    assert slot.sequence() == seq
    s.pub.publish_dirty()
    assert slot.sequence() > seq
    rec = record(s.layout, s.buf)
    assert rec is not None and rec.last_handshake_wall == peer.last_handshake_wall


@pytest.mark.parametrize("case", ["empty", "other key", "torn"])
def test_restore_refuses_what_is_not_this_peers_session(case: str) -> None:
    s = Published()
    b2 = Device(s.p.key_b, s.p.b.random_bytes, worker_id=1)
    fresh = b2.add_peer(s.p.peer_a.public_key, allowed_ips=["10.0.0.1/32"])
    slot_of = dict(s.slot_of)
    if case == "empty":
        slot_of[s.p.peer_a.public_key] = 3
    elif case == "other key":
        other = crypto.public_key(crypto.generate_private_key(bytes(range(32))))
        SessionPublisher(s.layout, s.buf, {other: 3}, 0, s.secrets).track(
            b2.add_peer(other, allowed_ips=["10.0.0.9/32"])
        )
        slot_of[s.p.peer_a.public_key] = 3
    else:
        slot = s.layout.peer_slot(s.buf, SLOT)
        off = s.layout.peers_offset + SLOT * s.layout.peer_stride
        odd = slot.sequence() | 1  # a writer died mid-write
        s.buf[off : off + 8] = odd.to_bytes(8, "little")
    pub2 = SessionPublisher(s.layout, s.buf, slot_of, worker_id=1, secrets=s.secrets)
    assert not pub2.restore(fresh, s.p.now)
    assert fresh.current is None
