"""The spread ledger: each worker's published counter reservation for each spread peer.

Why shared memory: a worker that crashes must be replaced by one that never reuses a send
counter under the same key (proto/spread.py draws them in blocks), and the other workers
read everyone's progress to stay inside the receiver's replay window. One writer per cell,
no lock: the owner writes a peer's base cell, worker w only its own cell.

Layout, per peer slot (indexed like shm/peerslot.py), `1 + workers` cells of 24 bytes:
  cell 0 (owner): u64 tag, u64 base, u64 0 -- session `tag - 1` is spread from `base` on
  cell 1 + w:     u64 tag, u64 end, u64 floor -- worker w may have used its blocks below
                  `end`, and may have accepted every counter below `floor` it received
                  (spread steering: the datagrams of its block class)
A tag is local index + 1 (0: empty). Each word is one aligned 8-byte store (atomic on
x86-64, as shm/peerslot.py's counter words). A new session's tag is cleared, its value
stored, then its tag: a reader that sees the new tag sees its value; a writer that dies
in between leaves no tag (or the old one), and nothing was used under the new session
yet, while the old session is no longer current (sessions never become current twice).
Readers that race a store only misjudge the front, which costs a jump, never a nonce.
"""

from __future__ import annotations

import struct

CELL = 24
_WORD = struct.Struct("<Q")


def area_size(slots: int, workers: int) -> int:
    """Bytes of a ledger for `slots` peer slots and `workers` workers."""
    return slots * (1 + workers) * CELL


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
        return PeerLedger(self, slot * (1 + self.workers) * CELL)

    def clear(self, slot: int) -> None:
        """Forget a freed slot (supervisor, before the slot is given to another peer)."""
        at = slot * (1 + self.workers) * CELL
        self.buf[at : at + (1 + self.workers) * CELL] = bytes((1 + self.workers) * CELL)


class PeerLedger:
    """One peer's cells; implements proto.spread.Ledger."""

    __slots__ = ("buf", "at", "workers")

    def __init__(self, area: SpreadArea, at: int) -> None:
        self.buf = area.buf
        self.at = at
        self.workers = area.workers

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
        _WORD.pack_into(self.buf, at + 16, 0)
        _WORD.pack_into(self.buf, at, tag)

    def base(self, index: int) -> int:
        return self._read(0, index)

    def publish_base(self, index: int, base: int) -> None:
        self._write(0, index, base)

    def reserved(self, worker: int, index: int) -> int:
        return max(self._read(1 + worker, index), 0)

    def publish(self, worker: int, index: int, end: int) -> None:
        self._write(1 + worker, index, end)

    def claim(self, worker: int, index: int) -> memoryview:
        """Worker `worker` follows session `index` from now on: its cell holds that session
        (kept if it already does: a replacement continues), and the returned one-word view
        is its receive floor (Keypair.recv_floor: raised before each accept)."""
        if self._read(1 + worker, index) < 0:
            self._write(1 + worker, index, 0)
        at = self.at + (1 + worker) * CELL + 16
        return memoryview(self.buf)[at : at + 8].cast("Q")

    def recv_floor(self, worker: int, index: int) -> int:
        """Every counter below this may have been accepted by `worker` under `index`."""
        if self._read(1 + worker, index) < 0:
            return 0
        floor: int = _WORD.unpack_from(self.buf, self.at + (1 + worker) * CELL + 16)[0]
        return floor

    def front(self, index: int) -> int:
        best = self._read(0, index)
        for w in range(self.workers):
            end = self._read(1 + w, index)
            if end > best:
                best = end
        return max(best, 0)
