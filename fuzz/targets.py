"""Fuzz targets: pure functions of `bytes` that must never raise.

Each target feeds attacker-shaped bytes to one entry point an outsider can reach
(datagrams, handshake messages, transport packets, cookie replies) or a local user
can reach (config files, the UAPI socket) and checks the properties security rests
on: only the documented outcomes, nothing forged accepted, no state changed by a
rejected input, honest sessions still working afterwards. Any exception escaping a
target is a finding: `FuzzFailure` for a broken property, anything else for a crash
in the code under test.

Protocol targets run against in-memory device pairs built here (not tests/pairs.py,
so fuzz/ stands alone) from fixed seeds and a fixed clock, so every world, and every
message it mints, is the same in every process: the seed corpus (`make_corpus`)
holds messages that are genuine for the live worlds. Worlds are cached between
inputs and rebuilt whenever an input was accepted, so each input meets a pristine
world (rejected inputs are checked to leave peer state untouched) and a crash file
replays on its own.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import random
import struct
from collections.abc import Callable, Iterable
from errno import EINVAL, EMSGSIZE, EPROTO
from pathlib import Path
from typing import Any, TypeAlias

from shardwg.config.model import ConfigError, format_config, parse_config
from shardwg.proto import crypto
from shardwg.proto.constants import (
    COOKIE_REPLY_SIZE,
    DROP_REASON_COUNT,
    INITIATION_SIZE,
    MAC_LEN,
    MAX_DATAGRAM,
    REKEY_TIMEOUT,
    REPLAY_WINDOW,
    RESPONSE_SIZE,
    DropReason,
    MessageType,
)
from shardwg.proto.cookie import CookieChecker, CookieGenerator
from shardwg.proto.device import Device, ForeignInitiation
from shardwg.proto.messages import classify
from shardwg.proto.noise import LocalIdentity
from shardwg.proto.peer import Peer

try:  # a colleague's module, written in parallel; the target skips until it exists
    from shardwg.uapi import DeviceView, PeerView, SetRequest, UapiError
    from shardwg.uapi.protocol import RequestParser, format_get, parse_set

    UAPI_AVAILABLE = True
except ImportError:  # pragma: no cover - only before shardwg/uapi/protocol.py lands
    UAPI_AVAILABLE = False

__all__ = [
    "CORPUS_DIR",
    "TARGETS",
    "UAPI_AVAILABLE",
    "FuzzFailure",
    "config",
    "cookie",
    "datagram",
    "make_corpus",
    "mutate",
    "mutated_handshake",
    "reset_worlds",
    "transport",
    "uapi",
]

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
MAX_UDP_PAYLOAD = 65507  # the largest datagram the kernel can hand a UDP socket
ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)
REMOTE_OWNER = 3  # worker id that owns peer C in the datagram world

Outcome: TypeAlias = "int | DropReason | bytes | ForeignInitiation | None"


class FuzzFailure(AssertionError):
    """A security property did not hold (as opposed to a crash in the code under test)."""


def _check(ok: bool, message: str) -> None:
    # Not `assert`: the properties must hold under `python -O` too.
    if not ok:
        raise FuzzFailure(message)


def _set_load(dev: Device, on: bool) -> None:
    """Put a device under load or take it out, as the gateway-wide deadline the
    supervisor publishes in shared memory does (copied into each worker's intake)."""
    dev.intake.under_load_until = math.inf if on else -1.0


def _seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def _source_bytes(addr: tuple[str, int]) -> bytes:
    """IP || port, as the worker packs a source for cookies and rate limits."""
    return ipaddress.ip_address(addr[0]).packed + addr[1].to_bytes(2, "big")


def _ipv4(src: str, dst: str, payload: bytes) -> bytes:
    total = 20 + len(payload)
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0, s, d) + payload


def _ipv6(src: str, dst: str, payload: bytes) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    return struct.pack(">IHBB16s16s", 0x60000000, len(payload), 17, 64, s, d) + payload


