"""Merge a batch of decrypted packets into TUN super-packets (the kernel's GRO, done by us).

One write of a 64 KiB super-packet replaces up to 64 writes, and the kernel's TCP takes it in
as one skb. The merge rules mirror the kernel's tcp_gro_receive conservatively (and
wireguard-go's tun/offload_linux.go): same 5-tuple, IPv4 without options or fragments, equal
TOS/TTL/DF (IPv6: first word and hop limit), equal TCP header length, options, ACK number and
window, contiguous sequence numbers, flags exactly ACK (PSH allowed on the last segment only:
a PSH or a short segment ends the group), every segment no longer than the first. UDP merges
(GSO_UDP_L4, only with TUN_F_USO4/6 on) need equal sizes except a shorter last one.

A merged packet is written with NEEDS_CSUM and the pseudo-header sum in the checksum field, so
the kernel never looks at the original checksums again: each member's checksum is verified
before it joins (`verify=False` skips this when the peers are trusted to send valid ones).
Everything else goes out as it came, behind an all-zero header (its checksum is the sender's).

Order within a flow is kept: a packet that cannot join its flow's open group closes it, and a
group is written at the position of its first packet.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from shardwg.io.vnet import (
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_CSUM_OFFSET,
    UDP_CSUM_OFFSET,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET,
    VNET_HDR_LEN,
    ZERO_HDR,
    finish,
    fold,
    pseudo_sum,
    sum16,
)

MAX_SEGMENTS = 64
MAX_SIZE = 65535  # an IPv4 total length; also keeps IPv6 clear of jumbograms
_IP4 = struct.Struct("!BBHHHBB")  # ver/ihl, tos, total length, id, frag, ttl, protocol
_V4TCP = struct.Struct("!BBHHHBB10x4xIIBBH")  # _IP4, then TCP seq, ack, offset, flags, window
_TCP = struct.Struct("!4xIIBBH")  # seq, ack, data offset, flags, window
_H = struct.Struct("!H")
_ACK = 0x10
_PSH = 0x08
_MERGEABLE_FLAGS = (_ACK, _ACK | _PSH)
_Out = tuple[memoryview, int]


class _Group:
    """One flow's run of packets being merged; slot is its place in the output list."""

    __slots__ = ("slot", "view", "size", "arena", "total", "hl", "iph", "mss", "nseg",
                 "next_seq", "sig", "closed", "psh", "proto", "v6")  # fmt: skip

    def __init__(
        self, slot: int, view: memoryview, size: int, hl: int, iph: int, mss: int,
        next_seq: int, sig: tuple[object, ...], closed: bool, proto: int, v6: bool,
    ) -> None:  # fmt: skip
        self.slot = slot
        self.view = view  # the head packet (headroom before it), until an arena takes over
        self.size = size
        self.arena: memoryview | None = None
        self.total = size
        self.hl = hl
        self.iph = iph
        self.mss = mss
        self.nseg = 1
        self.next_seq = next_seq
        self.sig = sig
        self.closed = closed
        self.psh = False
        self.proto = proto
        self.v6 = v6


