"""Sliding-window replay filter for transport counters (wireguard-go's `replay.Filter`).

A counter is fresh if it is below REJECT_AFTER_MESSAGES, not seen before, and at most
REPLAY_WINDOW (8128) behind the highest counter seen; counter 0 is valid on a new window.

The state is 1032 bytes in a caller's buffer (so the native batch kernel and its Python
reference work on the very same bytes, and a replacement worker can restore it):
  u64 little-endian highest counter, then a ring of 128 little-endian u64 blocks, bit
  (counter & 63) of block ((counter >> 6) & 127) marking the counter as seen.
Seen as one 8192-bit little-endian number, bit i is ring slot i = counter & 8191.
Moving forward clears whole blocks, as wireguard-go does: every block after the old
highest's, up to and including the new highest's. The module functions `check` and
`accept` are the per-packet path over (buffer, offset); `ReplayWindow` wraps one window.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from shardwg.proto.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW

__all__ = ["ReplayWindow", "WINDOW_SIZE", "accept", "check"]

_BLOCKS = 128
_RING_BYTES = _BLOCKS * 8
WINDOW_SIZE = 8 + _RING_BYTES
_LIMIT = REJECT_AFTER_MESSAGES
_WINDOW = REPLAY_WINDOW
_U64 = struct.Struct("<Q")
_ZERO = bytes(_RING_BYTES)

assert _WINDOW == (_BLOCKS - 1) * 64


def check(buf: Any, off: int, counter: int) -> bool:
    """Would `accept` take this counter? Marks nothing: the pre-check before decrypting."""
    last = _U64.unpack_from(buf, off)[0]
    if counter > last:
        return counter < _LIMIT
    if last - counter > _WINDOW or counter < 0:
        return False
    return not (buf[off + 8 + ((counter >> 3) & 1023)] >> (counter & 7)) & 1


def accept(buf: Any, off: int, counter: int) -> bool:
    """Check and mark `counter`; True if fresh. Call only after the packet authenticated."""
    if counter >= _LIMIT or counter < 0:
        return False
    last = _U64.unpack_from(buf, off)[0]
    ring = off + 8
    if counter > last:
        current = last >> 6
        diff = (counter >> 6) - current
        if diff:
            if diff > _BLOCKS:
                diff = _BLOCKS
            start = (current + 1) & (_BLOCKS - 1)
            end = start + diff
            if end <= _BLOCKS:
                buf[ring + start * 8 : ring + end * 8] = _ZERO[: diff * 8]
            else:
                buf[ring + start * 8 : ring + _RING_BYTES] = _ZERO[: (_BLOCKS - start) * 8]
                buf[ring : ring + (end - _BLOCKS) * 8] = _ZERO[: (end - _BLOCKS) * 8]
        _U64.pack_into(buf, off, counter)
    elif last - counter > _WINDOW:
        return False
    i = ring + ((counter >> 3) & 1023)
    bit = 1 << (counter & 7)
    old = buf[i]
    if old & bit:
        return False
    buf[i] = old | bit
    return True


class ReplayWindow:
    """One keypair's filter over `buf[off:off + WINDOW_SIZE]` (its own buffer by default).
    Not thread-safe (one owner per keypair)."""

    __slots__ = ("buf", "off")

    SNAPSHOT_SIZE: ClassVar[int] = WINDOW_SIZE
    """The state itself: u64 highest counter, then one bit per ring slot (bit i = slot i)."""

    def __init__(self, buf: Any = None, off: int = 0) -> None:
        self.buf = bytearray(WINDOW_SIZE) if buf is None else buf
        self.off = off

    def accept(self, counter: int) -> bool:
        return accept(self.buf, self.off, counter)

    def check(self, counter: int) -> bool:
        return check(self.buf, self.off, counter)

    def reset(self) -> None:
        """Back to a fresh window (highest 0, nothing seen)."""
        self.buf[self.off : self.off + WINDOW_SIZE] = bytes(WINDOW_SIZE)

    def move_to(self, buf: Any, off: int) -> None:
        """Carry the state over into buf[off:] and live there from now on."""
        buf[off : off + WINDOW_SIZE] = self.snapshot()
        self.buf, self.off = buf, off

    @property
    def highest(self) -> int:
        """Highest counter accepted so far (0 on a fresh window)."""
        return int(_U64.unpack_from(self.buf, self.off)[0])

    def snapshot(self) -> bytes:
        """A copy of the full state (SNAPSHOT_SIZE bytes)."""
        return bytes(self.buf[self.off : self.off + WINDOW_SIZE])

    @classmethod
    def restore(cls, data: bytes | bytearray | memoryview) -> ReplayWindow:
        """A window with `snapshot()` output as its state; ValueError on a bad snapshot."""
        raw = bytes(data)
        if len(raw) != WINDOW_SIZE:
            raise ValueError(f"replay snapshot must be {WINDOW_SIZE} bytes, got {len(raw)}")
        if _U64.unpack_from(raw, 0)[0] >= _LIMIT:
            raise ValueError("replay snapshot counter is beyond REJECT_AFTER_MESSAGES")
        return cls(bytearray(raw))

    def __repr__(self) -> str:
        return f"ReplayWindow(highest={self.highest})"
