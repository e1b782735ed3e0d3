"""Sliding-window replay filter for transport counters (RFC 6479 semantics).

Accepts exactly what wireguard-go's `replay.Filter` accepts: a counter is fresh
if it is below REJECT_AFTER_MESSAGES, not seen before, and at most REPLAY_WINDOW
(8128) behind the highest counter seen; counter 0 is valid on a new window.

Design (measured, see tests/test_replay.py and the commit message): wireguard-go
keeps a ring of 64-bit words, but in CPython the bit twiddling and the big-int
words cost more than they save. Here the ring is a `bytearray` with one byte per
counter slot (8192 slots, indexed by `counter & 8191`): the in-order path is one
compare and one byte store, and a forward jump clears the skipped slots with a
single slice assignment (a memset). The ring holds only counters in
(highest - 8192, highest], so any counter inside the window owns its slot.
Snapshots pack the ring into bits (1032 bytes) for shared memory.
"""

from __future__ import annotations

from typing import ClassVar

from shardwg.proto.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW

__all__ = ["ReplayWindow"]

_RING = 8192  # slots; must be a power of two and > REPLAY_WINDOW
_MASK = _RING - 1
_ZERO_RING = bytes(_RING)
_ZERO_VIEW = memoryview(_ZERO_RING)  # slicing a view copies nothing
_LIMIT = REJECT_AFTER_MESSAGES
_WINDOW = REPLAY_WINDOW
_TO_DIGITS = bytes.maketrans(b"\x00\x01", b"01")
_FROM_DIGITS = bytes.maketrans(b"01", b"\x00\x01")
_RING_BYTES = _RING // 8

assert _RING > _WINDOW and _RING & _MASK == 0


class ReplayWindow:
    """Per-keypair receive-counter filter. Not thread-safe (one owner per keypair)."""

    __slots__ = ("_last", "_ring")

    SNAPSHOT_SIZE: ClassVar[int] = 8 + _RING_BYTES
    """u64 little-endian highest counter, then one bit per ring slot (bit i = slot i)."""

    def __init__(self) -> None:
        self._last = 0
        self._ring = bytearray(_RING)

    def accept(self, counter: int) -> bool:
        """Check and mark `counter`; True if fresh. Call only after the packet authenticated."""
        last = self._last
        if counter > last:
            if counter >= _LIMIT:
                return False
            gap = counter - last
            ring = self._ring
            if gap > 1:
                # Forget the slots the window skips over, as wireguard-go zeroes whole words.
                if gap >= _RING:
                    ring[:] = _ZERO_RING
                else:
                    start = (last + 1) & _MASK
                    end = counter & _MASK
                    if start < end:
                        ring[start:end] = _ZERO_VIEW[: end - start]
                    else:
                        ring[start:] = _ZERO_VIEW[start:]
                        ring[:end] = _ZERO_VIEW[:end]
            ring[counter & _MASK] = 1
            self._last = counter
            return True
        if last - counter > _WINDOW or counter < 0:
            return False
        ring = self._ring
        slot = counter & _MASK
        if ring[slot]:
            return False
        ring[slot] = 1
        return True

    def check(self, counter: int) -> bool:
        """Would `accept` take this counter? Marks nothing; a cheap pre-check before decrypting."""
        last = self._last
        if counter > last:
            return counter < _LIMIT
        if last - counter > _WINDOW or counter < 0:
            return False
        return not self._ring[counter & _MASK]

    def reset(self) -> None:
        """Back to a fresh window (highest 0, nothing seen)."""
        self._last = 0
        self._ring[:] = _ZERO_RING

    @property
    def highest(self) -> int:
        """Highest counter accepted so far (0 on a fresh window)."""
        return self._last

    def snapshot(self) -> bytes:
        """Full state in SNAPSHOT_SIZE bytes (about 25 us; not for the per-packet path)."""
        digits = bytes(self._ring).translate(_TO_DIGITS)[::-1]
        bits = int(digits, 2).to_bytes(_RING_BYTES, "little")
        return self._last.to_bytes(8, "little") + bits

    @classmethod
    def restore(cls, data: bytes | bytearray | memoryview) -> ReplayWindow:
        """Rebuild a window from `snapshot()` output; ValueError on a wrong size."""
        raw = bytes(data)
        if len(raw) != cls.SNAPSHOT_SIZE:
            raise ValueError(f"replay snapshot must be {cls.SNAPSHOT_SIZE} bytes, got {len(raw)}")
        last = int.from_bytes(raw[:8], "little")
        if last >= _LIMIT:
            raise ValueError("replay snapshot counter is beyond REJECT_AFTER_MESSAGES")
        bits = int.from_bytes(raw[8:], "little")
        window = cls()
        window._last = last
        window._ring[:] = format(bits, f"0{_RING}b")[::-1].encode().translate(_FROM_DIGITS)
        return window

    def __repr__(self) -> str:
        return f"ReplayWindow(highest={self._last})"
