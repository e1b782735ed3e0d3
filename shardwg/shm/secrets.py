"""Secrets the supervisor and its workers share, kept out of the named region.

Why a second mapping: the named POSIX region (shm/region.py) is what `shardwg show`,
/metrics and the UAPI read, and any process allowed to open /dev/shm/shardwg-IF maps
it whole. Workers are forked from the supervisor, so a MAP_SHARED|MAP_ANONYMOUS
mapping made before the first fork is shared by the supervisor, every worker and
every replacement worker, and has no name another process could open. The named
region then holds no secret: session keys and the cookie secret live here.

Map (seqlock slots, 64-aligned): one cookie slot (`CookieSecrets`), then one key
slot per peer slot of the named region's layout (same index). A key slot holds the
keys of up to three sessions, each tagged with its local index: a reader pairs the
keys with the session records of the named region by that index, so a key slot and
a peer record written at different moments never pair wrong keys with a session
(a session whose keys are missing is not restored: a fresh handshake, never a
reused nonce).

Pages are MADV_DONTDUMP (out of core dumps) and the supervisor wipes the mapping on
exit. They are not mlocked: anonymous shared pages can reach swap.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

from shardwg.shm.seqlock import SeqlockSlot, slot_stride

_COOKIE = struct.Struct("<32sd32sd")  # current, born, next, next_born
_KEYS = struct.Struct("<I4x32s32s")  # local index, send key, recv key
SESSIONS = 3  # current, previous, next: the order of peerslot.KEYPAIR_OFFSETS
KEYS_SIZE = SESSIONS * _KEYS.size


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


@dataclass(slots=True)
class CookieSecrets:
    """The shared cookie secret and its successor (CLOCK_MONOTONIC times).

    Every worker switches to `next` at `next_born`, the same instant for all, so a
    cookie one worker gives out is honoured by every other (proto/cookie.py).
    """

    current: bytes
    current_born: float
    next: bytes
    next_born: float


def encode_cookie(s: CookieSecrets) -> bytes:
    if len(s.current) != 32 or len(s.next) != 32:
        raise ValueError("cookie secrets must be 32 bytes")
    return _COOKIE.pack(s.current, s.current_born, s.next, s.next_born)


def decode_cookie(data: bytes | bytearray | memoryview) -> CookieSecrets | None:
    """None if never written (all zero)."""
    v = _COOKIE.unpack_from(data, 0)
    if v[0] == bytes(32) and v[2] == bytes(32):
        return None
    return CookieSecrets(v[0], v[1], v[2], v[3])


def encode_keys(sessions: list[tuple[int, bytes, bytes] | None]) -> bytes:
    """KEYS_SIZE bytes from up to SESSIONS (local index, send key, recv key); None: empty."""
    out = bytearray(KEYS_SIZE)
    for i, s in enumerate(sessions[:SESSIONS]):
        if s is not None:
            if len(s[1]) != 32 or len(s[2]) != 32:
                raise ValueError("session keys must be 32 bytes")
            _KEYS.pack_into(out, i * _KEYS.size, *s)
    return bytes(out)


def decode_keys(data: bytes | bytearray | memoryview) -> dict[int, tuple[bytes, bytes]]:
    """local index -> (send key, recv key) of every session present."""
    found = {}
    for i in range(SESSIONS):
        index, send, recv = _KEYS.unpack_from(data, i * _KEYS.size)
        if send != bytes(32) or recv != bytes(32):
            found[index] = (send, recv)
    return found


class SecretArea:
    """The cookie slot and `peer_capacity` key slots over `buf` (default: a new
    anonymous shared mapping; tests pass a bytearray)."""

    _COOKIE_STRIDE = _align(slot_stride(_COOKIE.size, 64))
    _KEY_STRIDE = _align(slot_stride(KEYS_SIZE, 64))

    @classmethod
    def size_for(cls, peer_capacity: int) -> int:
        return cls._COOKIE_STRIDE + peer_capacity * cls._KEY_STRIDE

    def __init__(self, peer_capacity: int, buf: Any = None) -> None:
        self.peer_capacity = peer_capacity
        self._cookie_stride = self._COOKIE_STRIDE
        self._key_stride = self._KEY_STRIDE
        self.size = self.size_for(peer_capacity)
        if buf is None:
            buf = mmap.mmap(-1, self.size)  # MAP_SHARED | MAP_ANONYMOUS: shared across fork
            if hasattr(mmap, "MADV_DONTDUMP"):
                buf.madvise(mmap.MADV_DONTDUMP)
        if len(buf) < self.size:
            raise ValueError(f"secret area needs {self.size} bytes, buffer has {len(buf)}")
        self.buf = buf

    def cookie_slot(self) -> SeqlockSlot:
        return SeqlockSlot(self.buf, 0, _COOKIE.size)

    def key_slot(self, index: int) -> SeqlockSlot:
        if not 0 <= index < self.peer_capacity:
            raise IndexError(f"key slot {index} outside capacity {self.peer_capacity}")
        return SeqlockSlot(self.buf, self._cookie_stride + index * self._key_stride, KEYS_SIZE)

    def zero_keys(self, index: int) -> None:
        """Forget a peer slot's keys (peer removed, or sessions dropped)."""
        off = self._cookie_stride + index * self._key_stride
        self.buf[off : off + self._key_stride] = bytes(self._key_stride)

    def wipe(self) -> None:
        """Zero everything (on exit, so no key outlives the gateway in swap or memory).

        Sized for 65,536 peers (shm/layout.MAX_PEERS) the area is 16 MiB, mostly never
        written: its pages are punched out (MADV_REMOVE frees them, they read as zeros)
        rather than written, which would first allocate every one of them."""
        if isinstance(self.buf, mmap.mmap) and hasattr(mmap, "MADV_REMOVE"):
            try:
                self.buf.madvise(mmap.MADV_REMOVE, 0, len(self.buf))
                return
            except OSError:
                pass  # not shared memory: write the zeros
        self.buf[: self.size] = bytes(self.size)

    def close(self) -> None:
        if isinstance(self.buf, mmap.mmap) and not self.buf.closed:
            self.buf.close()