def _fix_mac1(msg: bytes, key: bytes) -> bytes:
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
        rnd = _seeded(seed)
        self.key_a = crypto.generate_private_key(rnd(32))
        self.key_b = crypto.generate_private_key(rnd(32))
        self.key_c = crypto.generate_private_key(rnd(32))
        self.pub_a = crypto.public_key(self.key_a)
        self.pub_b = crypto.public_key(self.key_b)
        self.pub_c = crypto.public_key(self.key_c)
        self.a = Device(self.key_a, _seeded(seed + 1), worker_id=0)
        self.b = Device(self.key_b, _seeded(seed + 2), worker_id=1)
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
            bytes(view[:n]), src, _source_bytes(src), self.now, self.wall, screened
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
        _check(
            self.peer_b.current is not None and self.peer_a.current is not None,
            "world setup: handshake did not complete",
        )

    def seal(self, frm: Device, peer: Peer, packet: bytes) -> bytes:
        """An honest transport datagram carrying `packet` (b"" = keepalive)."""
        if not packet:
            peer.send_keepalive(self.now, self.wall)
            frm.events.clear()
            msgs = self.take_outbox(frm)
            _check(len(msgs) == 1, f"keepalive not sealed: {len(msgs)} datagrams")
            return msgs[0]
        n = len(packet)
        buf = bytearray(n + 16)
        buf[:n] = packet
        out = bytearray(n + 64)
        res = frm.send_packet(peer, memoryview(buf), n, memoryview(out), self.now, self.wall)
        _check(res > 0, f"honest send failed with {res}")
        msg = bytes(out[:res])
        if self.recording:
            self.minted.append(msg)
        return msg

    def honest_roundtrip(self) -> None:
        """A real packet still gets through, both ways: hostile input broke nothing."""
        _set_load(self.a, False)
        _set_load(self.b, False)
        for frm, to, peer, src_ip, dst_ip in (
            (self.a, self.b, self.peer_b, "10.0.0.1", "10.0.0.2"),
            (self.b, self.a, self.peer_a, "10.0.0.2", "10.0.0.1"),
        ):
            self.seq += 1
            pkt = _ipv4(src_ip, dst_ip, b"honest packet %d" % self.seq)
            frm.outbox.append((peer, self.seal(frm, peer, pkt)))
            self.exchange()
            got = self.delivered.get(id(to), [])
            _check(pkt in got, f"honest packet {src_ip} -> {dst_ip} lost after hostile input")
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
_AUTHENTICATED_DROPS = {-1 - DropReason.BAD_INNER_PACKET, -1 - DropReason.SOURCE_NOT_ALLOWED}


def _is_drop(res: Outcome) -> bool:
    """A rejection outcome (negative code, DropReason, cookie reply) as opposed to acceptance."""
    if isinstance(res, DropReason | bytes):
        return True
    return isinstance(res, int) and res < 0


def _check_outcome(res: Outcome, what: str) -> None:
    """Only the documented result types, and drop codes that name a DropReason."""
    if isinstance(res, DropReason) or res is None:
        return
    if isinstance(res, ForeignInitiation):
        _check(res.owner == REMOTE_OWNER, f"{what}: ForeignInitiation to unknown owner {res.owner}")
        return
    if isinstance(res, bytes):
        _check(
            len(res) == COOKIE_REPLY_SIZE and classify(res) == MessageType.COOKIE_REPLY,
            f"{what}: returned bytes are not a cookie reply: {res.hex()}",
        )
        return
    _check(type(res) is int, f"{what}: unexpected result {res!r}")
    if isinstance(res, int) and res < 0:
        _check(-1 - res < DROP_REASON_COUNT, f"{what}: drop code {res} names no DropReason")


_worlds: dict[Any, Any] = {}


def reset_worlds() -> None:
    """Forget cached worlds (each input then starts from a freshly built one)."""
    _worlds.clear()


def _cached(key: Any, build: Callable[[], Any]) -> Any:
    world = _worlds.get(key)
    if world is None:
        world = _worlds[key] = build()
    return world


# --------------------------------------------------------------------------- datagram


def _datagram_world() -> World:
    """Established A<->B session; B also routes peer C, owned by worker REMOTE_OWNER.

    Device b3 (same gateway key, worker REMOTE_OWNER) owns C and gets every
    ForeignInitiation, as the owner would through the handoff ring. `seeds` holds
    genuine datagrams for the corpus: some already consumed (replays must be
    refused), some still in flight (a fresh initiation, data both ways, a packet
    with a spoofed inner source) that the world accepts once, as it would from the honest peer.
    """
    w = World(seed=1)
    w.establish()
    init, resp, keepalive = w.minted[:3]
    w.b.add_remote_peer(w.pub_c, ["10.0.0.3/32"], owner=REMOTE_OWNER)
    b3 = Device(w.key_b, _seeded(7), worker_id=REMOTE_OWNER)
    b3.add_peer(w.pub_c, allowed_ips=["10.0.0.3/32"])
    c = Device(w.key_c, _seeded(8), worker_id=2)
    peer_c = c.add_peer(w.pub_b, allowed_ips=["10.0.0.0/24"], endpoint=ADDR_B)
    peer_c.send_initiation(w.now, w.wall)
    init_c = w.take_outbox(c)[0]
    res = w.deliver(w.b, init_c, ("192.0.2.3", 51820))
    _check(res == ForeignInitiation(REMOTE_OWNER), f"world setup: C's initiation gave {res!r}")
    _check(w.deliver(b3, init_c, ("192.0.2.3", 51820), screened=True) is None, "world setup: b3")
    w.minted += [m for _p, m in b3.outbox]
    b3.outbox.clear()
    b3.events.clear()
    w.extra = [b3]
    w.seeds = {
        "initiation_replayed": init,
        "response_replayed": resp,
        "keepalive_replayed": keepalive,
        "initiation_from_remote_peer_replayed": init_c,
        "transport_ipv4_in_flight": w.seal(w.a, w.peer_b, _ipv4("10.0.0.1", "10.0.0.2", b"s")),
        "transport_ipv6_in_flight": w.seal(w.b, w.peer_a, _ipv6("fd00::2", "fd00::1", b"s6")),
        "transport_spoofed_source_in_flight": w.seal(
            w.a, w.peer_b, _ipv4("10.9.9.9", "10.0.0.2", b"spoof")
        ),
    }
    w.advance(REKEY_TIMEOUT + 0.5)
    w.peer_b.send_initiation(w.now, w.wall)
    w.seeds["initiation_in_flight"] = w.take_outbox(w.a)[0]
    w.a.events.clear()
    w.honest_roundtrip()
    w.recording = False
    return w


