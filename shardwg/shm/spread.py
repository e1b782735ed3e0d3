"""The spread ledger: each worker's published counter reservation for each spread peer.

Why shared memory: a worker that crashes must be replaced by one that never reuses a send
counter under the same key (proto/spread.py draws them in blocks), and the other workers
read everyone's progress to stay inside the receiver's replay window. One writer per cell,
no lock: the owner writes a peer's base cell, worker w only its own cell.

Layout, per peer slot (indexed like shm/peerslot.py), 16-byte cells of two u64 words:
  base cell:                 tag, base  -- session `tag - 1` is spread from `base` on (owner)
  send cell of worker w:     tag, end   -- w may have used its blocks below `end`
  receive cells of w (3):    tag, floor -- w may have accepted every counter below `floor` it
                             received under that session (spread steering: its block class)
Three receive cells, because a follower opens what the owner's peer holds: the previous
session (datagrams still in flight after a rekey), the current one and the next one (the
remote switched, the owner has not received on it yet: its first datagrams may land on any
worker, and a follower's floor above 0 is what tells the owner to confirm it). A new session
takes a receive cell holding none of the sessions the follower keeps (`claim`'s `keep`).
A tag is local index + 1 (0: empty). Each word is one aligned 8-byte store (atomic on
x86-64, as shm/peerslot.py's counter words). A new session's tag is cleared, its value
stored, then its tag: a reader that sees the new tag sees its value; a writer that dies
in between leaves no tag (or the old one), and nothing was used under the new session
yet, while the old session is no longer kept (sessions never come back).
Readers that race a store only misjudge the front, which costs a jump, never a nonce.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

CELL = 16
RECEIVE_CELLS = 3  # per worker and peer: previous, current, next
_WORD = struct.Struct("<Q")


def _cells(workers: int) -> int:
    """Cells per peer: its base, a send cell and RECEIVE_CELLS receive cells per worker."""
    return 1 + workers * (1 + RECEIVE_CELLS)


def area_size(slots: int, workers: int) -> int:
    """Bytes of a ledger for `slots` peer slots and `workers` workers."""
    return slots * _cells(workers) * CELL


class SpreadArea:
    """The ledger over a writable buffer (a region of the gateway's shared memory)."""

    __slots__ = ("buf", "slots", "workers")

    def __init__(self, buf: bytearray | memoryview, slots: int, workers: int) -> None:
        if len(buf) < area_size(slots, workers):
            raise ValueError("spread ledger buffer too small")
        self.buf = buf
        self.slots = slots
        self.workers = workers

    def peer(self, slot: int) -> PeerLedger:
        """The ledger of one peer slot (proto/spread.py's Ledger)."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"peer slot {slot} out of range")
        return PeerLedger(self, slot * _cells(self.workers) * CELL)

    def clear(self, slot: int) -> None:
        """Forget a freed slot (supervisor, before the slot is given to another peer)."""
        size = _cells(self.workers) * CELL
        self.buf[slot * size : (slot + 1) * size] = bytes(size)


class PeerLedger:
    """One peer's cells; implements proto.spread.Ledger."""

    __slots__ = ("buf", "at", "workers")

    def __init__(self, area: SpreadArea, at: int) -> None:
        self.buf = area.buf
        self.at = at
        self.workers = area.workers

    def _tag(self, cell: int) -> int:
        tag: int = _WORD.unpack_from(self.buf, self.at + cell * CELL)[0]
        return tag

    def _read(self, cell: int, index: int) -> int:
        """The cell's value if it holds session `index`, else -1."""
        at = self.at + cell * CELL
        if _WORD.unpack_from(self.buf, at)[0] != index + 1:
            return -1
        value: int = _WORD.unpack_from(self.buf, at + 8)[0]
        return value

    def _write(self, cell: int, index: int, value: int) -> None:
        at = self.at + cell * CELL
        tag = index + 1
        if _WORD.unpack_from(self.buf, at)[0] == tag:
            _WORD.pack_into(self.buf, at + 8, value)
            return
        _WORD.pack_into(self.buf, at, 0)  # a reader never pairs the old tag with the new value
        _WORD.pack_into(self.buf, at + 8, value)
        _WORD.pack_into(self.buf, at, tag)

    def _receive_cells(self, worker: int) -> range:
        """The cell numbers of `worker`'s receive cells (after every worker's send cell)."""
        first = 1 + self.workers + worker * RECEIVE_CELLS
        return range(first, first + RECEIVE_CELLS)

    def _receive_cell(self, worker: int, index: int) -> int:
        """The receive cell of `worker` holding session `index`, or -1."""
        tag = index + 1
        for cell in self._receive_cells(worker):
            if self._tag(cell) == tag:
                return cell
        return -1

    def base(self, index: int) -> int:
        return self._read(0, index)

    def publish_base(self, index: int, base: int) -> None:
        self._write(0, index, base)

    def reserved(self, worker: int, index: int) -> int:
        return max(self._read(1 + worker, index), 0)

    def publish(self, worker: int, index: int, end: int) -> None:
        self._write(1 + worker, index, end)

    def claim(self, worker: int, index: int, keep: Collection[int] = ()) -> memoryview:
        """Worker `worker` opens session `index` from now on: one of its receive cells holds
        it (kept if one already does: a replacement continues), taken from a session not in
        `keep` (the sessions it still opens), and the returned one-word view is its receive
        floor (Keypair.recv_floor: raised before each accept)."""
        cell = self._receive_cell(worker, index)
        if cell < 0:
            tags = {k + 1 for k in keep}
            free = [c for c in self._receive_cells(worker) if self._tag(c) not in tags]
            if not free:
                raise ValueError(f"more than {RECEIVE_CELLS} sessions kept")
            cell = free[0]
            self._write(cell, index, 0)
        at = self.at + cell * CELL + 8
        return memoryview(self.buf)[at : at + 8].cast("Q")

    def recv_floor(self, worker: int, index: int) -> int:
        """Every counter below this may have been accepted by `worker` under `index`."""
        cell = self._receive_cell(worker, index)
        return 0 if cell < 0 else self._read(cell, index)

    def opened_by(self, worker: int) -> bool:
        """Whether `worker` (or a predecessor of it) took a receive cell for this peer."""
        return any(self._tag(c) for c in self._receive_cells(worker))

    def received(self, index: int, but: int) -> bool:
        """Whether any worker other than `but` accepted a datagram under session `index`
        (the owner confirms a `next` session a follower opened)."""
        return any(self.recv_floor(w, index) > 0 for w in range(self.workers) if w != but)

    def front(self, index: int) -> int:
        best = self._read(0, index)
        for w in range(self.workers):
            end = self._read(1 + w, index)
            if end > best:
                best = end
        return max(best, 0)
