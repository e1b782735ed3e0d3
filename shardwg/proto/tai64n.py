"""TAI64N timestamps for handshake initiations, rounded like wireguard-go.

A responder accepts an initiation only if its timestamp is newer than the last
one from that peer, so timestamps must compare as plain bytes (big-endian does
that). Nanoseconds are rounded down to a multiple of 2**24 (~16.8 ms) so the
timestamp does not leak precise clock readings.
"""

from __future__ import annotations

import math
import struct

from shardwg.proto.constants import TIMESTAMP_LEN

BASE = 0x400000000000000A
WHITENER_MASK = (1 << 24) - 1
_LAYOUT = struct.Struct(">QI")
ZERO = bytes(TIMESTAMP_LEN)
"""Older than any real timestamp: the 'last accepted' value of a fresh peer."""


def timestamp(unix_time: float) -> bytes:
    """12-byte TAI64N label of `unix_time` (wall-clock seconds since the Unix epoch)."""
    secs = math.floor(unix_time)
    nanos = int((unix_time - secs) * 1e9) & ~WHITENER_MASK
    return _LAYOUT.pack(secs + BASE, nanos)


def to_unix(stamp: bytes) -> float:
    """Inverse of `timestamp` (up to the rounding); for logs and `wg show`-style output."""
    secs: int
    nanos: int
    secs, nanos = _LAYOUT.unpack(stamp)
    return float(secs - BASE) + nanos / 1e9


def is_newer(candidate: bytes, last: bytes) -> bool:
    """True if `candidate` is strictly newer than `last` (byte order is time order)."""
    return candidate > last