class Coalescer:
    """Reusable merger for one TUN queue; holds the 64 KiB arenas merged packets are built in.

    `udp=True` only when TUNSETOFFLOAD accepted TUN_F_USO4|TUN_F_USO6. Not thread-safe; the
    returned list and the arenas its views point into are reused by the next call.
    """

    def __init__(
        self,
        *,
        udp: bool = False,
        verify: bool = True,
        max_segments: int = MAX_SEGMENTS,
        max_size: int = MAX_SIZE,
        max_arenas: int = 16,
    ) -> None:
        self.udp = udp
        self.verify = verify
        self.max_segments = max_segments
        self.max_size = min(max_size, MAX_SIZE)
        self.max_arenas = max_arenas
        self._arenas: list[memoryview] = []
        self._out: list[_Out] = []
        self.merged = 0  # packets that went into a super-packet (for counters)

    def coalesce(
        self,
        views: Sequence[memoryview],
        sizes: Sequence[int],
        count: int,
        offset: int = VNET_HDR_LEN,
    ) -> list[_Out]:
        """Packets i < count sit at views[i][offset:offset + sizes[i]] (offset >= 10 leaves
        room for the header). Returns (view, length) pairs to write, view[:length] each."""
        if offset < VNET_HDR_LEN:
            raise ValueError("offset must leave room for the 10-byte virtio_net_hdr")
        out = self._out
        out.clear()
        groups: dict[bytes, _Group] = {}
        used = 0  # arenas handed out this call
        verify = self.verify
        b = offset
        h = offset - VNET_HDR_LEN
        for i in range(count):
            p = views[i]
            n = sizes[i]
            parsed = self._candidate(p, b, n)
            if parsed is None:
                key = _flow_key(p, b, n)
                g = groups.pop(key, None) if key is not None else None
                if g is not None:
                    self._finish(g)  # keeps this packet behind the flow's earlier ones
                p[h:b] = ZERO_HDR
                out.append((p[h : b + n], n + VNET_HDR_LEN))
                continue
            key, proto, iph, hl, seq, flags, sig = parsed
            plen = n - hl
            g = groups.get(key)
            if g is not None:
                if (
                    g.closed
                    or seq != g.next_seq
                    or plen > g.mss
                    or g.sig != sig
                    or g.proto != proto
                    or g.nseg >= self.max_segments
                    or g.total + plen > self.max_size
                ):
                    self._finish(g)
                elif g.arena is None and (
                    used >= self.max_arenas
                    or verify and not _csum_ok(g.view, b, g.size, g.iph, g.proto)
                ):
                    self._finish(g)  # the head stays single; p may start a new run
                elif verify and not _csum_ok(p, b, n, iph, proto):
                    self._finish(g)  # p goes single and ends the flow's run
                    del groups[key]
                    p[h:b] = ZERO_HDR
                    out.append((p[h : b + n], n + VNET_HDR_LEN))
                    continue
                else:
                    arena = g.arena
                    if arena is None:
                        arena = g.arena = self._arena(used)
                        used += 1
                        arena[VNET_HDR_LEN : VNET_HDR_LEN + g.size] = g.view[b : b + g.size]
                    at = VNET_HDR_LEN + g.total
                    arena[at : at + plen] = p[b + hl : b + n]
                    g.total += plen
                    g.nseg += 1
                    g.next_seq = (seq + plen) & 0xFFFFFFFF if proto == IPPROTO_TCP else 0
                    if flags & _PSH or plen < g.mss:
                        g.closed = True
                        g.psh = bool(flags & _PSH)
                    continue
            p[h:b] = ZERO_HDR  # a single unless others join it (then an arena takes over)
            out.append((p[h : b + n], n + VNET_HDR_LEN))
            groups[key] = _Group(
                len(out) - 1, p, n, hl, iph, plen,
                (seq + plen) & 0xFFFFFFFF if proto == IPPROTO_TCP else 0,
                sig, bool(flags & _PSH), proto, p[b] >> 4 == 6,
            )  # fmt: skip
        for g in groups.values():
            self._finish(g)
        return out

    def _arena(self, index: int) -> memoryview:
        while len(self._arenas) <= index:
            self._arenas.append(memoryview(bytearray(VNET_HDR_LEN + MAX_SIZE)))
        return self._arenas[index]

    def _candidate(
        self, p: memoryview, b: int, n: int
    ) -> tuple[bytes, int, int, int, int, int, tuple[object, ...]] | None:
        """(flow key, protocol, IP header length, headers length, seq, TCP flags, what must
        match across the group) for a packet that may be merged; None otherwise."""
        if p[b] == 0x45 and n >= 40 and p[b + 9] == IPPROTO_TCP:  # the bulk case, unpacked once
            _, tos, total, _, frag, ttl, _, seq, ack, doff, flags, window = _V4TCP.unpack_from(
                p, b
            )
            thl = (doff >> 4) * 4
            hl = 20 + thl
            if total != n or frag & 0x3FFF or flags not in _MERGEABLE_FLAGS or thl < 20 or hl >= n:
                return None
            opts = p[b + 40 : b + hl].tobytes() if thl > 20 else b""
            sig = (tos, ttl, frag, ack, window, doff, opts)
            return p[b + 12 : b + 24].tobytes(), IPPROTO_TCP, 20, hl, seq, flags, sig
        v = p[b] >> 4
        if v == 4:
            if n < 28:
                return None
            verihl, tos, total, _id, frag, ttl, proto = _IP4.unpack_from(p, b)
            if verihl != 0x45 or total != n or frag & 0x3FFF:
                return None
            iph = 20
            key = p[b + 12 : b + 24].tobytes()
            ip_a: object = tos
            ip_b: object = (ttl, frag)
        elif v == 6:
            if n < 48:
                return None
            proto = p[b + 6]
            if _H.unpack_from(p, b + 4)[0] != n - 40:
                return None
            iph = 40
            key = p[b + 8 : b + 44].tobytes()
            ip_a = p[b : b + 4].tobytes()  # version, traffic class, flow label
            ip_b = p[b + 7]  # hop limit
        else:
            return None
        t = b + iph
        if proto == IPPROTO_TCP:
            if n < iph + 20:
                return None
            seq, ack, doff, flags, window = _TCP.unpack_from(p, t)
            thl = (doff >> 4) * 4
            hl = iph + thl
            if thl < 20 or hl >= n or flags not in _MERGEABLE_FLAGS:
                return None
            opts = p[t + 20 : t + thl].tobytes() if thl > 20 else b""
            return key, proto, iph, hl, seq, flags, (ip_a, ip_b, ack, window, doff, opts)
        if proto == IPPROTO_UDP and self.udp:
            hl = iph + 8
            if hl >= n or _H.unpack_from(p, t + 4)[0] != n - iph:
                return None
            if v == 4 and _H.unpack_from(p, t + 6)[0] == 0:
                return None  # no checksum to vouch for the data
            return key, proto, iph, hl, 0, _ACK, (ip_a, ip_b)
        return None

    def _finish(self, g: _Group) -> None:
        """Fix up a merged group's headers and point its output slot at the arena."""
        arena = g.arena
        if arena is None or g.nseg < 2:
            return  # a single: its all-zero header is already in place
        self.merged += g.nseg
        base = VNET_HDR_LEN
        total, iph = g.total, g.iph
        if g.v6:
            _H.pack_into(arena, base + 4, total - 40)
            addrs = arena[base + 8 : base + 40]
        else:
            _H.pack_into(arena, base + 2, total)
            _H.pack_into(arena, base + 10, 0)
            _H.pack_into(arena, base + 10, finish(sum16(arena[base : base + 20])))
            addrs = arena[base + 12 : base + 20]
        t = base + iph
        if g.proto == IPPROTO_TCP:
            if g.psh:
                arena[t + 13] |= _PSH
            gso = GSO_TCPV6 if g.v6 else GSO_TCPV4
            csum_offset = TCP_CSUM_OFFSET
        else:
            _H.pack_into(arena, t + 4, total - iph)
            gso = GSO_UDP_L4
            csum_offset = UDP_CSUM_OFFSET
        _H.pack_into(arena, t + csum_offset, fold(pseudo_sum(addrs, g.proto, total - iph)))
        VNET.pack_into(arena, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, g.hl, g.mss, iph, csum_offset)
        self._out[g.slot] = (arena[: base + total], base + total)


def _flow_key(p: memoryview, b: int, n: int) -> bytes | None:
    """The flow key a TCP/UDP packet that cannot be merged would have had, so it closes its
    flow's group (order); None for other protocols."""
    v = p[b] >> 4
    if v == 4 and n >= 24 and p[b + 9] in (IPPROTO_TCP, IPPROTO_UDP):
        ihl = (p[b] & 15) * 4
        if ihl == 20:
            return p[b + 12 : b + 24].tobytes()
        if n >= ihl + 4:
            return p[b + 12 : b + 20].tobytes() + p[b + ihl : b + ihl + 4].tobytes()
    elif v == 6 and n >= 44 and p[b + 6] in (IPPROTO_TCP, IPPROTO_UDP):
        return p[b + 8 : b + 44].tobytes()
    return None


def _csum_ok(p: memoryview, b: int, n: int, iph: int, proto: int) -> bool:
    """True when the packet's TCP/UDP checksum (with pseudo-header) verifies."""
    addrs = p[b + 8 : b + 40] if iph == 40 else p[b + 12 : b + 20]
    return (pseudo_sum(addrs, proto, n - iph) + sum16(p[b + iph : b + n])) % 0xFFFF == 0
