"""Receiver-index codec: our 32-bit session indices carry the owning worker's id.

The low byte of an index we allocate is the id of the worker that owns the
session; the upper 24 bits are random. On the wire the index is little-endian,
so its low byte is the first byte at the index offset (payload offset 4 for
transport and cookie replies, 8 for responses): a classic BPF program can steer
with one byte load and no byte swapping. Up to 256 workers.
"""

from __future__ import annotations

from collections.abc import Callable

Random24 = Callable[[], int]

WORKER_BITS = 8
MAX_WORKERS = 1 << WORKER_BITS
WORKER_MASK = MAX_WORKERS - 1
SPREAD_INDEX_BIT = 1 << WORKER_BITS  # with spread steering on: set exactly on spread peers'
# indices, whose transport messages the reuseport program steers by counter (io/steering.py)


def make_index(worker_id: int, random24: int) -> int:
    """Compose an index from a worker id and 24 random bits (caller supplies randomness)."""
    if not 0 <= worker_id < MAX_WORKERS:
        raise ValueError(f"worker id {worker_id} out of range")
    return ((random24 & 0xFFFFFF) << WORKER_BITS) | worker_id


def worker_of(index: int) -> int:
    return index & WORKER_MASK


class IndexAllocator:
    """Hands out unique indices for one worker; randomness comes from the caller.

    `random24` is any callable returning a fresh random integer (for example
    `lambda: int.from_bytes(os.urandom(3), "little")`), so tests can be deterministic.
    """

    def __init__(self, worker_id: int, random24: Random24) -> None:
        self.worker_id = worker_id
        self._random24 = random24
        self._used: set[int] = set()
        self.steer_spread = False  # spread steering on: SPREAD_INDEX_BIT set iff spread

    def allocate(self, spread: bool = False) -> int:
        for _ in range(1 << 16):
            idx = make_index(self.worker_id, self._random24())
            if self.steer_spread:
                idx = (idx & ~SPREAD_INDEX_BIT) | (SPREAD_INDEX_BIT if spread else 0)
            if idx not in self._used:
                self._used.add(idx)
                return idx
        raise RuntimeError("receiver index space exhausted")

    def reserve(self, index: int) -> None:
        """Mark an index as used (a restarted worker restoring sessions from shared memory)."""
        self._used.add(index)

    def release(self, index: int) -> None:
        self._used.discard(index)

    def __contains__(self, index: int) -> bool:
        return index in self._used