def _canonical(msg: bytes) -> bytes:
    """A handshake message without the fields anyone may rewrite (sender index, macs)."""
    if len(msg) in (INITIATION_SIZE, RESPONSE_SIZE) and msg[0] in (1, 2):
        return msg[:4] + bytes(4) + msg[8 : len(msg) - 2 * MAC_LEN]
    return msg


def _source_of(digest: bytes) -> tuple[str, int]:
    """A source address chosen by the input: IPv4 or IPv6, any port."""
    port = int.from_bytes(digest[17:19], "big")
    if digest[0] & 1:
        return str(ipaddress.IPv6Address(digest[1:17])), port
    return str(ipaddress.IPv4Address(digest[1:5])), port


def datagram(data: bytes) -> None:
    """Any datagram from any source, to either side of an established session.

    Fed raw and, for handshake sizes, with mac1 recomputed (an attacker knows our
    public key), under load or not. Checks: documented result types only; a datagram
    rejected before it authenticated changes no peer state; nothing authenticates
    that no honest party sent (up to the sender index, which only mac1 covers); the
    honest session still carries packets both ways afterwards.
    """
    data = data[:MAX_UDP_PAYLOAD]
    w: World = _cached("datagram", _datagram_world)
    digest = hashlib.blake2s(data).digest()
    src = _source_of(digest)
    load = bool(digest[0] & 2)
    accepted = False
    for dev in (w.a, w.b):
        variants = [data]
        if len(data) in (INITIATION_SIZE, RESPONSE_SIZE):
            fixed = _fix_mac1(data, dev.local.mac1_key)
            if fixed != data:
                variants.append(fixed)
        for msg in variants:
            _set_load(dev, load)
            before = fingerprint(dev), [fingerprint(x) for x in w.extra]
            res = w.deliver(dev, msg, src)
            _check_outcome(res, "datagram")
            if isinstance(res, ForeignInitiation):  # the owner screens nothing again (ring)
                res = w.deliver(w.extra[0], msg, src, screened=True)
                _check_outcome(res, "datagram handed off")
                _check(not isinstance(res, bytes | ForeignInitiation), f"owner answered {res!r}")
            if _is_drop(res) and res not in _AUTHENTICATED_DROPS:
                if not accepted:
                    after = fingerprint(dev), [fingerprint(x) for x in w.extra]
                    _check(before == after, f"rejected datagram changed state: {res!r}")
                continue
            accepted = True
            minted = {_canonical(m) for m in w.minted}
            _check(
                _canonical(msg) in minted,
                f"accepted a datagram no honest party sent ({res!r}): {msg.hex()}",
            )
    for d in w.extra:  # b3's answers would go to C, which is not simulated
        d.outbox.clear()
        d.events.clear()
    w.honest_roundtrip()
    if accepted:
        _worlds.pop("datagram", None)


# --------------------------------------------------------------------------- mutations


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


class _HandshakeFixture:
    """One genuine handshake message, its receiver and what accepts it."""

    def __init__(
        self, world: World, receiver: Device, src: tuple[str, int], message: bytes
    ) -> None:
        self.world, self.receiver, self.src, self.message = world, receiver, src, message


_INIT, _RESP, _COOKIE = 0, 1, 2


