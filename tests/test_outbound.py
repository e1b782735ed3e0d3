"""The worker's outbound path (engine/outbound.py) on a real session and real UDP sockets:
TUN reads (super-packets, plain packets) sealed into GSO runs, the counter reservation
published before any datagram uses it, staging without a session, handoffs cut into segments.
Runs with whichever kernel SHARDWG_NATIVE selects (CI runs both)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from pairs import Pair, ipv4_packet
from test_segment import payload_of, run_split, tcp_super, udp_super

from shardwg.engine.outbound import OutboundPath
from shardwg.io import udpgso, vnet
from shardwg.proto.constants import DropReason
from shardwg.proto.crypto import AEAD
from shardwg.shm import counters as C


class Out(OutboundPath):
    """OutboundPath without the rest of a Worker: counters in a list, handoffs recorded."""

    def __init__(self, device: Any, udp4: socket.socket) -> None:
        self.device = device
        self.tun_fd = -1
        self.udp4, self.udp6 = udp4, None
        self.v = [0] * C.WORDS
        self.handed: list[tuple[int, bytes]] = []
        self._init_outbound()

    def drop(self, code: int) -> None:
        self.v[C.DROP_BASE + (code if code >= 0 else -1 - code)] += 1

    def _hand_over(self, owner: int, data: bytes | memoryview, kind: int) -> None:
        self.handed.append((owner, bytes(data)))


@pytest.fixture
def rig() -> Iterator[tuple[Pair, Out, socket.socket]]:
    p = Pair()
    # test_segment's packets go 10.200.0.1 -> 10.201.0.9: route that to B.
    p.a.allowed.insert(ipaddress.ip_network("10.201.0.0/16"), p.peer_b)
    p.a.allowed.insert(ipaddress.ip_network("fd00:201::/64"), p.peer_b)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    out = Out(p.a, tx)
    try:
        yield p, out, rx
    finally:
        rx.close()
        tx.close()


def _session(p: Pair, rx: socket.socket) -> Any:
    p.send(p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"first"))  # staged; starts a handshake
    p.pump()
    kp = p.peer_b.current
    assert kp is not None
    p.peer_b.endpoint = rx.getsockname()
    return kp


def _load(out: Out, raws: list[bytes]) -> int:
    for i, raw in enumerate(raws):
        out._pk_bufs[i][: len(raw)] = raw
        out._pk_sizes[i] = len(raw)
    return len(raws)


def _receive(rx: socket.socket, kp: Any, n: int) -> list[tuple[int, bytes]]:
    aead = AEAD(kp.send_key)
    got = []
    for _ in range(n):
        d = rx.recv(65535)
        t, index, counter = struct.unpack_from("<IIQ", d)
        assert (t, index) == (4, kp.remote_index)
        got.append((counter, aead.decrypt(bytes(4) + struct.pack("<Q", counter), d[16:], None)))
    return got


def test_super_packets_sealed_in_runs_with_reservations_published_first(
    rig: tuple[Pair, Out, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, out, rx = rig
    kp = _session(p, rx)
    kp.send_counter, kp.send_reserved = 500, 510
    published: list[int] = []

    def publish(k: Any) -> bool:
        published.append(k.send_reserved)
        return True

    kp.on_reserve = publish
    sends: list[tuple[int, int]] = []
    real = udpgso.send_gso

    def checked(sock: Any, data: Any, size: int, count: int, addr: Any, *rest: Any) -> int:
        for off in range(0, len(data), size):
            counter = struct.unpack_from("<Q", data, off + 8)[0]
            assert counter < kp.send_reserved, "a counter used before its block was published"
        sends.append((size, count))
        return real(sock, data, size, count, addr, *rest)

    monkeypatch.setattr(udpgso, "send_gso", checked)
    raws = [tcp_super(False, payload_of(30000), 1380), vnet.ZERO_HDR + bytes(run_split(
        udp_super(False, payload_of(300), 1000))[0]), tcp_super(True, payload_of(5000), 1360)]
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, raws), p.now, p.wall)
    want = [s for raw in raws for s in run_split(raw, bufsize=2048)]
    got = _receive(rx, kp, len(want))
    assert [c for c, _ in got] == list(range(500, 500 + len(want)))
    assert [pt[: len(s)] for (_, pt), s in zip(got, want, strict=True)] == want
    assert published and published[0] == 510 + 4096  # the next block, from where it stopped
    assert out.v[C.TX_PACKETS] == len(want) and kp.send_counter == 500 + len(want)
    assert len(sends) < len(want)  # runs, not one send per datagram
    assert p.peer_b.tx_bytes >= out.v[C.TX_BYTES] > 0


def test_without_a_session_segments_are_staged(rig: tuple[Pair, Out, socket.socket]) -> None:
    p, out, rx = rig
    p.peer_b.endpoint = rx.getsockname()
    raw = tcp_super(False, payload_of(4000), 1380)
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, [raw]), p.now, p.wall)
    assert list(p.peer_b.staged) == run_split(raw)


def test_handoffs_get_segments_and_plain_packets_as_they_are(
    rig: tuple[Pair, Out, socket.socket],
) -> None:
    from shardwg.proto.ownership import RemotePeer

    p, out, _rx = rig
    p.a.allowed.insert(ipaddress.ip_network("10.201.0.0/16"), RemotePeer(b"k" * 32, 3))
    raw = tcp_super(False, payload_of(4000), 1380)
    plain = vnet.ZERO_HDR + run_split(raw)[0]
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, [raw, plain]), p.now,
              p.wall)  # fmt: skip
    assert out.handed == [(3, s) for s in run_split(raw)] + [(3, plain[10:])]


def test_malformed_reads_are_counted_drops(rig: tuple[Pair, Out, socket.socket]) -> None:
    p, out, rx = rig
    kp = _session(p, rx)
    good = tcp_super(False, payload_of(3000), 1380)
    bad = vnet.VNET.pack(1, vnet.GSO_TCPV4, 40, 0, 20, 16) + good[10:]  # gso_size 0
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, [bad, good]), p.now,
              p.wall)  # fmt: skip
    assert out.v[C.DROP_BASE + DropReason.BAD_INNER_PACKET] == 1
    assert len(_receive(rx, kp, 3)) == 3


def test_reads_interleaving_peers_keep_their_order_and_owners(
    rig: tuple[Pair, Out, socket.socket],
) -> None:
    from shardwg.proto.ownership import RemotePeer

    p, out, rx = rig
    kp = _session(p, rx)
    p.a.allowed.insert(ipaddress.ip_network("10.9.0.0/16"), RemotePeer(b"r" * 32, 2))
    mine = [vnet.ZERO_HDR + ipv4_packet("10.200.0.1", "10.201.0.9", bytes([i]) * 50)
            for i in range(3)]  # fmt: skip
    theirs = vnet.ZERO_HDR + ipv4_packet("10.200.0.1", "10.9.0.1", b"other")
    nowhere = vnet.ZERO_HDR + ipv4_packet("10.200.0.1", "192.0.2.99", b"lost")
    reads = [mine[0], theirs, mine[1], nowhere, nowhere, mine[2]]
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, reads), p.now, p.wall)
    assert out.handed == [(2, theirs[10:])]
    assert out.v[C.DROP_BASE + DropReason.NO_ROUTE] == 2
    got = _receive(rx, kp, 3)
    assert [pt[: len(m) - 10] for (_, pt), m in zip(got, mine, strict=True)] == [
        m[10:] for m in mine
    ]


def test_a_reservation_that_cannot_be_published_stops_sending(
    rig: tuple[Pair, Out, socket.socket],
) -> None:
    """Fail closed: the publisher refused the next block, so nothing at or past the old limit
    leaves, and the rest of the batch is a counted drop."""
    p, out, rx = rig
    kp = _session(p, rx)
    kp.send_counter, kp.send_reserved = 700, 705
    kp.on_reserve = lambda k: False
    raw = tcp_super(False, payload_of(20000), 1380)  # 15 segments
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, [raw]), p.now, p.wall)
    assert [c for c, _ in _receive(rx, kp, 5)] == list(range(700, 705))
    rx.settimeout(0.2)
    with pytest.raises(TimeoutError):
        rx.recv(65535)
    assert kp.send_counter == 705 and kp.send_reserved == 705
    assert out.v[C.DROP_BASE + DropReason.NOT_PUBLISHED] == 1


def test_a_spread_session_keeps_up_within_one_batch(
    rig: tuple[Pair, Out, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One TUN read batch of TSO super-packets is thousands of counters. While this worker
    seals it, another worker of the spread peer moves the front on; every run we send must
    still be inside the receiver's replay window of the front at its send (the batch
    checked once at its start was not: the receiver dropped its tail as replayed)."""
    from shardwg.proto.constants import REPLAY_WINDOW
    from shardwg.proto.spread import JUMP_AT, SpreadBlocks
    from shardwg.shm.spread import SpreadArea, area_size

    p, out, rx = rig
    kp = _session(p, rx)
    led = SpreadArea(bytearray(area_size(1, 2)), 1, 2).peer(0)
    SpreadBlocks(0, 2, led).begin(kp)
    index = kp.local_index
    behind: list[int] = []
    real = udpgso.send_gso

    def other_worker_races(sock: Any, data: Any, size: int, count: int, addr: Any,
                           *rest: Any) -> int:  # fmt: skip
        first = struct.unpack_from("<Q", data, 8)[0]
        behind.append(led.front(index) - first)
        # worker 1 seals 3,000 counters while we send this run
        led.publish(1, index, max(led.front(index), led.reserved(1, index)) + 3000)
        return real(sock, data, size, count, addr, *rest)

    monkeypatch.setattr(udpgso, "send_gso", other_worker_races)
    raws = [tcp_super(False, payload_of(60000), 1380) for _ in range(6)]
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, raws), p.now, p.wall)
    assert len(behind) >= 6
    assert max(behind) <= JUMP_AT + 64 < REPLAY_WINDOW, behind
    assert out.v[C.TX_PACKETS] == 6 * -(-60000 // 1380)


def test_a_follower_due_a_rekey_hands_the_owner_one_read(
    rig: tuple[Pair, Out, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spread peer's reads at a follower whose session is due a rekey: the first goes to
    the owner (its send starts the rekey: shm/follower.py rekey_due), the rest are sealed
    here; the next batch is all sealed here."""
    from shardwg.proto.ownership import RemotePeer

    p, out, _rx = rig

    class Due:
        asked = 0

        def rekey_due(self, now: float) -> bool:
            self.asked += 1
            return self.asked == 1

    remote = RemotePeer(b"r" * 32, 2)
    remote.follower = Due()
    p.a.allowed.insert(ipaddress.ip_network("10.9.0.0/16"), remote)
    sealed: list[tuple[int, int]] = []

    def seal_followed(fol: Any, bufs: Any, hdr: int, i: int, j: int, now: float) -> bool:
        sealed.append((i, j))
        return True

    monkeypatch.setattr(out, "_seal_followed", seal_followed)
    reads = [vnet.ZERO_HDR + ipv4_packet("10.200.0.1", "10.9.0.1", bytes([i]) * 30)
             for i in range(4)]  # fmt: skip
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, reads), p.now, p.wall)
    assert out.handed == [(2, reads[0][10:])]
    assert sealed == [(1, 4)]
    out._send(out._pk_bufs, out._pk_pkt, vnet.VNET_HDR_LEN, _load(out, reads), p.now, p.wall)
    assert out.handed == [(2, reads[0][10:])] and sealed == [(1, 4), (0, 4)]
