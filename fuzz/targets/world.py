"""The in-memory worlds the protocol targets run in, and the checks they share.

Devices built here (not tests/pairs.py, so fuzz/ stands alone) from fixed seeds and a
fixed clock; `fingerprint` is the peer state a rejected input must leave untouched.
"""


from __future__ import annotations

import ipaddress
import math
import random
import struct
from collections.abc import Callable
from typing import Any, TypeAlias

from shardwg.proto import crypto
from shardwg.proto.constants import (
    COOKIE_REPLY_SIZE,
    DROP_REASON_COUNT,
    MAC_LEN,
    MAX_DATAGRAM,
    DropReason,
    MessageType,
)
from shardwg.proto.device import Device, ForeignInitiation
from shardwg.proto.messages import classify
from shardwg.proto.peer import Peer

MAX_UDP_PAYLOAD = 65507  # the largest datagram the kernel can hand a UDP socket
ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)
REMOTE_OWNER = 3  # worker id that owns peer C in the datagram world

Outcome: TypeAlias = "int | DropReason | bytes | ForeignInitiation | None"


class FuzzFailure(AssertionError):
    """A security property did not hold (as opposed to a crash in the code under test)."""


def check(ok: bool, message: str) -> None:
    # Not `assert`: the properties must hold under `python -O` too.
    if not ok:
        raise FuzzFailure(message)


def set_load(dev: Device, on: bool) -> None:
    """Put a device under load or take it out, as the gateway-wide deadline the
    supervisor publishes in shared memory does (copied into each worker's intake)."""
    dev.intake.under_load_until = math.inf if on else -1.0


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def source_bytes(addr: tuple[str, int]) -> bytes:
    """IP || port, as the worker packs a source for cookies and rate limits."""
    return ipaddress.ip_address(addr[0]).packed + addr[1].to_bytes(2, "big")


def ipv4(src: str, dst: str, payload: bytes) -> bytes:
    total = 20 + len(payload)
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0, s, d) + payload


def ipv6(src: str, dst: str, payload: bytes) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    return struct.pack(">IHBB16s16s", 0x60000000, len(payload), 17, 64, s, d) + payload


def fix_mac1(msg: bytes, key: bytes) -> bytes:
    """Recompute mac1 as any attacker can (its key derives from the public key only)."""
    o1 = len(msg) - 2 * MAC_LEN
    return msg[:o1] + crypto.mac(key, msg[:o1]) + msg[o1 + MAC_LEN :]


# --------------------------------------------------------------------------- worlds


