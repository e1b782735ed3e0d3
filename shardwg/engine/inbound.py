"""Inbound, UDP -> TUN: read a batch of datagrams, open transport, queue handshakes.

A mixin of `Worker` (steps 1-4 of "Inbound" in engine/worker.py): it owns the
receive and decrypt buffers; the turn calls `read_udp` once per readable socket,
and the per-datagram loop keeps its state in locals.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from shardwg.engine.budgets import BATCH, MAX_RECVS, RECV_SLOTS
from shardwg.io import mmsg, udpgso
from shardwg.io import tun as tun_io
from shardwg.io.coalesce import Coalescer
from shardwg.io.vnet import VNET_HDR_LEN
from shardwg.proto.constants import INITIATION_SIZE, MAX_DATAGRAM, DropReason, MessageType
from shardwg.proto.device import Device
from shardwg.proto.messages import classify
from shardwg.shm import counters as C

log = logging.getLogger("shardwg.engine.worker")

_DROP_BASE = C.DROP_BASE


class InboundPath:
    """Datagrams in, decrypted packets out to the TUN queue in coalesced writes."""

    # From the worker:
    device: Device
    tun_fd: int
    v: list[int]
    _turn_data: int  # transport datagrams this turn (sizes the handshake budget)

    if TYPE_CHECKING:  # provided by HandshakeLane (engine/handshakes.py)

        def _queue_handshake(
            self, msg: bytes | memoryview, addr: Any, screened: bool, now: float
        ) -> None: ...

    def _init_inbound(self, udp4: socket.socket | None, udp6: socket.socket | None) -> None:
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
        self.coalescer = Coalescer(udp=False, verify=False)
        for sock in (udp4, udp6):
            if sock is not None:
                udpgso.enable_gro(sock)

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
        if seg == INITIATION_SIZE and n > seg:
            # Merged 148-byte datagrams from one source: only initiations are 148 bytes and
            # no honest peer sends a burst of them; the kernel filter cannot see past the
            # first (io/initiation_filter.py). Dropped whole, in one step.
            count = -(-n // seg)
            v[C.RX_PACKETS] += count
            v[C.RX_BYTES] += n
            v[_DROP_BASE + DropReason.INITIATION_FLOOD] += count
            return count
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
