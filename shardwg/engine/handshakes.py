"""The handshake lane: a bounded queue with a priority lane, and the initiation filter.

A mixin of `Worker` (step 5 of "Inbound" in engine/worker.py). Handshake messages
wait in a bounded queue and a few are processed per turn, fewer when the turn also
carried data, so data never starves; the queue's depth drives under-load (cookie)
mode. Once per tick `admission_tick` estimates the flood of cookie-less
initiations and programs the kernel filter that admits only a share of them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardwg.engine.budgets import (
    ADMIT_BUDGET_SHARE,
    ENDPOINT_REFRESH,
    HANDSHAKE_BUDGET,
    HANDSHAKE_BUDGET_BUSY,
    HANDSHAKE_QUEUE_MAX,
    PRIORITY_QUEUE_MAX,
)
from shardwg.io import initiation_filter
from shardwg.io import udp as udp_io
from shardwg.proto.admission import ZERO_MAC, InitiationAdmission
from shardwg.proto.constants import (
    INITIATION_MAC2_OFFSET,
    INITIATION_SIZE,
    UNDER_LOAD_AFTER_TIME,
    DropReason,
    MessageType,
)
from shardwg.proto.device import Device, ForeignInitiation
from shardwg.shm import counters as C
from shardwg.shm.endpoints import LIST_SIZE, RecentPeers
from shardwg.shm.handoff import HandoffKind, pack_initiation
from shardwg.shm.seqlock import SeqlockSlot

log = logging.getLogger("shardwg.engine.worker")

_FAILED_AFTER_DH = frozenset({DropReason.UNKNOWN_PEER, DropReason.HANDSHAKE_DECRYPT})


class HandshakeLane:
    """Queues handshake messages, processes a budget of them per turn, filters floods."""

    # From the worker:
    device: Device
    udp4: socket.socket | None
    udp6: socket.socket | None
    v: list[int]
    worker_id: int

    if TYPE_CHECKING:  # provided by Worker and HandoffRings

        def drop(self, code: int) -> None: ...

        def send_datagram(self, data: bytes | memoryview, addr: Any) -> None: ...

        def _hand_over(self, owner: int, data: bytes | memoryview, kind: int) -> None: ...

    def _init_handshakes(self) -> None:
        self.handshake_queue: deque[tuple[bytes, Any, bool]] = deque()
        # Under load, initiations with a valid mac2 (the sender answered our cookie, so its
        # address is real) skip the flood waiting in handshake_queue.
        self.priority_queue: deque[tuple[bytes, Any, bool]] = deque()
        self._turn_data = 0  # transport datagrams handled this turn
        # Under a flood, a kernel filter admits only a share of cookie-less initiations.
        self.admission = InitiationAdmission(self.device.intake.cookie_rate * ADMIT_BUDGET_SHARE)
        # Packed source addresses (ip || port) of every peer of the gateway; by default our own
        # peers' (engine/boot.py reads every worker's from the shared peer slots).
        self.known_endpoints: Callable[[], list[bytes]] = self._own_endpoints
        self._filter_endpoints: list[bytes] = []
        self._endpoints_due = 0.0
        self._fit_warned: dict[int, int] = {}  # family -> endpoint count last warned about
        # Our side of the gateway-wide list: our peers' recent endpoints, rewritten into
        # `endpoint_slot` (engine/boot.py sets it) when they change, at most once a second.
        self.recent = RecentPeers()
        self.endpoint_slot: SeqlockSlot | None = None
        self._recent_scratch = bytearray(LIST_SIZE)
        self._recent_due = 0.0
        for sock in (self.udp4, self.udp6):
            if sock is not None:
                try:  # a dead predecessor's filter stays on the socket
                    initiation_filter.set_shift(sock, 0)
                except OSError as e:
                    log.warning("worker %d: cannot clear the initiation filter: %s",
                                self.worker_id, e)  # fmt: skip

    def _queue_handshake(
        self, msg: bytes | memoryview, addr: Any, screened: bool, now: float
    ) -> None:
        """Queue a handshake message (copied out of the receive buffer only if kept).

        The priority lane takes what has proven its source: under load, initiations with a
        valid mac2, and initiations another worker screened and handed to us (their owner).
        """
        intake = self.device.intake
        if (
            not screened
            and msg[0] == MessageType.INITIATION
            and msg[INITIATION_MAC2_OFFSET:INITIATION_SIZE] == ZERO_MAC
        ):
            self.admission.counted += 1
        if len(self.priority_queue) < PRIORITY_QUEUE_MAX and (
            screened
            or (
                msg[0] == MessageType.INITIATION
                and intake.under_load(now)
                and intake.checker.check_mac2(msg, udp_io.sockaddr_bytes(addr), now)
            )
        ):
            self.priority_queue.append((bytes(msg), addr, screened))
        elif len(self.handshake_queue) >= HANDSHAKE_QUEUE_MAX:
            self.drop(DropReason.HANDSHAKE_QUEUE_FULL)
        else:
            self.handshake_queue.append((bytes(msg), addr, screened))

    def process_handshakes(self, now: float, wall: float) -> None:
        queue = self.handshake_queue
        prio = self.priority_queue
        busy = self._turn_data
        self._turn_data = 0
        if not queue and not prio:
            return
        dev = self.device
        dev.intake.note_backlog(len(queue), now)
        budget = HANDSHAKE_BUDGET_BUSY if busy else HANDSHAKE_BUDGET
        count = min(budget, len(queue) + len(prio))
        started = time.process_time()  # CPU, not wall: a preempted turn is not slower work
        try:
            self._handshake_batch(count, now, wall)
        finally:
            dev.intake.note_cost(time.process_time() - started, count)

    def _handshake_batch(self, count: int, now: float, wall: float) -> None:
        queue = self.handshake_queue
        prio = self.priority_queue
        dev = self.device
        for _ in range(count):
            msg, addr, screened = prio.popleft() if prio else queue.popleft()
            self.v[C.HANDSHAKES_RECEIVED] += 1
            try:
                result = dev.receive_handshake(
                    msg, addr, udp_io.sockaddr_bytes(addr), now, wall, screened
                )
            except Exception:
                self.drop(DropReason.INTERNAL_ERROR)
                log.debug("error on handshake message", exc_info=True)
                continue
            if result is None:
                continue
            if isinstance(result, ForeignInitiation):
                self._hand_over(result.owner, pack_initiation(msg, addr), HandoffKind.INITIATION)
            elif isinstance(result, bytes):
                self.drop(DropReason.COOKIE_REQUIRED)
                self.send_datagram(result, addr)
            else:
                if result in _FAILED_AFTER_DH:
                    self.admission.failed += 1
                self.drop(result)

    def _own_endpoints(self) -> list[bytes]:
        return [udp_io.sockaddr_bytes(p.endpoint) for p in self.device.peers.values() if p.endpoint]

    def admission_tick(self, now: float) -> None:
        """Re-estimate the initiation flood, re-program the kernel filter when the share to
        admit or the known peer endpoints change, keep under-load mode on while the flood
        lasts, publish the figures."""
        if self.recent.dirty and now >= self._recent_due and self.endpoint_slot is not None:
            self._recent_due = now + ENDPOINT_REFRESH
            self.recent.publish(self.endpoint_slot, self._recent_scratch, udp_io.sockaddr_bytes)
        adm = self.admission
        intake = self.device.intake
        was = adm.shift
        changed = adm.update(now, intake.under_load(now))
        if not adm.shift:
            self._endpoints_due = 0.0
        elif now >= self._endpoints_due:
            self._endpoints_due = now + ENDPOINT_REFRESH
            try:
                endpoints = self.known_endpoints()
            except Exception:  # a torn slot read: keep the last list
                log.debug("reading known endpoints failed", exc_info=True)
                endpoints = self._filter_endpoints
            if endpoints != self._filter_endpoints:
                self._filter_endpoints = endpoints
                changed = True
        if changed:
            for sock in (self.udp4, self.udp6):
                if sock is None:
                    continue
                try:
                    taken = initiation_filter.set_shift_fitting(
                        sock, adm.shift, self._filter_endpoints
                    )
                except OSError as e:  # the Python path still screens every initiation
                    log.warning("worker %d: cannot set the initiation filter: %s",
                                self.worker_id, e)  # fmt: skip
                    continue
                wanted = len(initiation_filter.endpoints_for(sock, self._filter_endpoints))
                short = adm.shift and taken < min(wanted, initiation_filter.MAX_ENDPOINTS)
                if short and self._fit_warned.get(sock.family) != taken:  # once per size
                    self._fit_warned[sock.family] = taken
                    log.warning("worker %d: the initiation filter holds %d of %d known "
                                "endpoints (raise net.core.optmem_max for more)",
                                self.worker_id, taken, wanted)  # fmt: skip
            if not was or not adm.shift:
                log.info("worker %d: %s (~%.0f cookie-less initiations/s offered)",
                         self.worker_id, f"kernel admits 1/{1 << adm.shift} of them"
                         if adm.shift else "initiation filter off", adm.offered_rate)  # fmt: skip
        if adm.flooded() or adm.failing():
            intake.under_load_until = max(intake.under_load_until, now + UNDER_LOAD_AFTER_TIME)
        v = self.v
        v[C.INITIATIONS_OFFERED] = int(adm.offered_rate)
        v[C.INITIATION_SHIFT] = adm.shift
        v[C.KERNEL_DROPS] = sum(
            initiation_filter.kernel_drops(s) for s in (self.udp4, self.udp6) if s is not None
        )
