"""The worker's inbound batch: the chosen `open_batch` over a Device's sessions, and what the
protocol objects need to hear about it afterwards (once per session per batch, not per
packet): the receive high-water mark in shared memory, key confirmation, endpoint roaming,
timers and the last-minute rekey.

Order per batch (crash safety): open (replay windows updated in process memory) ->
`settle` (recv_floor raised in the peer's shared slot) -> TUN writes. A worker that dies
before the floor is written never delivered those packets, so accepting them again after a
restart is no replay; one that dies after it cannot accept them twice.
"""

from __future__ import annotations

from typing import Any

from shardwg.datapath.openstate import (
    C_DROPS,
    C_RX_BYTES,
    C_RX_PACKETS,
    C_TRANSPORT,
    COUNTERS_LEN,
    HS_WORDS,
    SPAN_WORDS,
    T_ACCEPTED,
    T_BYTES,
    T_DATA,
    T_MSG,
    T_SLOT,
    TOUCH_WORDS,
    OpenState,
    batch_arrays,
)
from shardwg.datapath.select import Impl
from shardwg.proto.constants import DROP_REASON_COUNT, REKEY_ON_RECEIVE_AGE
from shardwg.proto.ownership import RemotePeer

_ZERO_COUNTERS = bytes(COUNTERS_LEN * 8)
_DROPS_AT = C_DROPS * 8
_ZERO_DROPS = bytes(DROP_REASON_COUNT * 8)


class Opener:
    """One worker's inbound kernel state and output buffers (for batches of up to
    `data_size` received bytes)."""

    def __init__(self, device: Any, impl: Impl, data_size: int, *, udp: bool = False) -> None:
        self.device = device
        self.impl = impl
        self.udp = udp
        self.state = OpenState(impl.new_keys())
        arrays = batch_arrays(data_size)
        self.dec = arrays["dec"]
        self.out = arrays["out"]
        self.spans = arrays["spans"]
        self.touched = arrays["touched"]
        self.handshakes = arrays["handshakes"]
        self.counters = arrays["counters"]
        self.out_view = memoryview(self.out)
        self.span = memoryview(self.spans).cast("I")
        self.rows = memoryview(self.touched).cast("Q")
        self.hs = memoryview(self.handshakes).cast("I")
        self.cnt = memoryview(self.counters).cast("Q")

    def open(
        self, data: Any, stride: int, lengths: list[int], segs: list[int], count: int, now: float
    ) -> tuple[int, int, int]:
        """Open a receive batch; returns (TUN writes, touched sessions, handshake rows)."""
        st = self.state
        st.sync(self.device)
        result: tuple[int, int, int] = self.impl.open_batch(
            st.keys, st.sessions, st.index, st.allowed, data, stride, lengths, segs, count,
            self.dec, self.out, self.spans, self.touched, self.handshakes, self.counters,
            now, self.udp, self._unknown_to_python(),
        )  # fmt: skip
        return result

    def _unknown_to_python(self) -> bool:
        """Unknown-index transport comes back to the worker when it may be ours after all:
        a peer that moved away (forwarded), or a spread peer's session we do not follow
        yet (its first datagram loads it, engine/inbound.py; the kernel opens the rest)."""
        dev = self.device
        return (bool(dev.moved) and dev.forward is not None) or dev.refresh_followed is not None

    def settle(self, ntouched: int, addrs: list[Any], now: float, wall: float) -> None:
        """Tell each touched session's peer what its packets did (before the TUN writes)."""
        rows, kps = self.rows, self.state.kps
        for t in range(ntouched):
            r = t * TOUCH_WORDS
            kp = kps[rows[r + T_SLOT]]
            if kp is None:
                continue
            peer = kp.peer
            mark = kp.recv_floor
            if mark is not None:
                floor = kp.replay.highest + 1
                if floor > mark[0]:
                    mark[0] = floor
            if peer.__class__ is RemotePeer:
                continue  # a followed session: its owner runs the timers, endpoint and keys
            if kp is not peer.current and kp is peer.next:
                peer.confirm(kp, now, wall)
            src = addrs[rows[r + T_MSG]]
            if src != peer.endpoint:
                peer.endpoint = src  # roaming: the latest authenticated source wins
            if rows[r + T_ACCEPTED]:
                data = rows[r + T_DATA]
                peer.received(now, rows[r + T_BYTES], data)
                if data and kp.is_initiator and now - kp.created >= REKEY_ON_RECEIVE_AGE:
                    peer.keep_key_fresh_receiving(kp, now, wall)

    def write_view(self, i: int) -> memoryview:
        """The i-th TUN write (vnet header + packet)."""
        at = self.span[i * SPAN_WORDS]
        return self.out_view[at : at + self.span[i * SPAN_WORDS + 1]]

    def handshake(self, i: int) -> tuple[int, int, int]:
        """(message, offset, length) of the i-th handshake row."""
        h = self.hs
        return h[i * HS_WORDS], h[i * HS_WORDS + 1], h[i * HS_WORDS + 2]

    def fold_counters(self, v: list[Any], rx_packets: int, rx_bytes: int, drop_base: int) -> int:
        """Add the batch counters into a worker's list, clear them; returns the transport
        datagrams seen (for the handshake budget)."""
        cnt = self.cnt
        v[rx_packets] += cnt[C_RX_PACKETS]
        v[rx_bytes] += cnt[C_RX_BYTES]
        transport = int(cnt[C_TRANSPORT])
        if self.counters[_DROPS_AT:] != _ZERO_DROPS:  # most batches drop nothing
            for r in range(DROP_REASON_COUNT):
                x = cnt[C_DROPS + r]
                if x:
                    v[drop_base + r] += x
        self.counters[:] = _ZERO_COUNTERS
        return transport
