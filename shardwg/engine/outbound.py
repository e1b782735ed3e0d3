"""Outbound, TUN -> UDP: route each read, seal runs of one peer's packets, one sendmsg per run.

A mixin of `Worker` (steps 1-4 of "Outbound" in engine/worker.py). What the TUN queue read
(virtio_net_hdr + IP packet; with TSO/USO a super-packet of up to 64 KiB) or a handoff ring
delivered (plain IP packets) is routed per read; consecutive reads for one peer go to the
batch kernel (shardwg.datapath: native, or the pure-Python reference) in one call, which
cuts, pads, numbers and seals them straight into one UDP_SEGMENT run. Nonces: the kernel
stops at the published reservation; we publish the next block (reserve_send) and go on, so
a replacement worker never reuses a counter. Packets for another worker's peer are cut into
segments (the same kernel, no encryption) and handed over; without a session they are staged.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from shardwg.datapath import seal_ref, select
from shardwg.engine.budgets import BATCH, PLAIN_HEADROOM
from shardwg.io import tun as tun_io
from shardwg.io import udpgso
from shardwg.io.vnet import VNET_HDR_LEN
from shardwg.proto.constants import (
    MAX_DATAGRAM,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    DropReason,
)
from shardwg.proto.device import Device
from shardwg.proto.keypair import Keypair, reserve_send
from shardwg.proto.ownership import RemotePeer
from shardwg.proto.peer import Peer
from shardwg.shm import counters as C
from shardwg.shm.follower import SpreadFollower
from shardwg.shm.handoff import HandoffKind

log = logging.getLogger("shardwg.engine.worker")

_DROP_BASE = C.DROP_BASE
_NO_ROUTE = _DROP_BASE + DropReason.NO_ROUTE
_SEND_ERROR = _DROP_BASE + DropReason.SEND_ERROR
_EXPIRED = _DROP_BASE + DropReason.KEY_EXPIRED
_INTERNAL = _DROP_BASE + DropReason.INTERNAL_ERROR
_NOT_PUBLISHED = _DROP_BASE + DropReason.NOT_PUBLISHED
_NO_ENDPOINT = DropReason.NO_ENDPOINT
_LIMIT = seal_ref.LIMIT
_MAX_SEGMENTS = udpgso.MAX_SEGMENTS
_MAX_GSO_BYTES = udpgso.MAX_GSO_BYTES
_SEAL_OUT = 1 << 17  # one run (<= 64 KiB) or one datagram of the largest packet
_TUN_PACKET = HandoffKind.TUN_PACKET


class OutboundPath:
    """Plain packets or super-packets in (TUN queue or handoff ring), sealed runs out."""

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
        # `_pk_pkt` views start at the IP packet (handoff rings fill those).
        self._pk_bufs = [
            memoryview(bytearray(VNET_HDR_LEN + MAX_DATAGRAM + PLAIN_HEADROOM))
            for _ in range(BATCH)
        ]
        self._pk_pkt = [b[VNET_HDR_LEN:] for b in self._pk_bufs]
        self._pk_sizes = [0] * BATCH
        self._pk_kinds = [0] * BATCH
        self._pk_auxs = [0] * BATCH
        self._seal_out = bytearray(_SEAL_OUT)
        self._seal_view = memoryview(self._seal_out)
        impl = select.current()
        self._seal_run = impl.seal_run
        self._make_sealer = impl.sealer

    # ------------------------------------------------------------------ entry points
    def read_tun(self, now: float, wall: float) -> int:
        """One batch from our TUN queue (each read keeps its vnet header)."""
        n = tun_io.read_batch(self.tun_fd, self._pk_bufs, self._pk_sizes, BATCH)
        if n:
            self._send(self._pk_bufs, self._pk_pkt, VNET_HDR_LEN, n, now, wall)
        return n

    def send_packets(
        self, views: list[memoryview], sizes: list[int], count: int, now: float, wall: float
    ) -> None:
        """Route and seal plain IP packets views[i][:sizes[i]] for i < count (a ring's)."""
        if sizes is not self._pk_sizes:
            self._pk_sizes[:count] = sizes[:count]
        self._send(views, views, 0, count, now, wall)

    # ------------------------------------------------------------------ per batch
    def _send(self, bufs: list[memoryview], ips: list[memoryview], hdr: int, count: int,
              now: float, wall: float) -> None:  # fmt: skip
        """bufs[i][:sizes[i]] is read i (hdr bytes of vnet header first), ips[i] its IP packet.
        Consecutive reads routed to one peer are handled together."""
        route = self.device.route
        sizes = self._pk_sizes
        v = self.v
        i = 0
        nxt = route(ips[0], sizes[0] - hdr) if count else None
        while i < count:
            peer = nxt
            j = i + 1
            while j < count:
                nxt = route(ips[j], sizes[j] - hdr)
                if nxt is not peer:
                    break
                j += 1
            try:
                if peer is None:
                    v[_NO_ROUTE] += j - i
                elif type(peer) is RemotePeer:
                    fol = peer.follower
                    k = i
                    if fol is not None and fol.rekey_due(now):  # the owner's send rekeys
                        self._hand_over_reads(peer.owner, bufs, ips, hdr, i, i + 1)
                        k = i + 1
                    if k < j and (fol is None or not self._seal_followed(fol, bufs, hdr, k, j,
                                                                         now)):  # fmt: skip
                        self._hand_over_reads(peer.owner, bufs, ips, hdr, k, j)
                else:
                    assert isinstance(peer, Peer)
                    self._seal_for(peer, bufs, hdr, i, j, now, wall)
            except Exception:
                v[_INTERNAL] += j - i
                log.debug("error on outbound packets", exc_info=True)
            i = j

    def _seal_for(self, peer: Peer, bufs: list[memoryview], hdr: int, i: int, j: int,
                  now: float, wall: float) -> None:  # fmt: skip
        """Seal reads i..j-1 for peer, one sendmsg per run; stage them without a session."""
        ep = peer.endpoint
        if ep is None:
            self.v[_DROP_BASE + _NO_ENDPOINT] += j - i
            return
        kp = peer.current
        if kp is None or now - kp.created >= REJECT_AFTER_TIME or (
            kp.send_counter >= REJECT_AFTER_MESSAGES
        ):
            self._segments(bufs, hdr, i, j, lambda seg: peer.stage(bytes(seg), now, wall))
            return
        sock = self.udp6 if len(ep) == 4 else self.udp4
        if sock is None:
            self.v[_SEND_ERROR] += j - i
            return
        sealer = kp.sealer
        if sealer is None:  # once per session, at its first send
            sealer = kp.sealer = self._make_sealer(kp.send_key)
        sent = self._seal_runs(kp, sealer, sock, ep, bufs, hdr, i, j)
        if sent:
            peer.sent_data(now, sent)
        if kp.is_initiator and (
            now - kp.created >= REKEY_AFTER_TIME or kp.send_counter >= REKEY_AFTER_MESSAGES
        ):
            peer.keep_key_fresh_sending(kp, now, wall)

    def _seal_followed(self, fol: SpreadFollower, bufs: list[memoryview], hdr: int, i: int,
                       j: int, now: float) -> bool:  # fmt: skip
        """A spread peer's reads i..j-1 sealed here under our own counter blocks (the owner
        runs its handshakes and timers); False: hand them to the owner (nothing to follow)."""
        kp = fol.session()
        ep = fol.endpoint
        if kp is None or ep is None or now - kp.created >= REJECT_AFTER_TIME:
            return False
        sock = self.udp6 if len(ep) == 4 else self.udp4
        if sock is None:
            self.v[_SEND_ERROR] += j - i
            return True
        sealer = kp.sealer
        if sealer is None:  # once per followed session
            sealer = kp.sealer = self._make_sealer(kp.send_key)
        self._seal_runs(kp, sealer, sock, ep, bufs, hdr, i, j)
        return True

    def _seal_runs(self, kp: Keypair, sealer: Any, sock: socket.socket, ep: Any,
                   bufs: list[memoryview], hdr: int, pos: int, end: int) -> int:  # fmt: skip
        """Seal and send reads pos..end-1 on kp; returns the bytes sealed. A spread
        session (kp.blocks) keeps up with the front before each run (proto/spread.py)."""
        v = self.v
        out, view, run = self._seal_out, self._seal_view, self._seal_run
        sizes = self._pk_sizes
        mtu = self.device.mtu
        remote = kp.remote_index
        limit = min(kp.send_reserved, REJECT_AFTER_MESSAGES)
        seg = 0
        sent_bytes = 0
        blocks = kp.blocks  # spread: other workers seal under this key as well
        for _ in range(1 << 20):  # bounded; each call seals, drops or publishes a block
            if pos >= end:
                break
            if blocks is not None:
                # Before every run, not once per batch: a batch of TSO reads is thousands
                # of counters, and the others move the front on while we seal it.
                blocks.keep_up(kp)
                limit = min(kp.send_reserved, REJECT_AFTER_MESSAGES)
            status, pos, seg, counter, count, size, used = run(
                sealer, bufs, sizes, pos, seg, end, hdr != 0, mtu, remote, kp.send_counter,
                limit, out, _MAX_SEGMENTS, _MAX_GSO_BYTES,
            )  # fmt: skip
            kp.send_counter = counter
            if count:
                got = udpgso.send_gso(sock, view[:used], size, count, ep)
                v[C.TX_PACKETS] += count
                v[C.TX_BYTES] += used
                sent_bytes += used
                if got < count:
                    v[_SEND_ERROR] += count - got
            if status == _LIMIT:
                if counter >= REJECT_AFTER_MESSAGES:  # the session is spent: the rest too
                    v[_EXPIRED] += end - pos
                    break
                limit = reserve_send(kp, counter)  # published before the first use
                if limit <= counter:  # the publisher failed: fail closed, send nothing more
                    v[_NOT_PUBLISHED] += end - pos
                    break
                limit = min(limit, REJECT_AFTER_MESSAGES)
            elif status < 0:
                v[_DROP_BASE - 1 - status] += 1
        return sent_bytes

    # ------------------------------------------------------------------ plain segments
    def _segments(self, bufs: list[memoryview], hdr: int, i: int, j: int, take: Any) -> None:
        """Call take(segment view) for every segment of reads i..j-1 (super-packets cut,
        partial checksums finished); malformed reads are counted drops."""
        v = self.v
        view, run = self._seal_view, self._seal_run
        sizes = self._pk_sizes
        pos, seg = i, 0
        for _ in range(1 << 20):
            if pos >= j:
                break
            status, pos, seg, _c, count, size, used = run(
                None, bufs, sizes, pos, seg, j, hdr != 0, 0, 0, 0, 0, self._seal_out,
                _MAX_SEGMENTS, _SEAL_OUT,
            )  # fmt: skip
            if status < 0:
                v[_DROP_BASE - 1 - status] += 1
            for k in range(count):
                start = k * size
                take(view[start : min(start + size, used)])

    def _hand_over_reads(self, owner: int, bufs: list[memoryview], ips: list[memoryview],
                         hdr: int, i: int, j: int) -> None:  # fmt: skip
        """Reads for a peer another worker owns: plain packets as they are, the rest cut."""
        sizes = self._pk_sizes
        for k in range(i, j):
            buf = bufs[k]
            if not hdr or not (buf[0] & 1 or buf[1]):  # no NEEDS_CSUM, no GSO type
                self._hand_over(owner, ips[k][: sizes[k] - hdr], _TUN_PACKET)
            else:
                self._segments(bufs, hdr, k, k + 1,
                               lambda seg: self._hand_over(owner, seg, _TUN_PACKET))  # fmt: skip
