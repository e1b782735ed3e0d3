"""In-memory pair of sans-IO devices: moves datagrams between them with a fake clock."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from shardwg.proto import crypto
from shardwg.proto.constants import MAX_DATAGRAM, MessageType
from shardwg.proto.device import Device
from shardwg.proto.messages import classify
from shardwg.proto.peer import Peer

ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)


def seeded_random(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def ipv4_packet(src: str, dst: str, payload: bytes, proto: int = 17) -> bytes:
    """A minimal IPv4 packet (checksum left zero; the device does not check it)."""
    total = 20 + len(payload)
    s = bytes(int(x) for x in src.split("."))
    d = bytes(int(x) for x in dst.split("."))
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0, s, d)
    return hdr + payload


class Pair:
    """Device A (10.0.0.1) and device B (10.0.0.2), each knowing the other as a peer."""

    def __init__(self, psk: bytes | None = None, keepalive: int = 0, seed: int = 1) -> None:
        rnd = seeded_random(seed)
        self.key_a = crypto.generate_private_key(rnd(32))
        self.key_b = crypto.generate_private_key(rnd(32))
        self.a = Device(self.key_a, seeded_random(seed + 1), worker_id=0)
        self.b = Device(self.key_b, seeded_random(seed + 2), worker_id=1)
        self.peer_b: Peer = self.a.add_peer(
            crypto.public_key(self.key_b),
            preshared_key=psk,
            allowed_ips=["10.0.0.2/32", "fd00::2/128"],
            endpoint=ADDR_B,
            persistent_keepalive=keepalive,
        )
        self.peer_a: Peer = self.b.add_peer(
            crypto.public_key(self.key_a),
            preshared_key=psk,
            allowed_ips=["10.0.0.1/32", "fd00::1/128"],
            endpoint=None,
        )
        self.now = 1000.0
        self.wall = 1_700_000_000.0
        self.delivered_a: list[bytes] = []  # IP packets that came out of A's TUN
        self.delivered_b: list[bytes] = []
        self.wire: list[tuple[str, bytes]] = []  # every datagram, tagged "a->b" / "b->a"
        self.drops: list[int] = []
        self.drop_filter: Callable[[str, bytes], bool] = lambda d, m: False

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds

    def send(self, frm: Device, packet: bytes) -> int:
        """Inject an IP packet into `frm`'s TUN; returns send_packet's result."""
        buf = bytearray(MAX_DATAGRAM)
        buf[: len(packet)] = packet
        out = bytearray(MAX_DATAGRAM)
        view = memoryview(buf)
        peer = frm.route(view, len(packet))
        assert peer is not None, "no route"
        res = frm.send_packet(peer, view, len(packet), memoryview(out), self.now, self.wall)
        if res > 0:
            frm.outbox.append((peer, bytes(out[:res])))
        return res

    def deliver(self, to: Device, data: bytes, src: tuple[str, int]) -> None:
        """Give one datagram to `to` as if it arrived from `src`."""
        mtype = classify(data)
        if mtype < 0:
            self.drops.append(mtype)
            return
        if mtype == MessageType.TRANSPORT:
            out = bytearray(MAX_DATAGRAM)
            res = to.receive_transport(memoryview(data), len(data), src, memoryview(out),
                                       self.now, self.wall)
            if res > 0:
                (self.delivered_b if to is self.b else self.delivered_a).append(bytes(out[:res]))
            elif res < 0:
                self.drops.append(res)
            return
        src_bytes = bytes(int(x) for x in src[0].split(".")) + src[1].to_bytes(2, "big")
        result = to.receive_handshake(data, src, src_bytes, self.now, self.wall)
        if isinstance(result, bytes):
            (self.a if to is self.b else self.b).outbox.append((None, result))  # type: ignore
        elif result is not None:
            self.drops.append(-1 - int(result))

    def pump(self, rounds: int = 10) -> None:
        """Move queued datagrams both ways until both outboxes are empty."""
        for _ in range(rounds):
            moved = False
            for frm, to, src, tag in ((self.a, self.b, ADDR_A, "a->b"),
                                      (self.b, self.a, ADDR_B, "b->a")):
                out = frm.outbox[:]
                frm.outbox.clear()
                for _peer, data in out:
                    moved = True
                    self.wire.append((tag, data))
                    if not self.drop_filter(tag, data):
                        self.deliver(to, data, src)
            if not moved:
                return

    def tick(self) -> None:
        self.a.tick(self.now, self.wall)
        self.b.tick(self.now, self.wall)
        self.pump()