def _handshake_fixture(kind: int, load: bool) -> _HandshakeFixture:
    """A genuine initiation (to B), response (to A) or cookie reply (to A), not yet delivered.

    Under load the receiver demands mac2, so the sender first earns a cookie the way
    a real peer would, and the message carries a valid mac2.
    """
    w = World(seed=11 + kind + 3 * load)
    if kind == _COOKIE:
        _set_load(w.b, True)
        w.peer_b.send_initiation(w.now, w.wall)
        reply = w.deliver(w.b, w.take_outbox(w.a)[0], ADDR_A)
        _check(isinstance(reply, bytes), "fixture: no cookie reply")
        assert isinstance(reply, bytes)
        w.minted.append(reply)
        return _HandshakeFixture(w, w.a, ADDR_B, reply)
    if kind == _INIT:
        if load:
            _set_load(w.b, True)
            w.peer_b.send_initiation(w.now, w.wall)
            reply = w.deliver(w.b, w.take_outbox(w.a)[0], ADDR_A)
            _check(isinstance(reply, bytes), "fixture: no cookie reply")
            assert isinstance(reply, bytes)
            _check(w.deliver(w.a, reply, ADDR_B) is None, "fixture: cookie not taken")
            w.advance(REKEY_TIMEOUT + 0.5)
        w.peer_b.send_initiation(w.now, w.wall)
        return _HandshakeFixture(w, w.b, ADDR_A, w.take_outbox(w.a)[0])
    if load:
        _set_load(w.a, True)
        w.peer_b.send_initiation(w.now, w.wall)
        _check(w.deliver(w.b, w.take_outbox(w.a)[0], ADDR_A) is None, "fixture: init")
        reply = w.deliver(w.a, w.take_outbox(w.b)[0], ADDR_B)
        _check(isinstance(reply, bytes), "fixture: no cookie reply to the response")
        assert isinstance(reply, bytes)
        _check(w.deliver(w.b, reply, ADDR_A) is None, "fixture: B did not take the cookie")
        w.advance(REKEY_TIMEOUT + 0.5)
    w.peer_b.send_initiation(w.now, w.wall)
    _check(w.deliver(w.b, w.take_outbox(w.a)[0], ADDR_A) is None, "fixture: init")
    w.b.events.clear()
    return _HandshakeFixture(w, w.a, ADDR_B, w.take_outbox(w.b)[0])


def _should_accept(fx: _HandshakeFixture, kind: int, load: bool, msg: bytes) -> bool:
    """Whether a genuine peer would accept this edit of the genuine message.

    Initiation/response: only mac1 covers the sender index, and anyone can compute
    mac1; mac2 is checked only under load. Cookie reply: the receiver index is not
    authenticated, so any index naming the same pending handshake or session works.
    """
    orig = fx.message
    if len(msg) != len(orig) or msg[:4] != orig[:4]:
        return False
    if msg == orig:
        return True
    if kind == _COOKIE:
        if msg[8:] != orig[8:]:
            return False
        index = int.from_bytes(msg[4:8], "little")
        table = fx.receiver.table
        owner = table.pending.get(index)
        if owner is None and index in table.sessions:
            owner = table.sessions[index].peer
        return owner is fx.world.peer_b
    if load:
        return False  # mac2 covers everything before it
    o1 = len(orig) - 2 * MAC_LEN
    if msg[8:o1] != orig[8:o1]:
        return False
    return msg[o1 : o1 + MAC_LEN] == crypto.mac(fx.receiver.local.mac1_key, msg[:o1])


def mutated_handshake(data: bytes) -> None:
    """A genuine initiation, response or cookie reply, edited by the input.

    data[0]: bits 0-1 pick the message (0 initiation, 1 response, 2 cookie reply,
    3 initiation), bit 2 puts the receiver under load (mac2 required), bit 3
    recomputes mac1 after the edits (an attacker knows the public key); the rest are
    `mutate` ops. An edit is accepted only when a genuine peer would (`_should_accept`),
    otherwise it gets a counted DropReason (or a cookie reply under load) and leaves
    the receiver's state untouched.
    """
    sel = data[0] if data else 0
    kind = (sel & 3) % 3
    load = bool(sel & 4) and kind != _COOKIE
    fix = bool(sel & 8) and kind != _COOKIE
    key = ("handshake", kind, load)
    fx: _HandshakeFixture = _cached(key, lambda: _handshake_fixture(kind, load))
    msg = mutate(fx.message, data[1:])
    if fix and len(msg) == len(fx.message):
        msg = _fix_mac1(msg, fx.receiver.local.mac1_key)
    expect = _should_accept(fx, kind, load, msg)
    before = fingerprint(fx.receiver)
    res = fx.world.deliver(fx.receiver, msg, fx.src)
    _check_outcome(res, "mutated handshake")
    if expect:
        _check(res is None, f"genuine-equivalent message rejected with {res!r}: {msg.hex()}")
        _worlds.pop(key, None)
        return
    _check(_is_drop(res), f"edited message accepted ({res!r}): {msg.hex()}")
    if isinstance(res, bytes):
        _check(load and kind != _COOKIE, "cookie reply without load")
    elif isinstance(res, int) and not isinstance(res, DropReason):
        _check(len(msg) != len(fx.message) or msg[:4] != fx.message[:4], "classify drop")
    _check(fingerprint(fx.receiver) == before, f"rejected edit changed state: {res!r}")


# --------------------------------------------------------------------------- transport


def _transport_world() -> World:
    w = World(seed=21)
    w.establish()
    w.recording = False
    return w


# Why an edited transport datagram may be refused: all before or at authentication.
_TRANSPORT_DROPS = {
    -1 - r
    for r in (
        DropReason.TOO_SHORT,
        DropReason.BAD_TYPE,
        DropReason.BAD_SIZE,
        DropReason.UNKNOWN_INDEX,
        DropReason.KEY_EXPIRED,
        DropReason.DECRYPT_FAILED,
        DropReason.REPLAYED,
    )
}


