"""Inbound, UDP -> TUN: read a batch of datagrams, open it in one kernel call, write the TUN.

A mixin of `Worker` (steps 1-4 of "Inbound" in engine/worker.py): it owns the receive
buffers and the inbound kernel (`datapath.inbound.Opener`: native or the Python
reference, same buffers and results); handshake messages the kernel hands back go to the
handshake lane.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

from shardwg.datapath import select as datapath_select
from shardwg.datapath.inbound import Opener
from shardwg.engine.budgets import BATCH, MAX_RECVS, RECV_SLOTS
from shardwg.io import mmsg, udpgso
from shardwg.io import tun as tun_io
from shardwg.io.vnet import VNET_HDR_LEN
from shardwg.proto.constants import MAX_DATAGRAM, DropReason, MessageType
from shardwg.proto.device import Device
from shardwg.proto.index import SPREAD_INDEX_BIT
from shardwg.shm import counters as C

log = logging.getLogger("shardwg.engine.worker")

_DROP_BASE = C.DROP_BASE
_U32 = struct.Struct("<I")
_SPREAD_BYTE_BIT = SPREAD_INDEX_BIT >> 8  # the spread bit in a receiver index's second byte


class _OneReceive:
    """A receive batch of one datagram (recvmsg fallback), shaped like mmsg.BatchReceiver."""

    __slots__ = ("lengths", "segs", "addrs", "views")

    def __init__(self, view: memoryview) -> None:
        self.lengths = [0]
        self.segs = [0]
        self.addrs: list[Any] = [None]
        self.views = [view]


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

    def _init_inbound(
        self,
        udp4: socket.socket | None,
        udp6: socket.socket | None,
        datapath: datapath_select.Impl | None = None,
    ) -> None:
        self._gro_view = memoryview(bytearray(udpgso.GRO_BUFFER))
        # recvmmsg where libc has it: one system call for up to RECV_SLOTS receives
        self._batch_rx = mmsg.BatchReceiver(RECV_SLOTS) if mmsg.available() else None
        self._one = _OneReceive(self._gro_view)  # the batch of one without recvmmsg
        # The first datagram of a followed spread session the kernel does not know yet,
        # opened in Python (it loads the session) into this, behind a zero virtio_net_hdr.
        self._followed_out = memoryview(bytearray(VNET_HDR_LEN + MAX_DATAGRAM))
        self.datapath = datapath or datapath_select.current()
        rx = self._batch_rx
        self.opener = Opener(
            self.device, self.datapath, rx.slots * rx.size if rx else len(self._gro_view)
        )
        for sock in (udp4, udp6):
            if sock is not None:
                udpgso.enable_gro(sock)

    def read_udp(self, sock: socket.socket, now: float, wall: float) -> int:
        """Read until BATCH datagrams (not receives: a flood from many sources gets one
        datagram per receive, and the handshake backlog must be able to build up to
        engage under-load mode) or the socket is empty. Each receive call's batch is
        opened by one `open_batch` call and written to the TUN coalesced."""
        total = 0
        rx = self._batch_rx
        if rx is not None:  # recvmmsg: up to rx.slots receives per system call
            for _ in range(MAX_RECVS):
                got = rx.recv(sock)
                if got:
                    total += self._open(rx.data, rx.size, rx.lengths, rx.segs, got, rx.views,
                                        rx.addrs, now, wall)  # fmt: skip
                if got < rx.slots or total >= BATCH:
                    break
        else:
            one = self._one
            for _ in range(MAX_RECVS):
                res = udpgso.recv_gro(sock, self._gro_view)
                if res is None:
                    break
                one.lengths[0], one.segs[0], one.addrs[0] = res
                total += self._open(self._gro_view, 0, one.lengths, one.segs, 1, one.views,
                                    one.addrs, now, wall)  # fmt: skip
                if total >= BATCH:
                    break
        return total

    def _open_followed(self, msg: memoryview, size: int, addr: Any, now: float,
                       wall: float) -> None:  # fmt: skip
        """A spread peer's datagram steered here by its counter under a session the kernel
        does not know yet (proto/device.py `_receive_followed` loads it from the owner's
        slot; our own replay window), to our TUN queue. The next batch's `sync` binds the
        session into the kernel's state, which opens the rest."""
        out = self._followed_out
        v = self.v
        res = self.device.receive_transport(msg, size, addr, out[VNET_HDR_LEN:], now, wall)
        if res < 0:
            v[_DROP_BASE - 1 - res] += 1
            return
        # no RX_PACKETS/RX_BYTES here: the kernel counted it among the datagrams it saw
        if res and not tun_io.write_packet(self.tun_fd, out[: VNET_HDR_LEN + res]):
            v[_DROP_BASE + DropReason.TUN_WRITE_ERROR] += 1

    def _open(
        self, data: Any, stride: int, lengths: list[int], segs: list[int], count: int,
        views: list[memoryview], addrs: list[Any], now: float, wall: float,
    ) -> int:  # fmt: skip
        """One batch through the inbound kernel: open, settle the sessions it touched (the
        receive high-water mark first), queue its handshake messages, write the TUN."""
        op = self.opener
        v = self.v
        before = v[C.RX_PACKETS]
        try:
            nw, ntouched, nhs = op.open(data, stride, lengths, segs, count, now)
            op.settle(ntouched, addrs, now, wall)
        except Exception:  # a bug, never bad input: count it and keep serving
            v[_DROP_BASE + DropReason.INTERNAL_ERROR] += 1
            log.debug("error in the inbound batch", exc_info=True)
            op.fold_counters(v, C.RX_PACKETS, C.RX_BYTES, _DROP_BASE)
            return max(1, count)
        self._turn_data += op.fold_counters(v, C.RX_PACKETS, C.RX_BYTES, _DROP_BASE)
        dev = self.device
        for i in range(nhs):
            m, off, size = op.handshake(i)
            msg = views[m][off : off + size]
            if msg[0] != MessageType.TRANSPORT:
                self._queue_handshake(msg, addrs[m], False, now)
                continue
            if msg[5] & _SPREAD_BYTE_BIT and dev.table.allocator.steer_spread:
                self._open_followed(msg, size, addrs[m], now, wall)  # ours alone to open
                continue
            # an index we gave away with its peer (placement move): pass it to the new owner
            moved = dev.moved.get(_U32.unpack_from(msg, 4)[0])
            if moved is None or dev.forward is None:
                v[_DROP_BASE + DropReason.UNKNOWN_INDEX] += 1
            else:
                dev.forward(moved.owner, msg, size, addrs[m])
        tun_fd = self.tun_fd
        for i in range(nw):
            if not tun_io.write_packet(tun_fd, op.write_view(i)):
                v[_DROP_BASE + DropReason.TUN_WRITE_ERROR] += 1
        return int(v[C.RX_PACKETS] - before)
