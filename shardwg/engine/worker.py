"""One worker process: the event loop that drives the sans-IO device for the peers it owns.

Inbound (UDP -> TUN)
  1. epoll says this worker's UDP socket is readable. The reuseport steering
     program already sent every transport, response and cookie datagram to the
     worker whose id sits in the receiver index's low byte, i.e. its owner.
  2. One `recvmmsg` (libc through ctypes, io/mmsg.py) fills up to RECV_SLOTS
     preallocated 64 KiB buffers; with UDP_GRO each may hold many datagrams of one
     sender. Reads go on until BATCH datagrams or an empty socket.
  3. Each datagram is classified by (type, length) before any peer state.
  4. Transport: `Device.receive_transport` finds the session by receiver index,
     checks the replay window, decrypts into a preallocated buffer, checks the
     inner source against the peer's allowed IPs. The decrypted packets of the whole
     read go to our TUN queue together, TCP runs of one flow merged (coalesce.py).
  5. Handshake messages go to a bounded queue, HANDSHAKE_BUDGET per turn, so data
     never starves; its depth drives under-load (cookie) mode as in wireguard-go.
     An initiation from a peer another worker owns (initiations carry no index, so
     the kernel hashes them to any worker) is screened here (mac1, cookies) and
     handed to the owner over a shared-memory ring: only the owner touches a
     peer's timestamp and 20 ms flood state.

Outbound (TUN -> UDP)
  1. epoll says our TUN queue (or our handoff eventfd) is readable; `read_batch`
     fills preallocated buffers.
  2. Cryptokey routing picks the peer. A peer another worker owns: the packet is
     pushed onto our single-producer ring towards that worker (counted drop when
     full) and the owner is woken once per batch. Order within a flow is kept
     because a flow's packets always take the same path.
  3. No session yet: staged, and a handshake starts.
  4. Otherwise the next nonce is taken, the packet padded and sealed into a
     preallocated datagram buffer and sent to the peer's endpoint.

Ownership and crash safety: one worker owns a peer's sessions, counters, replay
window and timers, and nothing on the packet path takes a lock. Sessions are
published to the peer's seqlocked shared-memory slot when they change, with send
and receive counters reserved in blocks ahead of use, so a replacement worker
resumes them without a handshake, never reusing a nonce or re-accepting a packet.
Every error on one packet is counted by reason and the rest of the batch goes on.
"""

from __future__ import annotations

import base64
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from shardwg.io import initiation_filter, mmsg, segment, udpgso
from shardwg.io import tun as tun_io
from shardwg.io import udp as udp_io
from shardwg.io.coalesce import Coalescer
from shardwg.io.vnet import VNET_HDR_LEN
from shardwg.proto.admission import ZERO_MAC, InitiationAdmission
from shardwg.proto.constants import (
    INITIATION_MAC2_OFFSET,
    INITIATION_SIZE,
    MAX_DATAGRAM,
    UNDER_LOAD_AFTER_TIME,
    DropReason,
    MessageType,
)
from shardwg.proto.device import Device, ForeignInitiation
from shardwg.proto.messages import classify
from shardwg.proto.ownership import RemotePeer
from shardwg.proto.peer import Peer, PeerEvent
from shardwg.shm import counters as C
from shardwg.shm.handoff import HandoffKind, HandoffMesh, pack_initiation, unpack_initiation
from shardwg.shm.publisher import SessionPublisher

log = logging.getLogger("shardwg.engine.worker")

BATCH = 64  # packets read from one source per turn (and decrypted per coalesced TUN write)
MAX_RECVS = 64  # receive calls per socket per turn (GRO: each may hold many datagrams)
RECV_SLOTS = 16  # receives per recvmmsg call (16 x 64 KiB of preallocated buffers)
HANDSHAKE_BUDGET = 16  # handshake messages processed per turn...
HANDSHAKE_BUDGET_BUSY = 4  # ...or this many when the turn also carried transport data
HANDSHAKE_QUEUE_MAX = 4096  # bounded backlog; beyond it handshake messages are dropped
PRIORITY_QUEUE_MAX = 64
TICK_INTERVAL = 0.05  # timer resolution
PUBLISH_INTERVAL = 1.0  # traffic counters and endpoints republished at most this often
PLAIN_HEADROOM = 64  # spare bytes after a packet for padding
# Of the cookie-reply budget, what the kernel's random share of cookie-less initiations may
# use (admitted: between half and all of it). The rest is headroom for known peers, whose
# initiations always pass. A quarter, not a half: each admitted datagram costs a wake-up, a
# read and a cookie reply (~80 us of a worker all told), and at 40k/s a half cost the
# honest peer ~10 % more of its throughput in tests/test_flood.py.
ADMIT_BUDGET_SHARE = 0.25
ENDPOINT_REFRESH = 1.0  # seconds between re-reads of known peer endpoints while filtering

