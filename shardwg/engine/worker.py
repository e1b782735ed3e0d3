"""One worker process: the event loop that drives the sans-IO device for the peers it owns.

The flow below is split by concern: Inbound steps 1-4 in engine/inbound.py, step 5
in engine/handshakes.py, Outbound in engine/outbound.py, the rings between workers
in engine/handoffs.py, the per-turn budgets in engine/budgets.py. Each is a mixin
of `Worker`, so a turn calls its methods directly and the per-packet loops run on
locals, as before the split. This module keeps the loop, sending and counting.

Inbound (UDP -> TUN)
  1. epoll says this worker's UDP socket is readable. The reuseport steering
     program already sent every transport, response and cookie datagram to the
     worker whose id sits in the receiver index's low byte, i.e. its owner.
  2. One `recvmmsg` (libc through ctypes, io/mmsg.py) fills up to RECV_SLOTS
     preallocated 64 KiB buffers; with UDP_GRO each may hold many datagrams of one
     sender. Reads go on until BATCH datagrams or an empty socket.
  3. One `open_batch` call per receive call (shardwg/datapath: the native kernel, or
     its pure-Python reference with SHARDWG_NATIVE=0 or no compiler) classifies each
     datagram by (type, length), finds the session by receiver index, checks and
     updates the replay window, decrypts, checks the inner header, source (allowed
     IPs) and TCP/UDP checksum, and coalesces the batch into TUN super-packets.
  4. Each session the batch touched is settled once: its receive high-water mark
     (recv_floor) is raised in shared memory, then key confirmation, roaming and
     timers; only then are the TUN writes made.
  5. Handshake messages go to a bounded queue, HANDSHAKE_BUDGET per turn, so data
     never starves; its depth drives under-load (cookie) mode as in wireguard-go.
     An initiation from a peer another worker owns (initiations carry no index, so
     the kernel hashes them to any worker) is screened here (mac1, cookies) and
     handed to the owner over a shared-memory ring: only the owner touches a
     peer's timestamp and 20 ms flood state.

Outbound (TUN -> UDP)
  1. epoll says our TUN queue (or our handoff eventfd) is readable; `read_batch`
     fills preallocated buffers (with TUN offloads, reads are up to 64 KiB super-packets).
  2. Cryptokey routing picks the peer per read. A peer another worker owns: the read,
     cut into segments, is pushed onto our single-producer ring towards that worker
     (counted drop when full) and the owner is woken once per batch. Order within a
     flow is kept because a flow's packets always take the same path.
  3. No session yet: staged (segments), and a handshake starts.
  4. Otherwise consecutive reads for the peer go to the batch seal kernel in one call
     (shardwg.datapath: native or its Python reference): cut, padded, numbered up to
     the published counter reservation and sealed into one UDP_SEGMENT run, sent with
     one sendmsg; at the reservation the next block is published, then it goes on.

Ownership and crash safety: one worker owns a peer's sessions, counters, replay
window and timers, and nothing on the packet path takes a lock. Sessions are
published to the peer's seqlocked shared-memory slot when they change, with send
counters reserved in blocks ahead of use and the receive high-water mark raised in
shared memory before each packet is accepted, so a replacement worker resumes them
without a handshake, never reusing a nonce or re-accepting a packet.
Every error on one packet is counted by reason and the rest of the batch goes on.
"""

from __future__ import annotations

import base64
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardwg.datapath.select import Impl
from shardwg.engine import control
from shardwg.engine.budgets import PUBLISH_INTERVAL, TICK_INTERVAL
from shardwg.engine.handoffs import HandoffRings
from shardwg.engine.handshakes import HandshakeLane
from shardwg.engine.inbound import InboundPath
from shardwg.engine.outbound import OutboundPath
from shardwg.io import udp as udp_io
from shardwg.proto.constants import DropReason
from shardwg.proto.device import Device
from shardwg.proto.ownership import RemotePeer
from shardwg.proto.peer import Peer, PeerEvent
from shardwg.shm import counters as C
from shardwg.shm.handoff import HandoffMesh
from shardwg.shm.publisher import SessionPublisher

if TYPE_CHECKING:
    from shardwg.engine.adoption import ShardPlacement

