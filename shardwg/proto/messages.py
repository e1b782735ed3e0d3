"""Message layouts and the (type, length) classifier that runs before any peer state.

Layouts are `struct.Struct`s named after the wire (offsets in `constants`).
The type field is one byte plus three zero bytes, so reading it as a
little-endian u32 both extracts the type and rejects non-zero reserved bytes.
"""

from __future__ import annotations

import struct

from shardwg.proto.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
    DropReason,
    MessageType,
)

TYPE = struct.Struct("<I")
# type, sender, ephemeral, encrypted static (32+16), encrypted timestamp (12+16), mac1, mac2
INITIATION = struct.Struct("<II32s48s28s16s16s")
# type, sender, receiver, ephemeral, encrypted nothing (0+16), mac1, mac2
RESPONSE = struct.Struct("<III32s16s16s16s")
# type, receiver, nonce, encrypted cookie (16+16)
COOKIE_REPLY = struct.Struct("<II24s32s")
# type, receiver, counter (then ciphertext)
TRANSPORT_HEADER = struct.Struct("<IIQ")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

assert INITIATION.size == INITIATION_SIZE
assert RESPONSE.size == RESPONSE_SIZE
assert COOKIE_REPLY.size == COOKIE_REPLY_SIZE

_T_INIT = int(MessageType.INITIATION)
_T_RESP = int(MessageType.RESPONSE)
_T_COOKIE = int(MessageType.COOKIE_REPLY)
_T_DATA = int(MessageType.TRANSPORT)


def classify(data: bytes | bytearray | memoryview, length: int | None = None) -> int:
    """Return the MessageType of a datagram, or `-1 - DropReason` if it is malformed.

    Cheap: touches four bytes and the length, no allocation. Transport messages are
    at least a keepalive long; handshake messages have exactly their fixed size.
    """
    n = len(data) if length is None else length
    if n < 4:
        return -1 - DropReason.TOO_SHORT
    t = TYPE.unpack_from(data, 0)[0]
    if t == _T_DATA:
        return t if n >= TRANSPORT_MIN_SIZE else -1 - DropReason.BAD_SIZE
    if t == _T_INIT:
        return t if n == INITIATION_SIZE else -1 - DropReason.BAD_SIZE
    if t == _T_RESP:
        return t if n == RESPONSE_SIZE else -1 - DropReason.BAD_SIZE
    if t == _T_COOKIE:
        return t if n == COOKIE_REPLY_SIZE else -1 - DropReason.BAD_SIZE
    return -1 - DropReason.BAD_TYPE


def drop_reason_of(code: int) -> DropReason:
    """Decode a negative `classify` result."""
    return DropReason(-1 - code)