def transport(data: bytes) -> None:
    """A genuine transport datagram, edited by the input; replays; late arrivals.

    data[0]: bits 0-1 pick the payload (0 keepalive, 1 IPv4, 2 IPv6, 3 IPv4), bit 2
    the direction (A->B or B->A), bit 3 a counter jump of data[2:4] (mod 9000) between
    an earlier datagram and this one; data[1] sizes the payload; data[4:] are `mutate`
    ops. Checks: an edited datagram is rejected without changing state and does not
    burn its counter (the genuine one is accepted afterwards); the genuine one is
    accepted and decrypts to the packet sent; every replay is rejected; the earlier
    datagram arriving late is accepted iff it is within REPLAY_WINDOW of the highest.
    """
    data = data[: 4 + 4 * 512]
    sel = data[0] if data else 0
    size = data[1] * 5 if len(data) > 1 else 0
    jump = int.from_bytes(data[2:4], "little") % 9000 if sel & 8 else 0
    w: World = _cached("transport", _transport_world)
    if sel & 4:
        frm, to, peer, src = w.b, w.a, w.peer_a, ADDR_B
        ips = ("10.0.0.2", "10.0.0.1", "fd00::2", "fd00::1")
    else:
        frm, to, peer, src = w.a, w.b, w.peer_b, ADDR_A
        ips = ("10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2")
    filler = bytes((i * 7 + size) & 0xFF for i in range(size))
    kind = sel & 3
    if kind == 0:
        pkt = b""
    elif kind == 2:
        pkt = _ipv6(ips[2], ips[3], filler)
    else:
        pkt = _ipv4(ips[0], ips[1], filler)
    kp = peer.current
    _check(kp is not None, "transport world lost its session")
    assert kp is not None
    early = w.seal(frm, peer, pkt)
    kp.send_counter += jump
    genuine = w.seal(frm, peer, pkt)
    msg = mutate(genuine, data[4:])

    def expect_accept(d: bytes, what: str) -> None:
        got = w.deliver(to, d, src)
        _check(got == len(pkt), f"{what}: genuine datagram gave {got!r}, not {len(pkt)}")
        if pkt:
            out = w.delivered.get(id(to), [])
            _check(bool(out) and out[-1] == pkt, f"{what}: decrypted packet differs")
            out.clear()

    def expect_replayed(d: bytes, what: str) -> None:
        before = fingerprint(to)
        got = w.deliver(to, d, src)
        _check(got == -1 - DropReason.REPLAYED, f"{what}: replay gave {got!r}")
        _check(fingerprint(to) == before, f"{what}: replay changed state")

    if msg != genuine:
        before = fingerprint(to)
        res = w.deliver(to, msg, src)
        if isinstance(res, DropReason):  # retyped into a handshake message of that size
            _check(msg[:4] != genuine[:4], f"transport took the handshake path: {res!r}")
        else:
            _check(res in _TRANSPORT_DROPS, f"edited transport accepted ({res!r}): {msg.hex()}")
        _check(fingerprint(to) == before, f"rejected transport changed state: {res!r}")
    expect_accept(genuine, "after edit" if msg != genuine else "unedited")
    expect_replayed(genuine, "genuine")
    gap = jump + 1
    if gap <= REPLAY_WINDOW:
        expect_accept(early, f"late by {gap}")
    else:
        got = w.deliver(to, early, src)
        _check(got == -1 - DropReason.REPLAYED, f"late by {gap} > window gave {got!r}")
    expect_replayed(early, "early")


# --------------------------------------------------------------------------- config


def config(data: bytes) -> None:
    """wg-quick text: parse_config raises only ConfigError ("PATH:LINE: problem").

    An accepted config has 32-byte keys and survives format_config -> parse_config
    unchanged (the SaveConfig promise), unless format_config refuses it with the
    documented ValueError for values a config file cannot hold.
    """
    text = data.decode("utf-8", "replace")
    try:
        cfg = parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        _check(str(exc).startswith(f"fuzz.conf:{exc.line}: "), f"bad message {exc}")
        _check(0 <= exc.line <= text.count("\n") + 1, f"line {exc.line} out of range")
        return
    _check(len(cfg.interface.private_key) == 32, "private key not 32 bytes")
    for p in cfg.peers:
        _check(len(p.public_key) == 32, "public key not 32 bytes")
        _check(p.preshared_key is None or len(p.preshared_key) == 32, "psk not 32 bytes")
    try:
        saved = format_config(cfg)
    except ValueError:
        return
    try:
        again = parse_config(saved, "saved.conf")
    except ConfigError as exc:
        raise FuzzFailure(f"format_config output does not parse: {exc}\n{saved}") from None
    _check(again == cfg, f"config changed in a SaveConfig round trip:\n{cfg!r}\n{again!r}")


# --------------------------------------------------------------------------- uapi

_UAPI_ERRNOS = {EINVAL, EPROTO, EMSGSIZE}


