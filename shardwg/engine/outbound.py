"""Outbound, TUN -> UDP: route each packet, seal it for its peer, send in GSO runs.

A mixin of `Worker` (steps 1-4 of "Outbound" in engine/worker.py): it owns the
packet buffers (shared with the handoff rings, whose packets leave the same way)
and the GSO batcher; the turn calls `read_tun` or `send_packets` once per batch.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from shardwg.engine.budgets import BATCH, PLAIN_HEADROOM
from shardwg.io import segment, udpgso
from shardwg.io import tun as tun_io
from shardwg.io.vnet import VNET_HDR_LEN
from shardwg.proto.constants import MAX_DATAGRAM, DropReason
from shardwg.proto.device import Device
from shardwg.proto.ownership import RemotePeer
from shardwg.proto.peer import Peer
from shardwg.shm import counters as C
from shardwg.shm.handoff import HandoffKind

log = logging.getLogger("shardwg.engine.worker")

_DROP_BASE = C.DROP_BASE


class OutboundPath:
    """Plain packets in (TUN queue or handoff ring), sealed datagrams out."""

    # From the worker:
    device: Device
    tun_fd: int
    udp4: socket.socket | None
    udp6: socket.socket | None
    v: list[int]

    if TYPE_CHECKING:  # provided by Worker and HandoffRings (engine/handoffs.py)

        def drop(self, code: int) -> None: ...

        def _hand_over(self, owner: int, data: bytes | memoryview, kind: int) -> None: ...

    def _init_outbound(self) -> None:
        # The TUN's virtio_net_hdr sits in front of each packet buffer (see _init_inbound);
        # `_pk_pkt` views start at the IP packet and leave PLAIN_HEADROOM for padding.
        self._pk_bufs = [
            memoryview(bytearray(VNET_HDR_LEN + MAX_DATAGRAM + PLAIN_HEADROOM))
            for _ in range(BATCH)
        ]
        self._pk_pkt = [b[VNET_HDR_LEN:] for b in self._pk_bufs]
        self._pk_sizes = [0] * BATCH
        self._pk_kinds = [0] * BATCH
        self._pk_auxs = [0] * BATCH
        # One MTU-sized segment each (segment.split), plus room for its padding.
        seg_size = max(2048, self.device.mtu + PLAIN_HEADROOM)
        self._seg_pkt = [memoryview(bytearray(seg_size)) for _ in range(BATCH)]
        self._seg_sizes = [0] * BATCH
        self.gso = udpgso.GsoBatcher()

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