class World:
    """Devices A (10.0.0.1) and B (10.0.0.2) that know each other, moved by hand.

    Deliveries copy a datagram into a reused receive buffer with stale bytes after
    it, exactly as the worker hands `recvfrom_into` buffers to the device, so code
    that reads past `n` is caught.
    """

    def __init__(self, seed: int) -> None:
        rnd = seeded(seed)
        self.key_a = crypto.generate_private_key(rnd(32))
        self.key_b = crypto.generate_private_key(rnd(32))
        self.key_c = crypto.generate_private_key(rnd(32))
        self.pub_a = crypto.public_key(self.key_a)
        self.pub_b = crypto.public_key(self.key_b)
        self.pub_c = crypto.public_key(self.key_c)
        self.a = Device(self.key_a, seeded(seed + 1), worker_id=0)
        self.b = Device(self.key_b, seeded(seed + 2), worker_id=1)
        self.peer_b: Peer = self.a.add_peer(
            self.pub_b, allowed_ips=["10.0.0.2/32", "fd00::2/128"], endpoint=ADDR_B
        )
        self.peer_a: Peer = self.b.add_peer(
            self.pub_a, allowed_ips=["10.0.0.1/32", "fd00::1/128"], endpoint=None
        )
        self.now = 1000.0
        self.wall = 1_700_000_000.0
        self.rx = bytearray(b"\xa5" * (MAX_DATAGRAM + 64))
        self.out = bytearray(b"\x5a" * MAX_DATAGRAM)
        self.delivered: dict[int, list[bytes]] = {id(self.a): [], id(self.b): []}
        self.minted: list[bytes] = []  # every datagram an honest party produced
        # Off once a cached world is built: honest traffic during fuzzing is delivered at
        # once (a copy can only be a replay), and remembering it would grow without bound.
        self.recording = True
        self.seq = 0
        self.extra: list[Device] = []  # more devices whose state must survive hostile input
        self.seeds: dict[str, bytes] = {}  # genuine datagrams for the corpus (datagram world)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds

    def deliver(
        self, dev: Device, data: bytes, src: tuple[str, int], screened: bool = False
    ) -> Outcome:
        """One datagram into `dev`, the way the worker does it."""
        n = len(data)
        rx = self.rx
        rx[:n] = data
        rx[n : n + 64] = b"\xa5" * 64
        view = memoryview(rx)
        mtype = classify(view, n)
        if mtype < 0:
            return mtype
        if mtype == MessageType.TRANSPORT:
            res = dev.receive_transport(view, n, src, memoryview(self.out), self.now, self.wall)
            if res > 0:
                self.delivered.setdefault(id(dev), []).append(bytes(self.out[:res]))
            return res
        return dev.receive_handshake(
            bytes(view[:n]), src, source_bytes(src), self.now, self.wall, screened
        )

    def take_outbox(self, dev: Device) -> list[bytes]:
        msgs = [m for _p, m in dev.outbox]
        dev.outbox.clear()
        if self.recording:
            self.minted += msgs
        return msgs

    def exchange(self) -> None:
        """Move queued datagrams between A and B until both outboxes are empty."""
        for _ in range(10):
            moved = False
            for frm, to, src in ((self.a, self.b, ADDR_A), (self.b, self.a, ADDR_B)):
                for msg in self.take_outbox(frm):
                    moved = True
                    res = self.deliver(to, msg, src)
                    if isinstance(res, bytes):  # a cookie reply goes back to the sender
                        if self.recording:
                            self.minted.append(res)
                        self.deliver(frm, res, src)
            if not moved:
                break
        self.a.events.clear()
        self.b.events.clear()

    def establish(self) -> None:
        """A initiates, B responds, A's keepalive confirms: both hold a current session."""
        self.peer_b.send_initiation(self.now, self.wall)
        self.exchange()
        check(
            self.peer_b.current is not None and self.peer_a.current is not None,
            "world setup: handshake did not complete",
        )

    def seal(self, frm: Device, peer: Peer, packet: bytes) -> bytes:
        """An honest transport datagram carrying `packet` (b"" = keepalive)."""
        if not packet:
            peer.send_keepalive(self.now, self.wall)
            frm.events.clear()
            msgs = self.take_outbox(frm)
            check(len(msgs) == 1, f"keepalive not sealed: {len(msgs)} datagrams")
            return msgs[0]
        n = len(packet)
        buf = bytearray(n + 16)
        buf[:n] = packet
        out = bytearray(n + 64)
        res = frm.send_packet(peer, memoryview(buf), n, memoryview(out), self.now, self.wall)
        check(res > 0, f"honest send failed with {res}")
        msg = bytes(out[:res])
        if self.recording:
            self.minted.append(msg)
        return msg

    def honest_roundtrip(self) -> None:
        """A real packet still gets through, both ways: hostile input broke nothing."""
        set_load(self.a, False)
        set_load(self.b, False)
        for frm, to, peer, src_ip, dst_ip in (
            (self.a, self.b, self.peer_b, "10.0.0.1", "10.0.0.2"),
            (self.b, self.a, self.peer_a, "10.0.0.2", "10.0.0.1"),
        ):
            self.seq += 1
            pkt = ipv4(src_ip, dst_ip, b"honest packet %d" % self.seq)
            frm.outbox.append((peer, self.seal(frm, peer, pkt)))
            self.exchange()
            got = self.delivered.get(id(to), [])
            check(pkt in got, f"honest packet {src_ip} -> {dst_ip} lost after hostile input")
            got.clear()


def _keypair_state(kp: Any) -> tuple[Any, ...] | None:
    if kp is None:
        return None
    return (kp.local_index, kp.remote_index, kp.send_counter, kp.replay.highest, kp.created)


