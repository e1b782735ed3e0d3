"""Handoff rings: what one worker passes to another, and what it takes in.

A mixin of `Worker`. Packets routed to a peer another worker owns, and
initiations from such a peer, are pushed onto our ring towards that worker
(counted drop when full); each owner is woken once per turn. Our incoming rings
are drained into the outbound path (packets) and the handshake queue's priority
lane (initiations, already screened by the worker that read them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shardwg.engine.budgets import BATCH
from shardwg.proto.constants import DropReason
from shardwg.shm import counters as C
from shardwg.shm.handoff import HandoffKind, HandoffMesh, unpack_initiation
from shardwg.shm.ring import SpscRing

_DROP_BASE = C.DROP_BASE


class HandoffRings:
    """Our producer ends (by destination) and consumer ends (by source) of the mesh."""

    # From the worker (the packet buffers are OutboundPath's):
    mesh: HandoffMesh | None
    v: list[int]
    _pk_pkt: list[memoryview]
    _pk_sizes: list[int]
    _pk_kinds: list[int]
    _pk_auxs: list[int]

    if TYPE_CHECKING:  # provided by OutboundPath and HandshakeLane

        def send_packets(
            self, views: list[memoryview], sizes: list[int], count: int, now: float, wall: float
        ) -> None: ...

        def _queue_handshake(
            self, msg: bytes | memoryview, addr: Any, screened: bool, now: float
        ) -> None: ...

    def _init_handoffs(self, mesh: HandoffMesh | None, worker_id: int) -> None:
        self._out_rings: list[SpscRing | None]
        self._in_rings: list[SpscRing]
        if mesh is not None:
            self._out_rings = mesh.outgoing(worker_id)
            self._in_rings = mesh.incoming(worker_id)
        else:
            self._out_rings, self._in_rings = [], []
        self._to_wake: set[int] = set()

    def _hand_over(self, owner: int, data: bytes | memoryview, kind: int) -> None:
        ring = self._out_rings[owner] if owner < len(self._out_rings) else None
        if ring is None or not ring.push(data, kind):
            self.v[_DROP_BASE + DropReason.HANDOFF_FULL] += 1
            return
        self.v[C.HANDOFFS_OUT] += 1
        self._to_wake.add(owner)

    def read_handoffs(self, now: float, wall: float) -> int:
        """Drain every incoming ring: packets we own that another worker read."""
        total = 0
        for ring in self._in_rings:
            n = ring.pop_batch(self._pk_pkt, self._pk_sizes, self._pk_kinds, self._pk_auxs,
                               BATCH)  # fmt: skip
            if not n:
                continue
            total += n
            self.v[C.HANDOFFS_IN] += n
            packets = 0
            for i in range(n):
                if self._pk_kinds[i] == HandoffKind.INITIATION:
                    msg, addr = unpack_initiation(self._pk_pkt[i][: self._pk_sizes[i]])
                    self._queue_handshake(msg, addr, True, now)
                else:
                    packets += 1
            if packets == n:
                self.send_packets(self._pk_pkt, self._pk_sizes, n, now, wall)
            elif packets:
                self._send_mixed(n, now, wall)
        return total

    def _send_mixed(self, n: int, now: float, wall: float) -> None:
        """A batch holding both packets and initiations: move packets to the front."""
        j = 0
        for i in range(n):
            if self._pk_kinds[i] != HandoffKind.INITIATION:
                if i != j:
                    size = self._pk_sizes[i]
                    self._pk_pkt[j][:size] = self._pk_pkt[i][:size]
                    self._pk_sizes[j] = size
                j += 1
        self.send_packets(self._pk_pkt, self._pk_sizes, j, now, wall)

    def wake_owners(self) -> None:
        if self._to_wake and self.mesh is not None:
            for dst in self._to_wake:
                self.mesh.wake(dst)
            self._to_wake.clear()
