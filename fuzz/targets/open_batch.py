"""Fuzz target `open_batch`: any bytes as a receive batch for the inbound batch kernel.

The input is cut into up to 8 receive messages (each with a GRO segment size, or none), and
the batch goes to the native `open_batch` (when built) and to the Python reference, each
with its own copy of the same session state (a gateway A with two sessions of peer B, one
peer C with no session). Neither may raise or write out of bounds (the fuzz build runs
under ASan/UBSan: scripts/native_sanitize), and both must produce the same TUN bytes, drop
counters, handshake rows, touched sessions and state bytes.

Input layout: byte 0 = flags (bit 0: USO on; bits 1-2: clock 0 s, 1 s, 179 s or 200 s
after the sessions were made; bit 3: unknown indices handed back for forwarding);
byte 1 = message count - 1 (mod 8); then per message a little-endian u16 length, a u8
segment size / 8 (0: not a GRO batch) and the bytes.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

from shardwg.datapath import open_ref, select
from shardwg.datapath.openstate import OpenState, batch_arrays
from shardwg.proto import crypto
from shardwg.proto.constants import MessageType
from shardwg.proto.device import Device

NOW_OFFSETS = (0.0, 1.0, 179.0, 200.0)
MAX_MESSAGES = 8


class OpenFuzzFailure(AssertionError):
    """The two kernels disagree (the input is a finding)."""


def _seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


class _World:
    """A responds to two handshakes from B (two sessions), fixed seeds and clock."""

    def __init__(self) -> None:
        rnd = _seeded(77)
        key_a, key_b, key_c = (crypto.generate_private_key(rnd(32)) for _ in range(3))
        self.a = Device(key_a, _seeded(78), worker_id=0)
        self.b = Device(key_b, _seeded(79), worker_id=1)
        self.peer_b = self.a.add_peer(crypto.public_key(key_b),
                                      allowed_ips=["10.0.0.2/32", "fd00::2/128"])  # fmt: skip
        self.a.add_peer(crypto.public_key(key_c), allowed_ips=["10.0.0.3/32"])
        self.peer_a = self.b.add_peer(crypto.public_key(key_a), allowed_ips=["0.0.0.0/0"],
                                      endpoint=("192.0.2.1", 51820))  # fmt: skip
        self.now, self.wall = 1000.0, 1_700_000_000.0
        self._handshake()
        kp = self.peer_b.next
        assert kp is not None
        self.peer_b.confirm(kp, self.now, self.wall)
        self.now += 6.0
        self.wall += 6.0
        self._handshake()

    def _handshake(self) -> None:
        assert self.peer_a.send_initiation(self.now, self.wall)
        for _ in range(3):
            for frm, to in ((self.b, self.a), (self.a, self.b)):
                out = frm.outbox[:]
                frm.outbox.clear()
                for _peer, data in out:
                    if data[0] != MessageType.TRANSPORT:
                        to.receive_handshake(data, ("192.0.2.9", 1), bytes(6), self.now,
                                             self.wall)  # fmt: skip


_CACHE: dict[str, Any] = {}


def _setup() -> dict[str, Any]:
    if not _CACHE:
        world = _World()
        native = select.native_module()
        ref = OpenState(open_ref.RefKeys())
        ref.sync(world.a)
        _CACHE.update(world=world, ref=ref, initial=bytes(ref.sessions))
        if native is not None:
            nat = OpenState(native.OpenKeys())
            nat.sessions = bytearray(ref.sessions)
            nat.index, nat.allowed = bytearray(ref.index), bytearray(ref.allowed)
            for slot, kp in enumerate(ref.kps):
                if kp is not None:
                    nat.keys.set(slot, kp.recv_key)
            _CACHE.update(nat=nat, native=native)
    return _CACHE


def parse(data: bytes) -> tuple[list[tuple[bytes, int]], bool, float]:
    """(messages with their segment sizes, USO on, seconds after the sessions were made)."""
    if len(data) < 2:
        return [], False, 0.0
    flags, count = data[0], 1 + data[1] % MAX_MESSAGES
    msgs = []
    at = 2
    for _ in range(count):
        if at + 3 > len(data):
            break
        length, seg = struct.unpack_from("<HB", data, at)
        at += 3
        body = data[at : at + length]
        at += len(body)
        msgs.append((body, seg * 8))
    return msgs, bool(flags & 1), NOW_OFFSETS[(flags >> 1) & 3]


def build(msgs: list[tuple[bytes, int]], flags: int = 0) -> bytes:
    """The input for a batch (the inverse of `parse`, for seeds)."""
    out = bytearray([flags, (len(msgs) - 1) % MAX_MESSAGES])
    for body, seg in msgs:
        out += struct.pack("<HB", len(body), seg // 8) + body
    return bytes(out)


def _run(fn: Any, state: OpenState, data: bytearray, stride: int, msgs: list[tuple[bytes, int]],
         now: float, udp: bool, fwd: bool = False) -> Any:  # fmt: skip
    a = batch_arrays(len(data))
    lengths = [len(m) for m, _ in msgs]
    segs = [s for _, s in msgs]
    res = fn(state.keys, state.sessions, state.index, state.allowed, data, stride, lengths,
             segs, len(msgs), a["dec"], a["out"], a["spans"], a["touched"], a["handshakes"],
             a["counters"], now, udp, fwd)  # fmt: skip
    nw, nt, nh = res
    spans = struct.unpack_from(f"<{2 * nw}I", a["spans"])
    used = spans[-2] + spans[-1] if nw else 0
    rows = bytes(a["touched"][: nt * 40])
    hs = bytes(a["handshakes"][: nh * 12])
    return res, spans, bytes(a["out"][:used]), rows, hs, bytes(a["counters"]), bytes(state.sessions)


def open_batch(data: bytes) -> None:
    """The fuzz target: never raises except OpenFuzzFailure on a disagreement."""
    env = _setup()
    msgs, udp, offset = parse(data)
    if not msgs:
        return
    fwd = bool(data[0] & 8)
    world = env["world"]
    stride = max(len(m) for m, _ in msgs) + 7
    buf = bytearray(b"\xa5" * (stride * len(msgs)))  # stale bytes after each message
    for i, (m, _) in enumerate(msgs):
        buf[i * stride : i * stride + len(m)] = m
    now = world.now + offset
    env["ref"].sessions[:] = env["initial"]
    ref = _run(open_ref.open_batch, env["ref"], buf, stride, msgs, now, udp, fwd)
    if "nat" in env:
        env["nat"].sessions[:] = env["initial"]
        nat = _run(env["native"].open_batch, env["nat"], buf, stride, msgs, now, udp, fwd)
        names = ("result", "spans", "out", "touched", "handshakes", "counters", "sessions")
        for name, x, y in zip(names, nat, ref, strict=True):
            if x != y:
                raise OpenFuzzFailure(f"native and reference differ in {name}")


def corpus_entries() -> dict[str, bytes]:
    """Seeds: genuine transports on both sessions (v4 TCP runs, v6, keepalive), a GRO batch,
    a replay, a handshake-sized message, junk."""
    env = _setup()
    world = env["world"]
    old, new = world.peer_a.previous, world.peer_a.current
    assert old is not None and new is not None

    def seal(kp: Any, counter: int, pkt: bytes) -> bytes:
        padded = pkt + bytes(-len(pkt) % 16)
        nonce = bytes(4) + counter.to_bytes(8, "little")
        body = crypto.AEAD(kp.send_key).encrypt(nonce, padded, None)
        return struct.pack("<IIQ", 4, kp.remote_index, counter) + body

    def tcp4(seq: int, payload: bytes, src: bytes = b"\x0a\x00\x00\x02") -> bytes:
        th = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 0x50, 0x10, 512, 0, 0)
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0,
                          src, b"\x0a\x00\x00\x01")  # fmt: skip
        pseudo = hdr[12:20] + struct.pack("!BBH", 0, 6, 20 + len(payload))
        data = pseudo + th + payload + b"\0" * (len(payload) & 1)
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        th = th[:16] + struct.pack("!H", ~s & 0xFFFF) + th[18:]
        return hdr + th + payload

    run = [seal(new, i, tcp4(1 + 500 * i, bytes(range(250)) * 2)) for i in range(4)]
    v6 = bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + b"\xfd" + bytes(14) + b"\x02" + bytes(16)
    v6 += b"\x9c\x40\x14\x51\x00\x08\x00\x00"
    keepalive = seal(old, 0, b"")
    return {
        "tcp_run": build([(d, 0) for d in run]),
        "gro_run": build([(b"".join(run), len(run[0]) // 8 * 8 if len(run[0]) % 8 == 0 else 0)]),
        "two_sessions": build(
            [(seal(old, 5, tcp4(9, b"x" * 40)), 0), (keepalive, 0), (seal(new, 7, v6), 0)]
        ),  # fmt: skip
        "replayed": build([(run[0], 0), (run[0], 0)]),
        "spoofed": build([(seal(new, 9, tcp4(1, b"y" * 10, b"\x0a\x00\x00\x03")), 0)]),
        "expired": build([(run[1], 0)], flags=6),
        "handshake": build([(bytes([1, 0, 0, 0]) + bytes(144), 0), (bytes(3), 0)]),
        "junk_uso": build([(bytes(range(256)) * 2, 64)], flags=1),
    }