def _uapi_events(parser: Any, chunks: Iterable[bytes]) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    for chunk in chunks:
        parser.feed(chunk)
        events += list(parser)
    return events


def _check_uapi_events(events: list[tuple[str, Any]], parser: Any) -> None:
    for op, value in events:
        if op == "get":
            _check(value is None, "get event with a value")
        elif op == "set":
            _check(isinstance(value, SetRequest), f"set event holds {value!r}")
            _check_settable(value)
        else:
            _check(op == "error" and value in _UAPI_ERRNOS, f"undocumented event {op}={value!r}")
    if parser.closed:
        _check(bool(events) and events[-1][0] == "error", "closed without an error event")


def _check_settable(req: Any) -> None:
    """What a set accepted can be reported by get: format_get must not refuse it."""
    if isinstance(req.private_key, bytes):
        _check(len(req.private_key) == 32, "private key not 32 bytes")
    peers = []
    for p in req.peers:
        _check(len(p.public_key) == 32, "public key not 32 bytes")
        psk = p.preshared_key if isinstance(p.preshared_key, bytes) else None
        peers.append(
            PeerView(
                public_key=p.public_key,
                preshared_key=psk,
                endpoint=p.endpoint if isinstance(p.endpoint, str) else None,
                persistent_keepalive=(
                    p.persistent_keepalive if isinstance(p.persistent_keepalive, int) else 0
                ),
                allowed_ips=list(p.allowed_ips_add),
            )
        )
    view = DeviceView(
        private_key=req.private_key if isinstance(req.private_key, bytes) else None,
        listen_port=req.listen_port if isinstance(req.listen_port, int) else 0,
        fwmark=req.fwmark if isinstance(req.fwmark, int) else 0,
        peers=peers,
    )
    try:
        reply = format_get(view)
    except ValueError as exc:
        raise FuzzFailure(f"set accepted what get cannot report: {exc}") from None
    _check(reply.endswith(b"errno=0\n\n"), "get reply lacks its trailer")
    _check(b"\n\n" not in reply[:-2], "a set value forged an early end of the get reply")


def uapi(data: bytes) -> None:
    """Bytes on the UAPI socket: RequestParser yields only get, set or error events.

    The same bytes fed whole, in small chunks and under tight limits give only
    documented events (errors are EINVAL, EPROTO or EMSGSIZE), chunking never changes
    them, a closed parser said why, parse_set raises only UapiError, and whatever a
    set accepts can be reported by get.
    """
    if not UAPI_AVAILABLE:  # TODO(uapi): shardwg/uapi/protocol.py not there yet: nothing to fuzz
        return
    whole = RequestParser()
    events = _uapi_events(whole, [data])
    _check_uapi_events(events, whole)
    step = 1 + (len(data) % 7)
    chunked = RequestParser()
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    _check(_uapi_events(chunked, pieces) == events, "chunking changed the UAPI events")
    tight = RequestParser(max_line=48, max_request=160)
    _check_uapi_events(_uapi_events(tight, [data]), tight)
    try:
        parse_set(data.decode("latin-1").split("\n"))
    except UapiError as exc:
        _check(exc.errno in _UAPI_ERRNOS, f"parse_set errno {exc.errno}")


# --------------------------------------------------------------------------- cookie


