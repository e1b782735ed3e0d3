"""The inbound batch kernel in pure Python: the reference the native `open_batch` must match.

One call opens a whole receive batch (see `open_batch`); the state it reads and writes is
the flat buffers of openstate.py, so the native kernel and this reference can be compared
byte for byte (tests/test_datapath_open.py). Per datagram, in this order:
  1. classify by (type, length): handshake messages are handed back untouched (`handshakes`
     rows), junk is counted; a GRO message of 148-byte datagrams (a merged burst of
     initiations, which no honest peer sends) is dropped whole;
  2. transport: session by receiver index, key age, replay pre-check, ChaCha20-Poly1305
     into `dec`, replay window update (only after the tag verified);
  3. inner packet: IPv4/IPv6 header and length, the source inside the session's peer's
     allowed IPs, the TCP/UDP checksum (a segment corrupted before sealing must never join
     a super-packet: the kernel would compute a fresh checksum over it);
  4. the packets of the batch are coalesced into TUN writes (io/coalesce.py's rules) laid
     out back to back in `out`, one `spans` row each.
Every drop is counted by reason in `counters`; sessions that authenticated anything get one
`touched` row, for the caller's timers, endpoint roaming and receive high-water mark.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from typing import Any

from cryptography.exceptions import InvalidTag

from shardwg.datapath.openstate import (
    C_DROPS,
    C_MERGED,
    C_RX_BYTES,
    C_RX_PACKETS,
    C_TRANSPORT,
    S_CREATED,
    S_REPLAY,
    SESSION_SIZE,
    TOUCH_WORDS,
    index_hash,
)
from shardwg.io.coalesce import Coalescer
from shardwg.io.vnet import IPPROTO_TCP, IPPROTO_UDP, VNET_HDR_LEN, pseudo_sum, sum16
from shardwg.proto import replay
from shardwg.proto.constants import INITIATION_SIZE, REJECT_AFTER_TIME, DropReason, MessageType
from shardwg.proto.crypto import AEAD
from shardwg.proto.messages import TRANSPORT_HEADER, U32, U64, classify

_F64 = struct.Struct("<d")
_PAIR = struct.Struct("<II")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_V6ADDR = struct.Struct(">QQ")
_TRANSPORT = int(MessageType.TRANSPORT)
_COALESCERS = {False: Coalescer(udp=False, verify=False), True: Coalescer(udp=True, verify=False)}


class RefKeys:
    """One AEAD object per session slot (the native kernel keeps an EVP context instead)."""

    def __init__(self) -> None:
        self.aeads: list[Any] = []

    def set(self, slot: int, key: bytes) -> None:
        while len(self.aeads) <= slot:
            self.aeads.append(None)
        self.aeads[slot] = AEAD(key)

    def clear(self, slot: int) -> None:
        if slot < len(self.aeads):
            self.aeads[slot] = None


def _lookup(index: Any, receiver: int) -> int:
    """Slot of a receiver index in the probe table, or -1."""
    size = len(index) // 8
    bits = size.bit_length() - 1
    h = index_hash(receiver, bits)
    for _ in range(size):
        idx, slot1 = _PAIR.unpack_from(index, h * 8)
        if not slot1:
            return -1
        if idx == receiver:
            return slot1 - 1
        h = (h + 1) & (size - 1)
    return -1


class _Allowed:
    """The flattened allowed-IPs ranges, read once per call."""

    __slots__ = ("s4", "i4", "hi", "lo", "i6")

    def __init__(self, buf: Any) -> None:
        n4, n6 = _PAIR.unpack_from(buf, 0)
        view = memoryview(buf)
        self.s4 = view[8 : 8 + 4 * n4].cast("I")
        self.i4 = view[8 + 4 * n4 : 8 + 8 * n4].cast("I")
        at = (8 + 8 * n4 + 7) // 8 * 8
        self.hi = view[at : at + 8 * n6].cast("Q")
        self.lo = view[at + 8 * n6 : at + 16 * n6].cast("Q")
        self.i6 = view[at + 16 * n6 : at + 20 * n6].cast("I")

    def v4(self, addr: int) -> int:
        i = bisect_right(self.s4, addr) - 1
        return self.i4[i] if i >= 0 else 0

    def v6(self, hi: int, lo: int) -> int:
        a, b = 0, len(self.hi)  # the last range starting at or below (hi, lo)
        while a < b:
            mid = (a + b) // 2
            h = self.hi[mid]
            if h < hi or h == hi and self.lo[mid] <= lo:
                a = mid + 1
            else:
                b = mid
        return self.i6[a - 1] if a else 0


def _csum_ok(p: Any, total: int) -> bool:
    """True unless p is an unfragmented TCP/UDP packet whose checksum does not verify."""
    if p[0] >> 4 == 4:
        ihl = (p[0] & 15) * 4
        proto = p[9]
        if ihl < 20 or _BE16.unpack_from(p, 6)[0] & 0x3FFF:
            return True
        addrs = p[12:20]
    else:
        ihl = 40
        proto = p[6]
        addrs = p[8:40]
    if proto == IPPROTO_TCP:
        if total < ihl + 20:
            return True
    elif proto == IPPROTO_UDP:
        if total < ihl + 8 or (ihl != 40 and not p[ihl + 6] and not p[ihl + 7]):
            return True  # IPv4 UDP without a checksum
    else:
        return True
    return (pseudo_sum(addrs, proto, total - ihl) + sum16(p[ihl:total])) % 0xFFFF == 0


def open_batch(
    keys: RefKeys, sessions: Any, index: Any, allowed: Any,
    data: Any, stride: int, lengths: list[int], segs: list[int], count: int,
    dec: Any, out: Any, spans: Any, touched: Any, handshakes: Any, counters: Any,
    now: float, udp: bool, forward: bool = False,
) -> tuple[int, int, int]:  # fmt: skip
    """Open messages i < count of a receive batch: data[i * stride:][:lengths[i]], cut into
    datagrams of segs[i] bytes (GRO; the last may be shorter; a negative length is skipped).

    Returns (TUN writes in `spans`, rows in `touched`, rows in `handshakes`). With
    `forward`, transport datagrams under an unknown receiver index are handed back in
    `handshakes` too (uncounted): the caller forwards those of peers that moved away.
    """
    if count > len(lengths) or count > len(segs) or len(out) < len(dec):
        raise ValueError("open_batch: batch arrays too short")
    cnt = memoryview(counters).cast("Q")
    hs = memoryview(handshakes).cast("I")
    datav = memoryview(data)
    decv = memoryview(dec)
    nonce = bytearray(12)  # 4 zero bytes, then the counter (as keypair.open_into)
    ranges = _Allowed(allowed)
    aeads = keys.aeads
    max_slot = len(sessions) // SESSION_SIZE
    max_rows = len(touched) // (8 * TOUCH_WORDS)
    drops = [0] * (len(cnt) - C_DROPS)
    rx_packets = rx_bytes = transport = nhs = 0
    rows: list[list[int]] = []  # touched rows: slot, message, bytes, data, accepted
    row_of: dict[int, list[int]] = {}  # slot -> its row (the buffer's touch field, mirrored)
    sessions_of: dict[int, tuple[int, Any, int, bool]] = {}  # receiver -> slot, aead, pid, age ok
    pos = 0  # next free byte in dec
    views: list[memoryview] = []
    sizes: list[int] = []
    for m in range(count):
        n = lengths[m]
        if n < 0:
            continue
        base = m * stride
        if base + n > len(data):
            raise ValueError("open_batch: message beyond the data buffer")
        if n == 0:
            rx_packets += 1
            drops[DropReason.TOO_SHORT] += 1
            continue
        seg = segs[m]
        if seg <= 0 or seg > n:
            seg = n
        if seg == INITIATION_SIZE and n > seg:
            # Merged 148-byte datagrams from one source: only initiations are 148 bytes and
            # no honest peer sends a burst of them; the kernel filter cannot see past the
            # first (io/initiation_filter.py). Dropped whole, in one step.
            k = -(-n // seg)
            rx_packets += k
            rx_bytes += n
            drops[DropReason.INITIATION_FLOOD] += k
            continue
        off = 0
        while off < n:
            size = seg if off + seg <= n else n - off
            at = base + off
            off += size
            rx_packets += 1
            rx_bytes += size
            mtype = classify(datav[at : at + size])
            if mtype < 0:
                drops[-1 - mtype] += 1
                continue
            if mtype != _TRANSPORT:
                if (nhs + 1) * 3 > len(hs):
                    drops[DropReason.INTERNAL_ERROR] += 1
                else:
                    hs[nhs * 3], hs[nhs * 3 + 1], hs[nhs * 3 + 2] = m, at - base, size
                    nhs += 1
                continue
            transport += 1
            _, receiver, counter = TRANSPORT_HEADER.unpack_from(data, at)
            known = sessions_of.get(receiver)
            if known is None:  # look the session up once per batch
                slot = _lookup(index, receiver)
                so = slot * SESSION_SIZE
                aead = aeads[slot] if 0 <= slot < len(aeads) else None
                fresh = (
                    slot >= 0
                    and slot < max_slot
                    and (now - _F64.unpack_from(sessions, so + S_CREATED)[0] < REJECT_AFTER_TIME)
                )
                pid = U32.unpack_from(sessions, so + 4)[0] if 0 <= slot < max_slot else 0
                known = sessions_of[receiver] = (slot, aead, pid, fresh)
            slot, aead, pid_own, fresh = known
            if slot < 0:
                if forward and (nhs + 1) * 3 <= len(hs):  # maybe a peer that moved away
                    hs[nhs * 3], hs[nhs * 3 + 1], hs[nhs * 3 + 2] = m, at - base, size
                    nhs += 1
                else:
                    drops[DropReason.UNKNOWN_INDEX] += 1
                continue
            if slot >= max_slot or aead is None:
                drops[DropReason.INTERNAL_ERROR] += 1
                continue
            if not fresh:
                drops[DropReason.KEY_EXPIRED] += 1
                continue
            window = slot * SESSION_SIZE + S_REPLAY
            if not replay.check(sessions, window, counter):
                drops[DropReason.REPLAYED] += 1
                continue
            plen = size - 32
            start = pos + VNET_HDR_LEN
            if start + plen > len(dec):
                drops[DropReason.INTERNAL_ERROR] += 1
                continue
            U64.pack_into(nonce, 4, counter)
            try:
                aead.decrypt_into(
                    nonce, datav[at + 16 : at + size], None, decv[start : start + plen]
                )
            except InvalidTag:
                drops[DropReason.DECRYPT_FAILED] += 1
                continue
            if not replay.accept(sessions, window, counter):
                drops[DropReason.REPLAYED] += 1
                continue
            row = row_of.get(slot)
            if row is None:
                if len(rows) >= max_rows:
                    drops[DropReason.INTERNAL_ERROR] += 1
                    continue
                row = row_of[slot] = [slot, m, 0, 0, 0]
                rows.append(row)
            row[1] = m
            if plen == 0:  # keepalive
                row[2] += size
                row[4] += 1
                continue
            p = decv[start : start + plen]
            version = p[0] >> 4
            if version == 4:
                total = _BE16.unpack_from(p, 2)[0] if plen >= 20 else 0
                if total < 20 or total > plen:
                    drops[DropReason.BAD_INNER_PACKET] += 1
                    continue
                pid = ranges.v4(_BE32.unpack_from(p, 12)[0])
            elif version == 6:
                total = 40 + _BE16.unpack_from(p, 4)[0] if plen >= 40 else plen + 1
                if total > plen:
                    drops[DropReason.BAD_INNER_PACKET] += 1
                    continue
                pid = ranges.v6(*_V6ADDR.unpack_from(p, 8))
            else:
                drops[DropReason.BAD_INNER_PACKET] += 1
                continue
            if pid == 0 or pid != pid_own:
                drops[DropReason.SOURCE_NOT_ALLOWED] += 1
                continue
            if not _csum_ok(p, total):
                drops[DropReason.BAD_INNER_CHECKSUM] += 1
                continue
            row[2] += size
            row[3] += 1
            row[4] += 1
            views.append(decv[pos : start + total])
            sizes.append(total)
            pos = (start + plen + 7) & ~7
    cnt[C_RX_PACKETS] += rx_packets
    cnt[C_RX_BYTES] += rx_bytes
    cnt[C_TRANSPORT] += transport
    for reason, x in enumerate(drops):
        if x:
            cnt[C_DROPS + reason] += x
    if rows:
        struct.pack_into(f"<{len(rows) * TOUCH_WORDS}Q", touched, 0, *(x for r in rows for x in r))
    nwrites = 0
    if views:
        coalescer = _COALESCERS[bool(udp)]
        merged = coalescer.merged
        sp = memoryview(spans).cast("I")
        at = 0
        for view, length in coalescer.coalesce(views, sizes, len(views), VNET_HDR_LEN):
            out[at : at + length] = view[:length]
            sp[nwrites * 2], sp[nwrites * 2 + 1] = at, length
            nwrites += 1
            at += length
        cnt[C_MERGED] += coalescer.merged - merged
    return nwrites, len(rows), nhs
