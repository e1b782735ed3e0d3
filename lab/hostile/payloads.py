"""Hostile payloads: pure functions of a seeded `random.Random`: garbage, wrong sizes, bad
mac1, unknown indices, mutations of captured datagrams, valid-mac1 initiations (built with
shardwg.proto; the code under test is the receiver only)."""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterable, Sequence

from shardwg.proto import noise
from shardwg.proto.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
)
from shardwg.proto.cookie import CookieGenerator
from shardwg.proto.tai64n import timestamp

_T = struct.Struct("<I")


def _typed(t: int, size: int, rng: random.Random) -> bytes:
    """A datagram whose header says type t, `size` bytes long, the rest random."""
    if size < 4:
        return bytes([t, 0, 0, 0])[:size]
    return _T.pack(t) + rng.randbytes(size - 4)


def random_garbage(rng: random.Random, n: int) -> list[bytes]:
    """Uniformly random bytes of random lengths 0..300 (a few will look like a type)."""
    return [rng.randbytes(rng.randint(0, 300)) for _ in range(n)]


def wrong_sizes(rng: random.Random) -> list[bytes]:
    """Every message type at sizes that are not its own, runts of 0-3 bytes, and right-size
    messages with non-zero reserved bytes or an unknown type."""
    out: list[bytes] = [b"", b"\x01", b"\x04\x00", b"\x04\x00\x00"]
    exact = {1: INITIATION_SIZE, 2: RESPONSE_SIZE, 3: COOKIE_REPLY_SIZE}
    for t, size in exact.items():
        for s in (4, 5, size - 1, size + 1, size + 16, size * 2, 31, 32):
            if s != size:
                out.append(_typed(t, s, rng))
    for s in (4, 8, 16, TRANSPORT_HEADER_SIZE, TRANSPORT_MIN_SIZE - 1):
        out.append(_typed(4, s, rng))
    for t in (0, 5, 6, 0x7F, 0xFF):  # unknown types at plausible sizes
        for s in (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE, TRANSPORT_MIN_SIZE, 200):
            out.append(_typed(t, s, rng))
    for t, size in (*exact.items(), (4, 64)):  # reserved bytes not zero
        d = bytearray(_typed(t, size, rng))
        d[1 + rng.randrange(3)] = rng.randint(1, 255)
        out.append(bytes(d))
    return out


def bad_mac1_initiations(rng: random.Random, n: int) -> list[bytes]:
    """Right-size initiations full of random bytes: mac1 cannot match."""
    return [_typed(1, INITIATION_SIZE, rng) for _ in range(n)]


def bad_mac1_responses(rng: random.Random, n: int) -> list[bytes]:
    return [_typed(2, RESPONSE_SIZE, rng) for _ in range(n)]


def unknown_index_transports(rng: random.Random, n: int, avoid: Iterable[int] = ()) -> list[bytes]:
    """Transport datagrams (32..200 bytes) to random receiver indices not in `avoid`."""
    skip = set(avoid)
    out: list[bytes] = []
    while len(out) < n:
        index = rng.getrandbits(32)
        if index in skip:
            continue
        body = rng.randbytes(rng.randint(TRANSPORT_MIN_SIZE, 200) - 8)
        out.append(_T.pack(4) + struct.pack("<I", index) + body)
    return out


def unknown_index_cookie_replies(rng: random.Random, n: int) -> list[bytes]:
    return [_typed(3, COOKIE_REPLY_SIZE, rng) for _ in range(n)]


def receiver_index(datagram: bytes) -> int:
    return int(struct.unpack_from("<I", datagram, 4)[0])


def transport_counter(datagram: bytes) -> int:
    return int(struct.unpack_from("<Q", datagram, 8)[0])


def mutate_transports(rng: random.Random, captured: Sequence[bytes]) -> list[bytes]:
    """Variants of real transport datagrams that must all fail: a flipped ciphertext or tag
    bit, a counter moved far ahead (must not advance the replay window), another receiver
    index, truncation below and above the minimum, extra bytes, a zeroed tag."""
    out = []
    for d in captured:
        b = bytearray(d)
        flip = bytearray(d)
        flip[rng.randrange(TRANSPORT_HEADER_SIZE, len(d))] ^= 1 << rng.randrange(8)
        out.append(bytes(flip))
        ahead = bytearray(d)
        struct.pack_into("<Q", ahead, 8, transport_counter(d) + rng.randint(10_000, 1 << 40))
        out.append(bytes(ahead))
        other = bytearray(d)
        struct.pack_into("<I", other, 4, receiver_index(d) ^ (rng.getrandbits(24) << 8 | 1))
        out.append(bytes(other))
        out.append(bytes(b[: rng.randint(4, TRANSPORT_MIN_SIZE - 1)]))
        if len(d) > TRANSPORT_MIN_SIZE + 1:
            out.append(bytes(b[: rng.randint(TRANSPORT_MIN_SIZE, len(d) - 1)]))
        out.append(bytes(b) + rng.randbytes(rng.randint(1, 16)))
        zero_tag = bytearray(d)
        zero_tag[-16:] = bytes(16)
        out.append(bytes(zero_tag))
    return out


def valid_mac1_initiations(
    gateway_public: bytes, n: int, rng: random.Random, static_private: bytes | None = None
) -> list[bytes]:
    """n well-formed initiations to the gateway with a valid mac1 and no mac2, from a static
    key the gateway does not know (random unless given). Each costs the sender two DHs."""
    priv = static_private or bytes(rng.randbytes(32))
    local = noise.LocalIdentity.from_private(priv)
    peer = noise.PeerCrypto.build(local, gateway_public, None)
    gen = CookieGenerator(peer.mac1_key, peer.cookie_key)
    out = []
    now = time.time()
    for i in range(n):
        msg, _state = noise.create_initiation(
            local, peer, rng.getrandbits(32), bytes(rng.randbytes(32)), timestamp(now + i * 0.02)
        )
        gen.add_macs(msg, 0.0)
        out.append(bytes(msg))
    return out
