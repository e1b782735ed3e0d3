"""Handoff rings: what one worker passes to another, and what it takes in.

A mixin of `Worker`. Packets routed to a peer another worker owns, and
initiations from such a peer, are pushed onto our ring towards that worker
(counted drop when full); each owner is woken once per turn. Our incoming rings
are drained into the outbound path (packets) and the handshake queue's priority
lane (initiations, already screened by the worker that read them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shardwg.engine.budgets import BATCH, PLAIN_HEADROOM
from shardwg.io import tun as tun_io
from shardwg.io.vnet import VNET_HDR_LEN
from shardwg.proto.constants import MAX_DATAGRAM, DropReason
from shardwg.proto.device import Device
from shardwg.shm import counters as C
from shardwg.shm.handoff import (
    ADDR_SIZE,
    HandoffKind,
    HandoffMesh,
    pack_transport,
    unpack_initiation,
    unpack_transport,
)
from shardwg.shm.ring import SpscRing

if TYPE_CHECKING:
    from shardwg.engine.adoption import ShardPlacement

_DROP_BASE = C.DROP_BASE
HELD_MAX = 1024  # packets held for peers about to be adopted
_UNKNOWN_INDEX = -1 - DropReason.UNKNOWN_INDEX
_TUN_PACKET = int(HandoffKind.TUN_PACKET)
DRAIN_ROUNDS = 4  # batches taken from one incoming ring per drain


class HandoffRings:
    """Our producer ends (by destination) and consumer ends (by source) of the mesh."""

    # From the worker (the packet buffers are OutboundPath's):
    mesh: HandoffMesh | None
    v: list[int]
    device: Device
    tun_fd: int
    worker_id: int
    placement: ShardPlacement | None
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
        # Packets for peers the placement table just gave us, while their old owner
        # still holds the slot: replayed once we adopt them (engine/adoption.py).
        self.held: list[tuple[bytes, int]] = []
        self._handed_plain = memoryview(bytearray(VNET_HDR_LEN + MAX_DATAGRAM + PLAIN_HEADROOM))
        self._fwd_scratch = memoryview(bytearray(ADDR_SIZE + MAX_DATAGRAM))
        self._fwd_src: Any = None

    def push_handoff(self, owner: int, data: bytes | memoryview, kind: int) -> bool:
        """One record onto our ring towards `owner` (placement control records)."""
        ring = self._out_rings[owner] if owner < len(self._out_rings) else None
        if ring is None or not ring.push(data, kind):
            return False
        self._to_wake.add(owner)
        return True

    def forward_transport(self, owner: int, msg: memoryview, n: int, src: Any) -> None:
        """Device.forward: a datagram under an index we gave away with its peer. Every
        datagram of a moved peer comes this way until its next handshake: the packed
        source address is cached, and the record is built in a scratch buffer."""
        if not self._forwarding:  # already handed once: never bounce it around
            self.v[_DROP_BASE + DropReason.UNKNOWN_INDEX] += 1
            return
        if src != self._fwd_src:
            self._fwd_src = src
            self._fwd_scratch[:ADDR_SIZE] = pack_transport(b"", src)
        scratch = self._fwd_scratch
        if ADDR_SIZE + n > len(scratch):
            self.v[_DROP_BASE + DropReason.BAD_SIZE] += 1
            return
        scratch[ADDR_SIZE : ADDR_SIZE + n] = msg[:n]
        self._hand_over(owner, scratch[: ADDR_SIZE + n], HandoffKind.TRANSPORT)

    _forwarding = True

    def _hand_over(self, owner: int, data: bytes | memoryview, kind: int) -> None:
        if owner == self.worker_id:  # ours by the table, not adopted yet: hold it
            if len(self.held) < HELD_MAX:
                self.held.append((bytes(data), kind))
            else:
                self.v[_DROP_BASE + DropReason.HANDOFF_FULL] += 1
            return
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
            # A producer pushes up to a batch per turn and wakes us once: after a placement
            # move it forwards every datagram under an old index, so take a few batches.
            for _ in range(DRAIN_ROUNDS):
                n = ring.pop_batch(self._pk_pkt, self._pk_sizes, self._pk_kinds,
                                   self._pk_auxs, BATCH)  # fmt: skip
                if not n:
                    break
                total += n
                self.v[C.HANDOFFS_IN] += n
                if self._pk_kinds[:n].count(_TUN_PACKET) == n:  # the usual case: packets only
                    self.send_packets(self._pk_pkt, self._pk_sizes, n, now, wall)
                else:
                    self._read_mixed(n, now, wall)
                if n < BATCH:
                    break
        return total

    def _read_mixed(self, n: int, now: float, wall: float) -> None:
        """Records in ring order: a RELEASE must take effect before the packets behind it."""
        kinds, views, sizes = self._pk_kinds, self._pk_pkt, self._pk_sizes
        run = 0  # packets at the front of the buffers, not sent yet
        for i in range(n):
            kind = kinds[i]
            if kind == _TUN_PACKET:
                if i != run:
                    views[run][: sizes[i]] = views[i][: sizes[i]]
                    sizes[run] = sizes[i]
                run += 1
                continue
            if run:
                self.send_packets(views, sizes, run, now, wall)
                run = 0
            try:
                self._read_record(kind, views[i][: sizes[i]], now, wall)
            except ValueError:
                self.v[_DROP_BASE + DropReason.INTERNAL_ERROR] += 1
        if run:
            self.send_packets(views, sizes, run, now, wall)

    def _read_record(self, kind: int, payload: memoryview, now: float, wall: float) -> None:
        if kind == HandoffKind.INITIATION:
            msg, addr = unpack_initiation(payload)
            self._queue_handshake(msg, addr, True, now)
        elif kind == HandoffKind.TRANSPORT:
            datagram, src = unpack_transport(payload)
            if self._open_handed(datagram, src, now, wall) == _UNKNOWN_INDEX:
                if self.placement is not None and self.placement.incoming:
                    self._hand_over(self.worker_id, payload, kind)  # before its RELEASE: hold
                    return
                self.v[_DROP_BASE + DropReason.UNKNOWN_INDEX] += 1
        elif kind == HandoffKind.RELEASE and self.placement is not None:
            self.placement.on_release(bytes(payload), now, wall)
            self.replay_held(now, wall)

    def _open_handed(self, msg: memoryview, addr: Any, now: float, wall: float) -> int:
        """A transport datagram its old worker passed on: open it here, write it to our TUN.
        Returns receive_transport's result (an unknown index is left to the caller)."""
        out = self._handed_plain
        self._forwarding = False
        try:
            res = self.device.receive_transport(msg, len(msg), addr, out[VNET_HDR_LEN:], now, wall)
        finally:
            self._forwarding = True
        if res > 0:
            if not tun_io.write_packet(self.tun_fd, out[: VNET_HDR_LEN + res]):
                self.v[_DROP_BASE + DropReason.TUN_WRITE_ERROR] += 1
        elif res < 0 and res != _UNKNOWN_INDEX:
            self.v[_DROP_BASE - 1 - res] += 1
        return res

    def replay_held(self, now: float, wall: float) -> None:
        """After an adoption: what we held goes its way again (still ours-to-be: held again)."""
        if not self.held:
            return
        held, self.held = self.held, []
        for data, kind in held:
            if kind == HandoffKind.TUN_PACKET:
                buf = memoryview(bytearray(len(data) + PLAIN_HEADROOM))
                buf[: len(data)] = data
                self.send_packets([buf], [len(data)], 1, now, wall)
            else:
                try:
                    self._read_record(kind, memoryview(data), now, wall)
                except ValueError:
                    self.v[_DROP_BASE + DropReason.INTERNAL_ERROR] += 1

    def wake_owners(self) -> None:
        if self._to_wake and self.mesh is not None:
            for dst in self._to_wake:
                self.mesh.wake(dst)
            self._to_wake.clear()