_DROP_BASE = C.DROP_BASE
_FAILED_AFTER_DH = frozenset({DropReason.UNKNOWN_PEER, DropReason.HANDSHAKE_DECRYPT})


class Worker:
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
        self.handshake_queue: deque[tuple[bytes, Any, bool]] = deque()
        # Under load, initiations with a valid mac2 (the sender answered our cookie, so its
        # address is real) skip the flood waiting in handshake_queue.
        self.priority_queue: deque[tuple[bytes, Any, bool]] = deque()
        self._turn_data = 0  # transport datagrams handled this turn
        self.on_tick: Callable[[Worker, float, float], None] | None = None
        # Control messages from the supervisor; returns False to stop the worker.
        self.on_control: Callable[[bytes, float, float], bool] | None = None
        self.parent_pid = os.getppid()

        if mesh is not None:
            self._out_rings = mesh.outgoing(worker_id)
            self._in_rings = mesh.incoming(worker_id)
        else:
            self._out_rings, self._in_rings = [], []
        self._to_wake: set[int] = set()

        # Preallocated buffers. The TUN carries a 10-byte virtio_net_hdr before every packet
        # (IFF_VNET_HDR): packet buffers keep that slot in front, and `*_pkt` views start
        # right after it, where the IP packet is.
        self._gro_view = memoryview(bytearray(udpgso.GRO_BUFFER))
        # recvmmsg where libc has it: one system call for up to RECV_SLOTS receives
        self._batch_rx = mmsg.BatchReceiver(RECV_SLOTS) if mmsg.available() else None
        self._dec_k = 0  # decrypted packets waiting in the dec buffers for a TUN write
        self._dec_bufs = [memoryview(bytearray(MAX_DATAGRAM + VNET_HDR_LEN)) for _ in range(BATCH)]
        self._dec_pkt = [b[VNET_HDR_LEN:] for b in self._dec_bufs]
        self._dec_sizes = [0] * BATCH
        self._pk_bufs = [
            memoryview(bytearray(VNET_HDR_LEN + MAX_DATAGRAM + PLAIN_HEADROOM))
            for _ in range(BATCH)
        ]
        self._pk_pkt = [b[VNET_HDR_LEN:] for b in self._pk_bufs]
        self._pk_sizes = [0] * BATCH
        self._pk_kinds = [0] * BATCH
        self._pk_auxs = [0] * BATCH
        self._seg_pkt = [memoryview(bytearray(2048)) for _ in range(BATCH)]
        self._seg_sizes = [0] * BATCH
        self.gso = udpgso.GsoBatcher()
        self.coalescer = Coalescer(udp=False, verify=False)
        # Under a flood, a kernel filter admits only a share of cookie-less initiations.
        self.admission = InitiationAdmission(device.intake.cookie_rate * ADMIT_BUDGET_SHARE)
        # Packed source addresses (ip || port) of every peer of the gateway; by default our own
        # peers' (worker_boot reads every worker's from the shared peer slots).
        self.known_endpoints: Callable[[], list[bytes]] = self._own_endpoints
        self._filter_endpoints: list[bytes] = []
        self._endpoints_due = 0.0
        self._fit_warned: dict[int, int] = {}  # family -> endpoint count last warned about
        for sock in (udp4, udp6):
            if sock is not None:
                udpgso.enable_gro(sock)
                try:  # a dead predecessor's filter stays on the socket
                    initiation_filter.set_shift(sock, 0)
                except OSError as e:
                    log.warning("worker %d: cannot clear the initiation filter: %s", worker_id, e)

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
        dev = self.device
        if dev.outbox:
            out = dev.outbox[:]
            dev.outbox.clear()
            for peer, data in out:
                if peer.endpoint is None:
                    self.drop(DropReason.NO_ENDPOINT)
                else:
                    self.send_datagram(data, peer.endpoint)
        if dev.events:
            events = dev.events[:]
            dev.events.clear()
            for peer, event in events:
                self._on_event(peer, event)

    def _on_event(self, peer: Peer, event: PeerEvent) -> None:
        v = self.v
        if event == PeerEvent.INITIATION_SENT:
            v[C.HANDSHAKES_SENT] += 1
        elif event == PeerEvent.HANDSHAKE_COMPLETE:
            v[C.HANDSHAKES_COMPLETED] += 1
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
            self.publisher.publish(peer)

    # ------------------------------------------------------------------ inbound
    def read_udp(self, sock: socket.socket, now: float, wall: float) -> int:
        """Read until BATCH datagrams (not receives: a flood from many sources gets one
        datagram per receive, and the handshake backlog must be able to build up to
        engage under-load mode) or the socket is empty. Decrypted packets of the whole
        read are coalesced into as few TUN writes as their flows allow."""
        total = 0
        rx = self._batch_rx
        if rx is not None:  # recvmmsg: up to rx.slots receives per system call
            for _ in range(MAX_RECVS):
                got = rx.recv(sock)
                for i in range(got):
                    n = rx.lengths[i]
                    if n > 0:
                        total += self._datagrams(rx.views[i], n, rx.segs[i], rx.addrs[i],
                                                 now, wall)  # fmt: skip
                    elif n == 0:
                        total += self._empty_datagram()
                if got < rx.slots or total >= BATCH:
                    break
        else:
            for _ in range(MAX_RECVS):
                res = udpgso.recv_gro(sock, self._gro_view)
                if res is None:
                    break
                n, seg, addr = res
                if n == 0:
                    total += self._empty_datagram()
                else:
                    total += self._datagrams(self._gro_view, n, seg, addr, now, wall)
                if total >= BATCH:
                    break
        if self._dec_k:
            self._write_tun(self._dec_k)
            self._dec_k = 0
        return total

    def _empty_datagram(self) -> int:
        """Counted like any other datagram, dropped as too short."""
        self.v[C.RX_PACKETS] += 1
        self.v[_DROP_BASE + DropReason.TOO_SHORT] += 1
        return 1

    def _datagrams(
        self, buf: memoryview, n: int, seg: int, addr: Any, now: float, wall: float
    ) -> int:
        """Classify and open the datagrams in buf[:n] (seg bytes each, the last may be
        shorter); decrypted packets collect in the dec buffers (the caller writes them)."""
        dev = self.device
        v = self.v
        dec, dec_sizes = self._dec_pkt, self._dec_sizes
        k = self._dec_k
        off = 0
        count = 0
        while off < n:
            size = seg if off + seg <= n else n - off
            view = buf[off : off + size]
            off += size
            count += 1
            v[C.RX_PACKETS] += 1
            v[C.RX_BYTES] += size
            try:
                mtype = classify(view, size)
                if mtype == MessageType.TRANSPORT:
                    self._turn_data += 1
                    res = dev.receive_transport(view, size, addr, dec[k], now, wall)
                    if res > 0:
                        dec_sizes[k] = res
                        k += 1
                        if k == BATCH:
                            self._write_tun(k)
                            k = 0
                    elif res < 0:
                        v[_DROP_BASE - 1 - res] += 1
                elif mtype > 0:
                    self._queue_handshake(view, addr, False, now)
                else:
                    v[_DROP_BASE - 1 - mtype] += 1
            except Exception:  # one bad packet never drops the rest of the batch
                v[_DROP_BASE + DropReason.INTERNAL_ERROR] += 1
                log.debug("error on inbound datagram", exc_info=True)
        self._dec_k = k
        return count

    def _write_tun(self, k: int) -> None:
        """Write k decrypted packets, TCP runs of one flow merged into super-packets."""
        tun_fd = self.tun_fd
        for view, length in self.coalescer.coalesce(self._dec_bufs, self._dec_sizes, k):
            if not tun_io.write_packet(tun_fd, view[:length]):
                self.v[_DROP_BASE + DropReason.TUN_WRITE_ERROR] += 1

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
        for _ in range(min(budget, len(queue) + len(prio))):
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

    # ------------------------------------------------------------------ outbound
    def _hand_over(self, owner: int, data: bytes | memoryview, kind: int) -> None:
        ring = self._out_rings[owner] if owner < len(self._out_rings) else None
        if ring is None or not ring.push(data, kind):
            self.v[_DROP_BASE + DropReason.HANDOFF_FULL] += 1
            return
        self.v[C.HANDOFFS_OUT] += 1
        self._to_wake.add(owner)

    def send_packets(
        self, views: list[memoryview], sizes: list[int], count: int, now: float, wall: float
    ) -> None:
        """Route and seal views[i][:sizes[i]] for i < count (from the TUN or a ring).

        Sealed datagrams go into the GSO batcher: each run to one endpoint leaves in one
        sendmsg. Every view needs PLAIN_HEADROOM bytes after the packet for padding.
        """
        dev = self.device
        v = self.v
        gso = self.gso
        udp4, udp6 = self.udp4, self.udp6
        for i in range(count):
            size = sizes[i]
            view = views[i]
            try:
                peer = dev.route(view, size)
                if peer is None:
                    v[_DROP_BASE + DropReason.NO_ROUTE] += 1
                elif type(peer) is RemotePeer:
                    self._hand_over(peer.owner, view[:size], HandoffKind.TUN_PACKET)
                else:
                    assert isinstance(peer, Peer)
                    res = dev.send_packet(peer, view, size, gso.room(size + 64), now, wall)
                    if res > 0:
                        ep = peer.endpoint
                        sock = udp6 if len(ep) == 4 else udp4
                        if sock is None:
                            v[_DROP_BASE + DropReason.SEND_ERROR] += 1
                            continue
                        v[C.TX_PACKETS] += 1
                        v[C.TX_BYTES] += res
                        refused = gso.add(sock, res, ep)
                        if refused:
                            v[_DROP_BASE + DropReason.SEND_ERROR] += refused
                    elif res < 0:
                        v[_DROP_BASE - 1 - res] += 1
            except Exception:
                v[_DROP_BASE + DropReason.INTERNAL_ERROR] += 1
                log.debug("error on outbound packet", exc_info=True)
        refused = gso.flush()
        if refused:
            v[_DROP_BASE + DropReason.SEND_ERROR] += refused

    def read_tun(self, now: float, wall: float) -> int:
        n = tun_io.read_batch(self.tun_fd, self._pk_bufs, self._pk_sizes, BATCH)
        if not n:
            return 0
        bufs, sizes = self._pk_bufs, self._pk_sizes
        plain = True
        for i in range(n):
            buf = bufs[i]
            if buf[0] or buf[1]:  # NEEDS_CSUM or a GSO type: not a plain packet
                plain = False
            sizes[i] -= VNET_HDR_LEN
        if plain:
            self.send_packets(self._pk_pkt, sizes, n, now, wall)
        else:
            self._send_offloaded(n, now, wall)
        return n

    def _send_offloaded(self, n: int, now: float, wall: float) -> None:
        """Rare with offloads off: finish checksums / split super-packets, then send."""
        segs, seg_sizes = self._seg_pkt, self._seg_sizes
        for i in range(n):
            got = segment.split(self._pk_bufs[i], self._pk_sizes[i] + VNET_HDR_LEN, segs,
                                seg_sizes)  # fmt: skip
            if got > 0:
                self.send_packets(segs, seg_sizes, got, now, wall)
            else:
                self.drop(got if got < 0 else DropReason.BAD_INNER_PACKET)

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
                timeout = 0.0 if pending else max(0.0, next_tick - self.clock())
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
            if self.on_control is None or not self.on_control(data, now, wall):
                self.running = False
                return

    def stop(self) -> None:
        self.running = False


def peer_name(peer: Peer | RemotePeer) -> str:
    """Public identifier for logs: the start of the public key (never secrets)."""
    return base64.b64encode(peer.public_key).decode()[:8] + "…"