def _fit(data: bytes, size: int) -> bytes:
    return (data * (size // max(1, len(data)) + 1))[:size] if data else bytes(size)


_COOKIE_LOCAL = LocalIdentity.from_private(crypto.generate_private_key(bytes(range(32))))


def cookie(data: bytes) -> None:
    """mac1/mac2 checks and cookie replies on arbitrary bytes: only bool results.

    Any size and content, bytes or memoryview, with and without a cookie secret or a
    sent mac1. Then the round trip on a message built from the input: our mac1
    verifies, the cookie reply decrypts for the sender only with an unedited reply,
    and the resulting mac2 verifies for that source and no other.
    """
    local = _COOKIE_LOCAL
    now = 50.0
    digest = hashlib.blake2s(data).digest()
    source = digest[:18] if digest[0] & 1 else digest[:6]
    other = bytes([source[0] ^ 1]) + source[1:]
    checker = CookieChecker(local, _seeded(digest[1]))
    gen = CookieGenerator(local.mac1_key, local.cookie_key)
    blobs: list[bytes | memoryview] = [data, memoryview(data)]
    blobs += [_fit(data, n) for n in (COOKIE_REPLY_SIZE, RESPONSE_SIZE, INITIATION_SIZE)]
    for blob in blobs:
        _check(gen.consume_reply(bytes(blob), now) is False, "cookie accepted with nothing sent")
        _check(type(checker.check_mac1(blob)) is bool, "check_mac1 not bool")
        _check(checker.check_mac2(blob, source, now) is False, "mac2 valid without a secret")
    size = INITIATION_SIZE if digest[2] & 1 else RESPONSE_SIZE
    buf = bytearray(_fit(data, size))
    gen.add_macs(buf, now)
    msg = bytes(buf)
    _check(checker.check_mac1(msg) is True, "our own mac1 does not verify")
    _check(checker.check_mac2(msg, source, now) is False, "mac2 valid without a cookie")
    for blob in blobs:
        res = gen.consume_reply(bytes(blob), now)
        _check(type(res) is bool, "consume_reply not bool")
        _check(not res or len(blob) == COOKIE_REPLY_SIZE, "cookie taken from a wrong size")
        _check(type(checker.check_mac2(blob, source, now)) is bool, "check_mac2 not bool")
    reply = checker.create_reply(msg, source, now)
    _check(len(reply) == COOKIE_REPLY_SIZE and reply[4:8] == msg[4:8], "bad reply")
    edited = mutate(reply, data[:16])
    if edited != reply:
        _check(gen.consume_reply(edited, now) is False or edited[8:] == reply[8:], "forged")
    _check(gen.consume_reply(reply, now) is True, "genuine cookie reply refused")
    gen.add_macs(buf, now)
    msg = bytes(buf)
    _check(checker.check_mac2(msg, source, now) is True, "mac2 from our cookie fails")
    _check(checker.check_mac2(msg, other, now) is False, "cookie valid for another source")
    _check(checker.check_mac2(msg, source, now + 121.0) is False, "stale cookie secret valid")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "datagram": datagram,
    "mutated_handshake": mutated_handshake,
    "transport": transport,
    "config": config,
    "uapi": uapi,
    "cookie": cookie,
}


# --------------------------------------------------------------------------- corpus


def _corpus_entries() -> dict[str, dict[str, bytes]]:
    """Seed inputs per target: genuine messages for the live worlds, edges, valid texts."""
    w = _datagram_world()
    # A world under load supplies a genuine cookie reply; another seed, foreign keys.
    fw = World(seed=5)
    _set_load(fw.b, True)
    fw.peer_b.send_initiation(fw.now, fw.wall)
    foreign_init = fw.take_outbox(fw.a)[0]
    foreign_cookie = fw.deliver(fw.b, foreign_init, ADDR_A)
    assert isinstance(foreign_cookie, bytes)
    dg: dict[str, bytes] = dict(w.seeds)
    dg["initiation_foreign"] = foreign_init
    dg["cookie_reply_foreign"] = foreign_cookie
    for t, n in ((1, 148), (2, 92), (3, 64), (4, 32)):
        dg[f"type{t}_zero_{n}"] = bytes([t, 0, 0, 0]) + bytes(n - 4)
        dg[f"type{t}_short_{n - 1}"] = bytes([t, 0, 0, 0]) + bytes(n - 5)
        dg[f"type{t}_long_{n + 1}"] = bytes([t, 0, 0, 0]) + bytes(n - 3)
    dg["empty"] = b""
    dg["three_bytes"] = b"\x04\x00\x00"
    dg["reserved_nonzero"] = b"\x04\x01\x00\x00" + bytes(28)
    dg["type5"] = b"\x05\x00\x00\x00" + bytes(60)
    dg["ones_1500"] = b"\xff" * 1500
    dg["transport_max"] = b"\x04\x00\x00\x00" + bytes(MAX_UDP_PAYLOAD - 4)
    hs: dict[str, bytes] = {}
    for sel, name in ((0, "initiation"), (1, "response"), (2, "cookie_reply")):
        hs[f"{name}_unchanged"] = bytes([sel])
        hs[f"{name}_flip_first_field"] = bytes([sel, 0, 4, 0, 1])
        hs[f"{name}_truncated"] = bytes([sel, 2, 60, 0, 0])
    hs["initiation_mac2_flip"] = bytes([0, 0, 140, 0, 0x80])
    hs["initiation_sender_fixmac1"] = bytes([8, 0, 5, 0, 0x11])
    hs["initiation_ephemeral_zero_fixmac1"] = bytes([8, 5, 8, 0, 0, 0, 8, 0, 0]) + bytes(
        [5, 16, 0, 0, 5, 24, 0, 0, 5, 32, 0, 0]
    )
    hs["initiation_load_mac2_flip"] = bytes([4, 0, 140, 0, 0x80])
    hs["initiation_load_unchanged"] = bytes([4])
    hs["response_load_unchanged"] = bytes([5])
    hs["response_receiver_fixmac1"] = bytes([9, 0, 9, 0, 0x01])
    hs["response_sender_fixmac1"] = bytes([9, 0, 5, 0, 0x01])
    hs["cookie_receiver_flip"] = bytes([2, 0, 5, 0, 0x01])
    hs["cookie_nonce_flip"] = bytes([2, 0, 10, 0, 0x01])
    tr: dict[str, bytes] = {
        "keepalive_unchanged": b"\x00\x00\x00\x00",
        "ipv4_unchanged": b"\x01\x10\x00\x00",
        "ipv6_unchanged_b_to_a": b"\x06\x10\x00\x00",
        "ipv4_window_edge": b"\x09\x08" + (REPLAY_WINDOW - 1).to_bytes(2, "little"),
        "ipv4_past_window": b"\x09\x08" + REPLAY_WINDOW.to_bytes(2, "little"),
        "keepalive_counter_flip": b"\x00\x00\x00\x00" + bytes([0, 8, 0, 1]),
        "ipv4_receiver_flip": b"\x01\x10\x00\x00" + bytes([0, 4, 0, 1]),
        "ipv4_truncated": b"\x01\x10\x00\x00" + bytes([2, 40, 0, 0]),
        "ipv4_extended": b"\x01\x10\x00\x00" + bytes([3, 255, 255, 0]),
        "ipv6_tag_flip": b"\x02\x10\x00\x00" + bytes([0, 255, 255, 0x80]),
        # campaign finding (harness): a 64-byte datagram retyped 4 -> 3 is a cookie reply
        "ipv4_retyped_as_cookie_reply": b"\x01\x00\x00\x00" + bytes([0, 0, 0, 7]),
    }
    pub = crypto.public_key(w.key_a)
    key_b64 = base64.b64encode(w.key_b).decode()
    pub_b64 = base64.b64encode(pub).decode()
    cf: dict[str, bytes] = {
        "minimal": f"[Interface]\nPrivateKey = {key_b64}\n".encode(),
        "full": (
            f"# gateway\n[Interface]\nPrivateKey = {key_b64}\nListenPort = 51820\n"
            "Address = 10.0.0.1/24, fd00::1/64\nDNS = 10.0.0.53, example.com\nMTU = 1420\n"
            "FwMark = 0x1234\nTable = off\nSaveConfig = true\nPostUp = echo up\n\n"
            f"[Peer]\nPublicKey = {pub_b64}\nPresharedKey = {key_b64}\n"
            "AllowedIPs = 10.0.0.2/32, fd00::2/128\nAllowedIPs = 0.0.0.0/0\n"
            "Endpoint = [2001:db8::1]:51820\nPersistentKeepalive = 25\n"
        ).encode(),
        "hostname_endpoint": (
            f"\ufeff[interface]\r\nprivatekey={key_b64}\r\n[peer]\r\npublickey={pub_b64}\r\n"
            "endpoint = vpn.example.com:51820\r\nallowedips =\r\n"
        ).encode(),
        "bad_key": b"[Interface]\nPrivateKey = AAAA\n",
        "duplicate_interface": f"[Interface]\nPrivateKey = {key_b64}\n[Interface]\n".encode(),
        "control_char": b"[Interface]\x01\n",
        "empty": b"",
    }
    hex_a, hex_b = w.key_b.hex(), pub.hex()
    ua: dict[str, bytes] = {
        "get": b"get=1\n\n",
        "get_get": b"get=1\n\nget=1\n\n",
        "set_device": f"set=1\nprivate_key={hex_a}\nlisten_port=51820\nfwmark=0\n\n".encode(),
        "set_peer": (
            f"set=1\nreplace_peers=true\npublic_key={hex_b}\npreshared_key={hex_a}\n"
            "endpoint=[fe80::1%eth0]:51820\npersistent_keepalive_interval=25\n"
            "replace_allowed_ips=true\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::/64\n"
            "protocol_version=1\n\n"
        ).encode(),
        "set_remove": f"set=1\npublic_key={hex_b}\nremove=true\n\n".encode(),
        "set_update_only_crlf": f"set=1\r\npublic_key={hex_b}\r\nupdate_only=true\r\n\r\n".encode(),
        "set_bad_value": b"set=1\nlisten_port=99999\n\nget=1\n\n",
        "bad_op": b"put=1\n\n",
        "get_no_blank": b"get=1\nx",
        "long_line": b"set=1\n" + b"a" * 5000 + b"\n\n",
    }
    co: dict[str, bytes] = {
        "empty": b"",
        "reply_size": bytes(range(64)),
        "response_size": bytes(range(92)),
        "initiation_size": bytes(range(148)),
        "genuine_reply": foreign_cookie,
        "genuine_initiation": foreign_init,
        "ones_200": b"\xff" * 200,
    }
    return {
        "datagram": dg,
        "mutated_handshake": hs,
        "transport": tr,
        "config": cf,
        "uapi": ua,
        "cookie": co,
    }


def make_corpus(directory: Path = CORPUS_DIR) -> dict[str, int]:
    """(Re)write the seed corpus; returns the number of files per target."""
    counts: dict[str, int] = {}
    for target, entries in _corpus_entries().items():
        d = directory / target
        d.mkdir(parents=True, exist_ok=True)
        for name, blob in entries.items():
            (d / name).write_bytes(blob)
        counts[target] = len(entries)
    reset_worlds()
    return counts


def load_corpus(target: str, directory: Path = CORPUS_DIR) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every seed of `target`, sorted by name."""
    d = directory / target
    if not d.is_dir():
        return []
    return [(p.name, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()]
