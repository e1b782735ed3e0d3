"""Our receiver indices -> the session or pending handshake they name (one per worker).

Transport datagrams are routed by `sessions[index]` (a Keypair whose `peer` is
the Peer); responses and cookie replies to a handshake in flight by
`pending[index]`. Indices come from an `IndexAllocator`, so each carries the
owning worker's id in its low byte.
"""

from __future__ import annotations

from typing import Any

from shardwg.proto.index import IndexAllocator
from shardwg.proto.keypair import Keypair


class IndexTable:
    __slots__ = ("allocator", "sessions", "pending", "generation")

    def __init__(self, allocator: IndexAllocator) -> None:
        self.allocator = allocator
        self.sessions: dict[int, Keypair] = {}
        self.pending: dict[int, Any] = {}
        # Bumped whenever `sessions` changes: the batch data path re-reads it only then.
        self.generation = 0

    def new_pending(self, peer: Any) -> int:
        """Allocate an index for a handshake we are starting or answering."""
        index = self.allocator.allocate(peer.spread)
        self.pending[index] = peer
        return index

    def bind(self, keypair: Keypair) -> None:
        """The handshake under `keypair.local_index` produced a session."""
        self.pending.pop(keypair.local_index, None)
        self.sessions[keypair.local_index] = keypair
        self.generation += 1

    def restore(self, keypair: Keypair) -> None:
        """Re-register a session rebuilt from shared memory (worker restart)."""
        self.allocator.reserve(keypair.local_index)
        self.sessions[keypair.local_index] = keypair
        self.generation += 1

    def detach(self, index: int) -> None:
        """A session given to another worker (placement move): it leaves the table the
        way a released one does, but its index stays reserved while datagrams carrying
        it are still passed on to the new owner (Device.moved)."""
        self.release(index)
        self.allocator.reserve(index)

    def release(self, index: int) -> None:
        if self.sessions.pop(index, None) is not None:
            self.generation += 1
        self.pending.pop(index, None)
        self.allocator.release(index)
