"""One worker process: the event loop that drives the sans-IO device for the peers it owns.

Inbound (UDP -> TUN)
  1. epoll says a UDP socket is readable; `recv_batch` fills up to BATCH
     preallocated buffers (`recvfrom_into`), never allocating a buffer per datagram.
  2. Each datagram is classified by (type, length) before any peer state.
  3. Transport: `Device.receive_transport` looks up the session by receiver
     index, checks the replay window, decrypts into a preallocated plaintext
     buffer, checks the inner source against the peer's allowed IPs, and the
     packet is written to this worker's TUN queue.
  4. Handshake messages go to a bounded queue; at most HANDSHAKE_BUDGET are
     processed per turn so data never starves, and the queue depth drives the
     under-load (cookie) mode exactly as wireguard-go's handshake queue does.
  5. Whatever the peers want sent (responses, keepalives, staged packets) is
     drained from the device outbox and sent to each peer's endpoint.

Outbound (TUN -> UDP)
  1. epoll says the TUN queue is readable; `read_batch` fills preallocated buffers.
  2. Cryptokey routing: the destination address selects the peer (longest prefix).
  3. A peer without a session gets the packet staged and a handshake started.
  4. Otherwise the next nonce is taken, the packet padded and sealed straight into
     a preallocated datagram buffer, and sent to the peer's endpoint.

Ordering and ownership: one worker owns a peer's sessions, counters, replay
window and timers; nothing on the packet path takes a lock. Every error on one
packet is counted by reason and the rest of the batch goes on.
"""

from __future__ import annotations

import base64
import logging
import select
import socket
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

from shardwg.io import tun as tun_io
from shardwg.io import udp as udp_io
from shardwg.proto.constants import (
    DROP_REASON_COUNT,
    MAX_DATAGRAM,
    DropReason,
    MessageType,
)
from shardwg.proto.device import Device
from shardwg.proto.messages import classify
from shardwg.proto.peer import Peer, PeerEvent

log = logging.getLogger("shardwg.worker")

BATCH = 64  # datagrams / packets read from one source per turn
HANDSHAKE_BUDGET = 16  # handshake messages processed per turn
HANDSHAKE_QUEUE_MAX = 1024  # bounded backlog; beyond it initiations are dropped and counted
TICK_INTERVAL = 0.05  # timer resolution
PLAIN_HEADROOM = 64  # spare bytes after a TUN packet for padding


class Stats:
    """This worker's counters, plain Python ints (flushed to shared memory by the owner)."""

    __slots__ = (
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "handshakes_in",
        "handshakes_out",
        "handshakes_done",
        "drops",
    )

    def __init__(self) -> None:
        self.rx_packets = 0
        self.rx_bytes = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.handshakes_in = 0
        self.handshakes_out = 0
        self.handshakes_done = 0
        self.drops = array("Q", bytes(8 * DROP_REASON_COUNT))

    def drop(self, code: int) -> None:
        """Count a negative `-1 - DropReason` code or a DropReason."""
        self.drops[code if code >= 0 else -1 - code] += 1

    def drops_by_name(self) -> dict[str, int]:
        return {DropReason(i).name.lower(): n for i, n in enumerate(self.drops) if n}