log = logging.getLogger("shardwg.engine.worker")

_DROP_BASE = C.DROP_BASE


class Worker(InboundPath, OutboundPath, HandoffRings, HandshakeLane):
    """Owns a Device, one UDP socket per family, one TUN queue and its handoff rings."""

    def __init__(
        self,
        device: Device,
        tun_fd: int,
        udp4: socket.socket | None,
        udp6: socket.socket | None,
        counters: C.WorkerCounters,
        *,
        worker_id: int = 0,
        mesh: HandoffMesh | None = None,
        publisher: SessionPublisher | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        datapath: Impl | None = None,
    ) -> None:
        self.device = device
        self.tun_fd = tun_fd
        self.udp4 = udp4
        self.udp6 = udp6
        self.counters = counters
        self.v = counters.v  # the hot path increments this list directly
        self.worker_id = worker_id
        self.mesh = mesh
        self.publisher = publisher
        self.clock = clock
        self.wall_clock = wall_clock
        self.running = True
        self.on_tick: Callable[[Worker, float, float], None] | None = None
        # Control messages from the supervisor; returns False to stop the worker.
        self.on_control: Callable[[bytes, float, float], bool] | None = None
        self._control_frames = control.FrameReader()
        self.parent_pid = os.getppid()
        self.placement: ShardPlacement | None = None  # set by boot (engine/adoption.py)
        self._init_handoffs(mesh, worker_id)
        self._init_inbound(udp4, udp6, datapath)
        self._init_outbound()
        self._init_handshakes()

    # ------------------------------------------------------------------ counting
    def drop(self, code: int) -> None:
        """Count a negative `-1 - DropReason` code or a DropReason."""
        self.v[_DROP_BASE + (code if code >= 0 else -1 - code)] += 1

    # ------------------------------------------------------------------ sending
    def send_datagram(self, data: bytes | memoryview, addr: Any) -> None:
        sock = self.udp6 if len(addr) == 4 else self.udp4
        if sock is None or not udp_io.send_to(sock, data, addr):
            self.v[_DROP_BASE + DropReason.SEND_ERROR] += 1
            return
        v = self.v
        v[C.TX_PACKETS] += 1
        v[C.TX_BYTES] += len(data)

    def flush_outbox(self) -> None:
        """Publish, then send: no datagram leaves before the record that covers it (a
        response before the initiation's TAI64N timestamp) is written. A peer whose record
        could not be written loses this turn's datagrams (counted NOT_PUBLISHED)."""
        dev = self.device
        unpublished: set[Peer] = set()
        if dev.events:
            events = dev.events[:]
            dev.events.clear()
            for peer, event in events:
                if not self._on_event(peer, event):
                    unpublished.add(peer)
        if dev.outbox:
            out = dev.outbox[:]
            dev.outbox.clear()
            for peer, data in out:
                if peer in unpublished:
                    self.drop(DropReason.NOT_PUBLISHED)
                elif peer.endpoint is None:
                    self.drop(DropReason.NO_ENDPOINT)
                else:
                    self.send_datagram(data, peer.endpoint)

    def _on_event(self, peer: Peer, event: PeerEvent) -> bool:
        """Count and log an event; False if the record it needed could not be written."""
        v = self.v
        if event == PeerEvent.INITIATION_SENT:
            v[C.HANDSHAKES_SENT] += 1
        elif event == PeerEvent.HANDSHAKE_COMPLETE:
            v[C.HANDSHAKES_COMPLETED] += 1
            self.recent.touch(peer.public_key, peer)  # its endpoint heads the filter's list
            log.info("worker %d: handshake complete with peer %s", self.worker_id, peer_name(peer))
        elif event == PeerEvent.HANDSHAKE_GAVE_UP:
            log.info("worker %d: peer %s: no handshake for 90 s, giving up",
                     self.worker_id, peer_name(peer))  # fmt: skip
        elif event == PeerEvent.STAGED_DROPPED:
            self.drop(DropReason.STAGED_OVERFLOW)
        if self.publisher is not None and event in (
            PeerEvent.SESSION_DERIVED,
            PeerEvent.HANDSHAKE_COMPLETE,
            PeerEvent.KEYS_ZEROED,
        ):
            published = self.publisher.publish(peer)
            if event == PeerEvent.HANDSHAKE_COMPLETE and self.placement is not None:
                # A spread peer's new session is spread now, not on our next tick: until
                # then the other workers hand us all its packets (rings overflowed at a
                # rekey under load: 1,431 handoff_full drops measured in one).
                self.placement.spread_sessions()
            return published
        return True

    # ------------------------------------------------------------------ loop
    def run(self, control_fd: int | None = None) -> None:
        """Serve until `stop()`, the control fd becomes readable, or the parent dies."""
        ep = select.epoll()
        UDP4, UDP6, TUN, HANDOFF, CONTROL = range(5)
        sources: dict[int, int] = {}

        def watch(fd: int, tag: int) -> None:
            ep.register(fd, select.EPOLLIN)
            sources[fd] = tag

        if self.udp4 is not None:
            watch(self.udp4.fileno(), UDP4)
        if self.udp6 is not None:
            watch(self.udp6.fileno(), UDP6)
        watch(self.tun_fd, TUN)
        fds = self.mesh.eventfds if self.mesh is not None else None
        wake_fd = fds[self.worker_id] if fds else None
        if wake_fd is not None:
            watch(wake_fd, HANDOFF)
        if control_fd is not None:
            watch(control_fd, CONTROL)
        next_tick = 0.0
        next_publish = 0.0
        dev = self.device
        counters = self.counters
        try:
            while self.running:
                pending = self.handshake_queue or self.priority_queue
                if pending:
                    timeout = 0.0
                else:
                    t = self.clock()
                    timeout = min(max(0.0, next_tick - t), counters.flush_due(t))
                try:
                    ready = ep.poll(min(timeout, TICK_INTERVAL))
                except InterruptedError:
                    continue
                now = self.clock()
                wall = self.wall_clock()
                for fd, _ev in ready:
                    tag = sources.get(fd)
                    if tag == UDP4 and self.udp4 is not None:
                        self.read_udp(self.udp4, now, wall)
                    elif tag == UDP6 and self.udp6 is not None:
                        self.read_udp(self.udp6, now, wall)
                    elif tag == TUN:
                        self.read_tun(now, wall)
                    elif tag == HANDOFF and self.mesh is not None:
                        self.mesh.clear_wake(self.worker_id)
                        self.read_handoffs(now, wall)
                    elif tag == CONTROL and control_fd is not None:
                        self._read_control(control_fd, now, wall)
                self.process_handshakes(now, wall)
                if now >= next_tick:
                    if self._in_rings:
                        self.read_handoffs(now, wall)  # belt and braces for a missed wake-up
                    dev.tick(now, wall)
                    self.admission_tick(now)
                    next_tick = now + TICK_INTERVAL
                    if self.on_tick is not None:
                        self.on_tick(self, now, wall)
                    if os.getppid() != self.parent_pid:
                        log.error("worker %d: supervisor is gone, exiting", self.worker_id)
                        self.running = False
                if now >= next_publish and self.publisher is not None:
                    self.publisher.publish_dirty()
                    next_publish = now + PUBLISH_INTERVAL
                self.flush_outbox()
                self.wake_owners()
                counters.tick(now)
        finally:
            counters.flush()
            ep.close()

    def _read_control(self, fd: int, now: float, wall: float) -> None:
        """Read the control stream (at most 4 MiB a turn) and apply each whole frame."""
        frames = self._control_frames
        for _ in range(64):
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the supervisor closed our end: stop
                self.running = False
                return
            try:
                payloads = frames.feed(data)
            except control.FrameError as exc:
                log.error("worker %d: control stream broken (%s); exiting", self.worker_id, exc)
                self.running = False
                return
            for payload in payloads:
                if self.on_control is None or not self.on_control(payload, now, wall):
                    self.running = False
                    return

    def stop(self) -> None:
        self.running = False


def peer_name(peer: Peer | RemotePeer) -> str:
    """Public identifier for logs: the start of the public key (never secrets)."""
    return base64.b64encode(peer.public_key).decode()[:8] + "…"
