"""Send counters for one peer spread over several workers: disjoint blocks, all in window.

Why: a site-to-site gateway often has a single peer, and one owner per peer caps it at one
core. When every worker that reads the peer's packets seals them itself, the workers must
never use one counter twice under a key, and must stay within the receiver's replay window
(REPLAY_WINDOW behind its highest counter seen), all without an atomic on the hot path.

The rule (ENGINE-NOTES "One peer over several workers"): counters come in blocks of
`block`; worker w of N uses only blocks b with b mod N == w (counter = b * block + i), so
no two workers ever share a counter. Each block is published in the ledger (shared memory,
per worker and per session) before its first counter is used, so a replacement worker
starts past it after a crash. A worker that lags (its next counter more than `JUMP_AT`
behind the front, the highest block end any worker published) abandons its block and
jumps past the front; skipping counters is allowed, reusing one never is.

A session becomes spread when its owner publishes a base (the end of its own sequential
reservation): every spread block starts at or above it, and the owner, too, draws blocks
from then on for that session (never sequential again, or it could walk into another
worker's block). Other workers seal under a session only once its base is published.

Receive side: with the same `block` at both ends, `receiver_worker(counter)` maps all of a
sender worker's blocks to one receiver worker, so a flow stays on one worker end to end.
"""

from __future__ import annotations

from typing import Protocol

from shardwg.proto.constants import REPLAY_WINDOW
from shardwg.proto.keypair import NO_RESERVATION, Keypair

SPREAD_SHIFT = 10
SPREAD_BLOCK = 1 << SPREAD_SHIFT  # counters per block: one ledger store each, and the
# steering grain (io/steering.py reads counter >> SPREAD_SHIFT)
JUMP_AT = REPLAY_WINDOW // 2  # a worker this far behind the front jumps; half the window is
# the slack for the others' sends between two checks (one check per GSO run, <= 64
# datagrams: see keep_up)


class Ledger(Protocol):
    """Published spread state of one peer (shm/spread.py in a gateway; a dict in tests)."""

    def base(self, index: int) -> int:
        """The owner-published first spread counter of session `index`, or -1 if not spread."""
        ...

    def reserved(self, worker: int, index: int) -> int:
        """End of the last block `worker` published under session `index` (0 if none)."""
        ...

    def publish_base(self, index: int, base: int) -> None:
        """Owner only, once per session: spread `index` from counter `base` on."""
        ...

    def publish(self, worker: int, index: int, end: int) -> None:
        """Record that `worker` may use counters below `end` under `index` (before use)."""
        ...

    def front(self, index: int) -> int:
        """The highest block end any worker published under `index` (or the base)."""
        ...

    def received(self, index: int, but: int) -> bool:
        """Whether a worker other than `but` accepted a datagram under session `index`."""
        ...


def block_start(worker: int, workers: int, at_least: int, block: int = SPREAD_BLOCK) -> int:
    """First counter of the first block of `worker`'s class that starts at or above `at_least`."""
    b = -(-at_least // block)
    b += (worker - b) % workers
    return b * block


def receiver_worker(counter: int, workers: int, block: int = SPREAD_BLOCK) -> int:
    """The worker that receives `counter` of a spread peer (the reuseport program's rule)."""
    return (counter // block) % workers


class SpreadBlocks:
    """One worker's counter blocks for one spread peer (every session of it).

    Hooked into `Keypair.blocks`: `keypair.reserve_send` calls `reserve` when the session's
    block runs out; the worker calls `keep_up` before sealing each run (<= 64 datagrams).
    """

    __slots__ = ("worker", "workers", "block", "ledger")

    def __init__(self, worker: int, workers: int, ledger: Ledger, block: int = SPREAD_BLOCK):
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} out of range for {workers} workers")
        self.worker = worker
        self.workers = workers
        self.block = block
        self.ledger = ledger

    def begin(self, kp: Keypair) -> None:
        """Owner: make `kp` spread from the end of its sequential reservation (once)."""
        ledger = self.ledger
        if ledger.base(kp.local_index) < 0:
            # Every counter below the sequential reservation may have been used.
            reserved = kp.send_reserved if kp.send_reserved != NO_RESERVATION else 0
            ledger.publish_base(kp.local_index, max(reserved, kp.send_counter))
        self.follow(kp)

    def follow(self, kp: Keypair) -> bool:
        """Seal `kp` through blocks from now on; False if its owner has not spread it yet."""
        if self.ledger.base(kp.local_index) < 0:
            return False
        kp.blocks = self
        kp.send_reserved = kp.send_counter  # the next seal reserves a block of ours
        return True

    def reserve(self, kp: Keypair) -> int:
        """Publish the next block of ours for `kp`, move its counter to the block's start
        and return the block's end (the new limit, as `keypair.reserve_send` does)."""
        ledger = self.ledger
        index = kp.local_index
        floor = max(kp.send_counter, ledger.reserved(self.worker, index), ledger.base(index))
        front = ledger.front(index)
        if floor + JUMP_AT < front:
            floor = front
        start = block_start(self.worker, self.workers, floor, self.block)
        end = start + self.block
        ledger.publish(self.worker, index, end)
        kp.send_counter = start
        kp.send_reserved = end
        return end

    def keep_up(self, kp: Keypair) -> None:
        """Before each run: if `kp`'s counter fell too far behind the front, drop the block.
        Per run, not per batch: one batch of TSO reads spans thousands of counters, and a
        check at its start let the receiver see its tail older than the window."""
        if kp.send_counter + JUMP_AT < self.ledger.front(kp.local_index):
            kp.send_reserved = kp.send_counter