class Worker:
    """Owns a Device, one UDP socket per family and one TUN queue."""

    def __init__(
        self,
        device: Device,
        tun_fd: int,
        udp4: socket.socket | None,
        udp6: socket.socket | None,
        *,
        worker_id: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.device = device
        self.tun_fd = tun_fd
        self.udp4 = udp4
        self.udp6 = udp6
        self.worker_id = worker_id
        self.clock = clock
        self.wall_clock = wall_clock
        self.stats = Stats()
        self.running = True
        self.handshake_queue: deque[tuple[bytes, Any]] = deque()
        self.on_turn: Callable[[Worker, float], None] | None = None

        # Preallocated buffers: datagrams in, plaintext out, TUN packets in, datagrams out.
        self._rx_bufs = [bytearray(MAX_DATAGRAM) for _ in range(BATCH)]
        self._rx_views = [memoryview(b) for b in self._rx_bufs]
        self._rx_sizes = [0] * BATCH
        self._rx_addrs: list[Any] = [None] * BATCH
        self._plain = bytearray(MAX_DATAGRAM)
        self._plain_view = memoryview(self._plain)
        self._tun_bufs = [bytearray(MAX_DATAGRAM + PLAIN_HEADROOM) for _ in range(BATCH)]
        self._tun_views = [memoryview(b) for b in self._tun_bufs]
        self._tun_sizes = [0] * BATCH
        self._tx = bytearray(MAX_DATAGRAM + PLAIN_HEADROOM)
        self._tx_view = memoryview(self._tx)

    # ------------------------------------------------------------------ sending
    def _sock_for(self, addr: Any) -> socket.socket | None:
        return self.udp6 if len(addr) == 4 else self.udp4

    def send_datagram(self, data: bytes | memoryview, addr: Any) -> None:
        sock = self._sock_for(addr)
        if sock is None or not udp_io.send_to(sock, data, addr):
            self.stats.drop(DropReason.SEND_ERROR)
            return
        self.stats.tx_packets += 1
        self.stats.tx_bytes += len(data)

    def flush_outbox(self) -> None:
        dev = self.device
        if dev.outbox:
            out = dev.outbox[:]
            dev.outbox.clear()
            for peer, data in out:
                if peer.endpoint is None:
                    self.stats.drop(DropReason.NO_ENDPOINT)
                else:
                    self.send_datagram(data, peer.endpoint)
        if dev.events:
            for peer, event in dev.events:
                self._on_event(peer, event)
            dev.events.clear()

    def _on_event(self, peer: Peer, event: PeerEvent) -> None:
        if event == PeerEvent.INITIATION_SENT:
            self.stats.handshakes_out += 1
        elif event == PeerEvent.HANDSHAKE_COMPLETE:
            self.stats.handshakes_done += 1
            log.info("handshake complete with peer %s", _peer_name(peer))
        elif event == PeerEvent.HANDSHAKE_GAVE_UP:
            log.info("peer %s: no handshake after 90 s, giving up", _peer_name(peer))
        elif event == PeerEvent.STAGED_DROPPED:
            self.stats.drop(DropReason.STAGED_OVERFLOW)

    # ------------------------------------------------------------------ inbound
    def read_udp(self, sock: socket.socket, now: float, wall: float) -> int:
        n = udp_io.recv_batch(
            sock, self._rx_bufs, self._rx_views, self._rx_sizes, self._rx_addrs, BATCH
        )
        dev = self.device
        stats = self.stats
        plain = self._plain_view
        tun_fd = self.tun_fd
        for i in range(n):
            size = self._rx_sizes[i]
            view = self._rx_views[i]
            try:
                mtype = classify(view, size)
                if mtype == MessageType.TRANSPORT:
                    stats.rx_packets += 1
                    stats.rx_bytes += size
                    res = dev.receive_transport(view, size, self._rx_addrs[i], plain, now, wall)
                    if res > 0:
                        if not tun_io.write_packet(tun_fd, plain[:res]):
                            stats.drop(DropReason.TUN_WRITE_ERROR)
                    elif res < 0:
                        stats.drop(res)
                elif mtype > 0:
                    stats.rx_packets += 1
                    stats.rx_bytes += size
                    if len(self.handshake_queue) >= HANDSHAKE_QUEUE_MAX:
                        stats.drop(DropReason.RATE_LIMITED)
                    else:
                        self.handshake_queue.append((bytes(view[:size]), self._rx_addrs[i]))
                else:
                    stats.drop(mtype)
            except Exception:  # one bad packet never drops the rest of the batch
                stats.drop(DropReason.INTERNAL_ERROR)
                log.debug("error on inbound datagram", exc_info=True)
        return n

    def process_handshakes(self, now: float, wall: float) -> None:
        queue = self.handshake_queue
        if not queue:
            return
        dev = self.device
        dev.intake.note_backlog(len(queue), now)
        for _ in range(min(HANDSHAKE_BUDGET, len(queue))):
            msg, addr = queue.popleft()
            self.stats.handshakes_in += 1
            try:
                result = dev.receive_handshake(msg, addr, udp_io.sockaddr_bytes(addr), now, wall)
            except Exception:
                self.stats.drop(DropReason.INTERNAL_ERROR)
                log.debug("error on handshake message", exc_info=True)
                continue
            if isinstance(result, bytes):
                self.stats.drop(DropReason.COOKIE_REQUIRED)
                self.send_datagram(result, addr)
            elif result is not None:
                self.stats.drop(result)

    # ------------------------------------------------------------------ outbound
    def read_tun(self, now: float, wall: float) -> int:
        n = tun_io.read_batch(self.tun_fd, self._tun_views, self._tun_sizes, BATCH)
        dev = self.device
        stats = self.stats
        tx = self._tx_view
        for i in range(n):
            size = self._tun_sizes[i]
            view = self._tun_views[i]
            try:
                peer = dev.route(view, size)
                if peer is None:
                    stats.drop(DropReason.NO_ROUTE)
                    continue
                res = dev.send_packet(peer, view, size, tx, now, wall)
                if res > 0:
                    self.send_datagram(tx[:res], peer.endpoint)
                elif res < 0:
                    stats.drop(res)
            except Exception:
                stats.drop(DropReason.INTERNAL_ERROR)
                log.debug("error on outbound packet", exc_info=True)
        return n

    # ------------------------------------------------------------------ loop
    def run(self, control_fd: int | None = None) -> None:
        """Serve until `stop()` or the control fd becomes readable."""
        ep = select.epoll()
        sources: dict[int, str] = {}
        for sock, tag in ((self.udp4, "udp4"), (self.udp6, "udp6")):
            if sock is not None:
                ep.register(sock.fileno(), select.EPOLLIN)
                sources[sock.fileno()] = tag
        ep.register(self.tun_fd, select.EPOLLIN)
        sources[self.tun_fd] = "tun"
        if control_fd is not None:
            ep.register(control_fd, select.EPOLLIN)
            sources[control_fd] = "control"
        next_tick = 0.0
        dev = self.device
        try:
            while self.running:
                timeout = 0.0 if self.handshake_queue else max(0.0, next_tick - self.clock())
                try:
                    ready = ep.poll(min(timeout, TICK_INTERVAL))
                except InterruptedError:
                    continue
                now = self.clock()
                wall = self.wall_clock()
                for fd, _ev in ready:
                    src = sources.get(fd)
                    if src == "udp4" and self.udp4 is not None:
                        self.read_udp(self.udp4, now, wall)
                    elif src == "udp6" and self.udp6 is not None:
                        self.read_udp(self.udp6, now, wall)
                    elif src == "tun":
                        self.read_tun(now, wall)
                    elif src == "control":
                        self.running = False
                self.process_handshakes(now, wall)
                if now >= next_tick:
                    dev.tick(now, wall)
                    next_tick = now + TICK_INTERVAL
                    if self.on_turn is not None:
                        self.on_turn(self, now)
                self.flush_outbox()
        finally:
            ep.close()

    def stop(self) -> None:
        self.running = False


def _peer_name(peer: Peer) -> str:
    """Public identifier for logs: the first bytes of the public key (never secrets)."""
    return base64.b64encode(peer.public_key).decode()[:8] + "…"
