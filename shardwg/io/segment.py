"""Split what a vnet-header TUN hands us into MTU-sized IP packets ready to seal.

With TSO/USO offloads on, one TUN read returns up to 64 KiB of one flow (a "super-packet") plus
a virtio_net_hdr saying how to cut it; without GSO it may still carry a half-done checksum
(NEEDS_CSUM). WireGuard seals IP packets one by one, so before sealing we do what a NIC would:
per segment, copy the headers, fix IPv4 total length / ID / header checksum (IPv6 payload
length), TCP sequence number and flags (CWR on the first segment only, FIN/PSH on the last
only) or UDP length, and compute the full TCP/UDP checksum including the pseudo-header.

The kernel's hdr_len is not trusted (on the forward path it can be the whole first packet):
header lengths come from the packets themselves, and every length is checked before use, so a
malformed input returns a negative `-1 - DropReason` code instead of raising. Per-segment
header sums are precomputed once and patched with the few words that change, so the only
per-byte work is one copy and one checksum of the payload.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from shardwg.io.vnet import (
    GSO_ECN,
    GSO_NONE,
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
    finish,
    sum16,
)
from shardwg.proto.constants import DropReason

MALFORMED = -1 - DropReason.BAD_INNER_PACKET
NO_ROOM = -1 - DropReason.BAD_SIZE  # more segments than buffers, or a buffer too small

_H = struct.Struct("!H")
_I = struct.Struct("!I")
_TCP_FIN = 0x01
_TCP_PSH = 0x08
_TCP_CWR = 0x80
GSO_PROTOCOLS = {  # gso_type -> the transport protocol it segments
    GSO_TCPV4: IPPROTO_TCP,
    GSO_TCPV4 | GSO_ECN: IPPROTO_TCP,
    GSO_TCPV6: IPPROTO_TCP,
    GSO_TCPV6 | GSO_ECN: IPPROTO_TCP,
    GSO_UDP_L4: IPPROTO_UDP,
}
_V6_EXT_SKIP = frozenset({0, 60})  # hop-by-hop, destination options: carried along unchanged
_from = int.from_bytes
_B = 10  # VNET_HDR_LEN: where the IP packet starts in what the TUN read
assert _B == VNET_HDR_LEN


def split(
    pkt: memoryview, n: int, outs: Sequence[memoryview], sizes: list[int], first: int = 0
) -> int:
    """Split pkt[:n] (virtio_net_hdr + IP packet, as read from the TUN) into outs[first + i]
    and sizes[first + i].

    Returns the number of IP packets written, or MALFORMED / NO_ROOM (never raises for any
    input bytes): NO_ROOM when fewer than the needed buffers are left after `first` (flush and
    retry with first=0) or a buffer is too small. Each out buffer needs room for one segment
    plus the 15 bytes of padding seal_into adds in place.
    """
    if n < _B + 20 or n > len(pkt):
        return MALFORMED
    flags, gso_type, hdr_len, gso_size, cs, co = VNET.unpack_from(pkt, 0)
    length = n - _B
    if gso_type == GSO_NONE:
        if first >= len(outs) or first >= len(sizes) or len(outs[first]) < length:
            return NO_ROOM
        out = outs[first]
        out[:length] = pkt[_B:n]
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            at = cs + co
            if at + 2 > length:
                return MALFORMED
            # The field holds the pseudo-header sum: summing over it in place adds it in.
            _H.pack_into(out, at, finish(sum16(out[cs:length])))
        sizes[first] = length
        return 1
    proto = GSO_PROTOCOLS.get(gso_type)
    if proto is None:
        return MALFORMED
    tcp = proto == IPPROTO_TCP
    version = pkt[_B] >> 4
    if version == 4:
        if gso_type & 0x7F == GSO_TCPV6:
            return MALFORMED
        ihl = (pkt[_B] & 15) * 4
        if ihl < 20 or cs != ihl or pkt[_B + 9] != proto:
            return MALFORMED
        if _H.unpack_from(pkt, _B + 2)[0] != length or _H.unpack_from(pkt, _B + 6)[0] & 0x3FFF:
            return MALFORMED  # total length disagrees, or a fragment
        addrs = pkt[_B + 12 : _B + 20]
    elif version == 6:
        if gso_type & 0x7F == GSO_TCPV4 or length < 40:
            return MALFORMED
        if _H.unpack_from(pkt, _B + 4)[0] != length - 40 or v6_transport(pkt, length) != (
            proto,
            cs,
        ):
            return MALFORMED
        addrs = pkt[_B + 8 : _B + 40]
    else:
        return MALFORMED
    if cs + (20 if tcp else 8) > length:
        return MALFORMED
    thl = (pkt[_B + cs + 12] >> 4) * 4 if tcp else 8
    hl = cs + thl
    if thl < 20 and tcp or hl >= length or hdr_len > length:
        return MALFORMED
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and co != (TCP_CSUM_OFFSET if tcp else UDP_CSUM_OFFSET):
        return MALFORMED
    if gso_size == 0:
        return MALFORMED
    count = (length - hl + gso_size - 1) // gso_size
    if first + count > len(outs) or first + count > len(sizes):
        return NO_ROOM
    split_l4 = _split_tcp if tcp else _split_udp
    return split_l4(pkt, length, version, cs, hl, gso_size, count, addrs, outs, sizes, first)


def v6_transport(pkt: memoryview, length: int) -> tuple[int, int]:
    """(protocol, offset) of the IPv6 transport header of pkt (vnet header + `length` bytes of
    IPv6 packet) past hop-by-hop/destination options; a routing or fragment header ends the
    walk there (refused: the pseudo-header would differ)."""
    nh = pkt[_B + 6]
    off = 40
    for _ in range(8):
        if nh not in _V6_EXT_SKIP:
            break
        if off + 2 > length:
            return -1, -1
        nh = pkt[_B + off]
        off += (pkt[_B + off + 1] + 1) * 8
    return nh, off


def _ip_fixed(pkt: memoryview, version: int, cs: int) -> tuple[int, int]:
    """(IPv4 header sum without total length, ID and checksum; first ID); (0, 0) for IPv6."""
    if version != 4:
        return 0, 0
    ident = _H.unpack_from(pkt, _B + 4)[0]
    words = _H.unpack_from(pkt, _B + 2)[0] + ident + _H.unpack_from(pkt, _B + 10)[0]
    return sum16(pkt[_B : _B + cs]) - words, ident


def _fix_ip(out: memoryview, version: int, total: int, ident: int, ip_fixed: int) -> None:
    """One segment's IP header: IPv4 total length, ID and header checksum (from the
    precomputed sum of the fixed words); IPv6 payload length."""
    if version == 4:
        _H.pack_into(out, 2, total)
        _H.pack_into(out, 4, ident)
        _H.pack_into(out, 10, finish(ip_fixed + total + ident))
    else:
        _H.pack_into(out, 4, total - 40)


def _split_tcp(
    pkt: memoryview,
    length: int,
    version: int,
    cs: int,
    hl: int,
    mss: int,
    count: int,
    addrs: memoryview,
    outs: Sequence[memoryview],
    sizes: list[int],
    first: int,
) -> int:
    th = _B + cs
    seq0 = _I.unpack_from(pkt, th + 4)[0]
    offbyte = pkt[th + 12] << 8
    fl = pkt[th + 13]
    # Fixed part of each segment's sum: pseudo-header addresses and protocol, the TCP header
    # without seq, the data-offset/flags word and the checksum (patched per segment).
    tcp_fixed = (
        sum16(pkt[th : _B + hl])
        - _H.unpack_from(pkt, th + 4)[0]
        - _H.unpack_from(pkt, th + 6)[0]
        - (offbyte | fl)
        - _H.unpack_from(pkt, th + 16)[0]
        + _from(addrs, "big")
        + IPPROTO_TCP
    )
    ip_fixed, ident = _ip_fixed(pkt, version, cs)
    fl_first = fl & ~(_TCP_FIN | _TCP_PSH) if count > 1 else fl
    fl_middle = fl & ~(_TCP_FIN | _TCP_PSH | _TCP_CWR)
    fl_last = fl & ~_TCP_CWR
    template = pkt[_B : _B + hl]
    pack_h, pack_i = _H.pack_into, _I.pack_into
    start = _B + hl
    end_all = _B + length
    for i in range(count):
        end = min(start + mss, end_all)
        total = hl + end - start
        out = outs[first + i]
        if len(out) < total:
            return NO_ROOM
        chunk = pkt[start:end]
        out[:hl] = template
        out[hl:total] = chunk
        data = sum16(chunk)
        _fix_ip(out, version, total, (ident + i) & 0xFFFF, ip_fixed)
        seq = (seq0 + i * mss) & 0xFFFFFFFF
        f = fl_first if i == 0 else (fl_last if i == count - 1 else fl_middle)
        pack_i(out, cs + 4, seq)
        out[cs + 13] = f
        csum = finish(tcp_fixed + total - cs + (seq >> 16) + (seq & 0xFFFF) + (offbyte | f) + data)
        pack_h(out, cs + 16, csum)
        sizes[first + i] = total
        start = end
    return count


def _split_udp(
    pkt: memoryview,
    length: int,
    version: int,
    cs: int,
    hl: int,
    size: int,
    count: int,
    addrs: memoryview,
    outs: Sequence[memoryview],
    sizes: list[int],
    first: int,
) -> int:
    uh = _B + cs
    # Ports and pseudo-header addresses/protocol; length (twice) and data are per segment.
    udp_fixed = (
        _H.unpack_from(pkt, uh)[0] + _H.unpack_from(pkt, uh + 2)[0] + _from(addrs, "big")
        + IPPROTO_UDP
    )  # fmt: skip
    ip_fixed, ident = _ip_fixed(pkt, version, cs)
    template = pkt[_B : _B + hl]
    pack_h = _H.pack_into
    start = _B + hl
    end_all = _B + length
    for i in range(count):
        end = min(start + size, end_all)
        total = hl + end - start
        out = outs[first + i]
        if len(out) < total:
            return NO_ROOM
        chunk = pkt[start:end]
        out[:hl] = template
        out[hl:total] = chunk
        data = sum16(chunk)
        _fix_ip(out, version, total, (ident + i) & 0xFFFF, ip_fixed)
        ulen = total - cs
        pack_h(out, cs + 4, ulen)
        pack_h(out, cs + 6, finish(udp_fixed + 2 * ulen + data))
        sizes[first + i] = total
        start = end
    return count