def fingerprint(dev: Device) -> tuple[Any, ...]:
    """Everything a rejected input must not change in a device's peer state."""
    peers = []
    for key in sorted(dev.peers):
        p = dev.peers[key]
        hs = p.handshake
        peers.append(
            (
                key,
                p.endpoint,
                p.last_timestamp,
                p.last_initiation_consumed,
                None if hs is None else (hs.local_index, hs.chaining_key, hs.hash),
                _keypair_state(p.current),
                _keypair_state(p.previous),
                _keypair_state(p.next),
                p.rx_bytes,
                p.tx_bytes,
                len(p.staged),
                p.last_handshake_wall,
                p.next_deadline(),
                getattr(p.cookie, "_cookie", None),
                getattr(p.cookie, "_cookie_time", None),
                getattr(p.cookie, "_last_mac1", None),
            )
        )
    return (
        tuple(peers),
        tuple(sorted(dev.sessions)),
        tuple(sorted(dev.table.pending)),
        len(dev.outbox),
        len(dev.events),
    )


# Transport drops that happen after the datagram authenticated (inner packet checks): the
# session legitimately moved on (replay window, roaming, confirmation), like wireguard-go.
AUTHENTICATED_DROPS = {-1 - DropReason.BAD_INNER_PACKET, -1 - DropReason.SOURCE_NOT_ALLOWED}


def is_drop(res: Outcome) -> bool:
    """A rejection outcome (negative code, DropReason, cookie reply) as opposed to acceptance."""
    if isinstance(res, DropReason | bytes):
        return True
    return isinstance(res, int) and res < 0


def check_outcome(res: Outcome, what: str) -> None:
    """Only the documented result types, and drop codes that name a DropReason."""
    if isinstance(res, DropReason) or res is None:
        return
    if isinstance(res, ForeignInitiation):
        check(res.owner == REMOTE_OWNER, f"{what}: ForeignInitiation to unknown owner {res.owner}")
        return
    if isinstance(res, bytes):
        check(
            len(res) == COOKIE_REPLY_SIZE and classify(res) == MessageType.COOKIE_REPLY,
            f"{what}: returned bytes are not a cookie reply: {res.hex()}",
        )
        return
    check(type(res) is int, f"{what}: unexpected result {res!r}")
    if isinstance(res, int) and res < 0:
        check(-1 - res < DROP_REASON_COUNT, f"{what}: drop code {res} names no DropReason")


_worlds: dict[Any, Any] = {}


def reset_worlds() -> None:
    """Forget cached worlds (each input then starts from a freshly built one)."""
    _worlds.clear()


def cached(key: Any, build: Callable[[], Any]) -> Any:
    world = _worlds.get(key)
    if world is None:
        world = _worlds[key] = build()
    return world


def forget_world(key: Any) -> None:
    """Drop one cached world (an input was accepted: the next one meets a fresh world)."""
    _worlds.pop(key, None)


def mutate(msg: bytes, ops: bytes) -> bytes:
    """Apply 4-byte edit ops (kind, pos lo, pos hi, value) to `msg`.

    Kinds: xor a byte, set a byte, truncate, insert a byte, delete a byte, and
    overwrite a run of bytes with one value: the edits a fuzzer needs to reach
    every field and every length.
    """
    buf = bytearray(msg)
    for i in range(0, len(ops) - 3, 4):
        kind, lo, hi, value = ops[i : i + 4]
        pos = lo | hi << 8
        k = kind % 6
        if k == 2:
            del buf[pos % (len(buf) + 1) :]
        elif k == 3:
            buf.insert(pos % (len(buf) + 1), value)
        elif not buf:
            continue
        elif k == 0:
            buf[pos % len(buf)] ^= value
        elif k == 1:
            buf[pos % len(buf)] = value
        elif k == 4:
            del buf[pos % len(buf)]
        else:
            start = pos % len(buf)
            end = min(len(buf), start + 1 + (kind >> 3))
            buf[start:end] = bytes([value]) * (end - start)
    return bytes(buf)
