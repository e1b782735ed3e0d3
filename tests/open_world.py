"""A small world for the inbound batch path: two sans-IO devices with a session, and packet
builders with valid (or deliberately broken) inner headers and checksums.

Device A is the gateway under test (worker 0); device B is its peer and seals what A opens.
B's allowed IPs on A cover test_segment's source addresses (10.200.0.1, fd00:200::1).
"""

from __future__ import annotations

import struct

from pairs import seeded_random as seeded

from shardwg.proto import crypto
from shardwg.proto.constants import MAX_DATAGRAM, MessageType
from shardwg.proto.device import Device
from shardwg.proto.keypair import seal_into
from shardwg.proto.peer import Peer

ADDR_A = ("127.0.0.1", 51820)
ADDR_B = ("127.0.0.1", 40001)
ALLOWED_B = ["10.200.0.1/32", "fd00:200::1/128", "10.77.0.0/16"]
ALLOWED_C = ["10.78.0.0/16"]


class World:
    """A <-> B with a confirmed session both ways (A is the responder); a third peer C on A
    without a session, so its prefixes are someone else's."""

    def __init__(self, seed: int = 1, now: float = 1000.0) -> None:
        rnd = seeded(seed)
        self.key_a = crypto.generate_private_key(rnd(32))
        self.key_b = crypto.generate_private_key(rnd(32))
        self.key_c = crypto.generate_private_key(rnd(32))
        self.a = Device(self.key_a, seeded(seed + 1), worker_id=0)
        self.b = Device(self.key_b, seeded(seed + 2), worker_id=1)
        self.peer_b: Peer = self.a.add_peer(
            crypto.public_key(self.key_b), allowed_ips=ALLOWED_B, endpoint=ADDR_B
        )
        self.peer_c: Peer = self.a.add_peer(crypto.public_key(self.key_c), allowed_ips=ALLOWED_C)
        self.peer_a: Peer = self.b.add_peer(
            crypto.public_key(self.key_a), allowed_ips=["0.0.0.0/0", "::/0"], endpoint=ADDR_A
        )
        self.now = now
        self.wall = 1_700_000_000.0
        self._handshake()

    def _handshake(self) -> None:
        """B initiates, A responds, B's first transport packet confirms A's `next`."""
        assert self.peer_a.send_initiation(self.now, self.wall)
        for _ in range(4):
            for frm, to, src in ((self.b, self.a, ADDR_B), (self.a, self.b, ADDR_A)):
                out = frm.outbox[:]
                frm.outbox.clear()
                for _peer, data in out:
                    if data[0] == MessageType.TRANSPORT:
                        continue  # keepalives: A confirms on the first real batch
                    srcb = bytes(4) + src[1].to_bytes(2, "big")
                    res = to.receive_handshake(data, src, srcb, self.now, self.wall)
                    assert res is None, res
        assert self.peer_a.current is not None and self.peer_b.next is not None
        self.a.events.clear()
        self.b.events.clear()

    def seal(self, packet: bytes) -> bytes:
        """B seals an IP packet (or b'' for a keepalive) for A."""
        kp = self.peer_a.current
        assert kp is not None
        buf = bytearray(len(packet) + 64)
        buf[: len(packet)] = packet
        out = bytearray(MAX_DATAGRAM)
        n = seal_into(kp, memoryview(buf), len(packet), 1420, memoryview(out))
        assert n > 0
        return bytes(out[:n])

    def rekey(self) -> None:
        """A confirms its session, then B starts a second handshake: A holds two sessions
        for B (current and next), B sends on the new one and still has the old one."""
        kp = self.peer_b.next
        assert kp is not None
        self.peer_b.confirm(kp, self.now, self.wall)
        self.now += 6.0
        self.wall += 6.0
        self._handshake()
        assert self.peer_b.current is not None and self.peer_b.next is not None
        assert self.peer_a.previous is not None


def seal_with(kp: object, counter: int, packet: bytes, pad: int = 16) -> bytes:
    """A transport datagram sealed with an explicit counter (replays, jumps, far behind)."""
    padded = packet + bytes(-len(packet) % pad) if packet else b""
    nonce = bytes(4) + counter.to_bytes(8, "little")
    body = crypto.AEAD(kp.send_key).encrypt(nonce, padded, None)  # type: ignore[attr-defined]
    return struct.pack("<IIQ", 4, kp.remote_index, counter) + body  # type: ignore[attr-defined]
