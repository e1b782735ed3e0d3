"""Outbound batch seal, pure Python: the reference the native kernel (native/seal.c) must match.

`seal_run` takes what the TUN queue read (virtio_net_hdr + IP packet, maybe a TSO/USO
super-packet) or plain IP packets (a handoff ring), cuts each into segments as a NIC would
(io/segment.py documents the rules; the validation here is the same, so both refuse the same
inputs), pads each to 16 bytes within the MTU, takes the next send counter and seals it
straight into `out`, back to back: one run of datagrams for one endpoint, all of the first
one's size except a shorter last one, as UDP_SEGMENT wants. The caller sends the run with one
sendmsg and calls again where it stopped.

Nonce safety: no datagram is sealed with a counter at or past `limit` (the caller passes the
published reservation, capped at REJECT_AFTER_MESSAGES); the call returns there with LIMIT so
the caller can publish the next block first. With `sealer=None` nothing is encrypted: the run
holds the plain segments (for handoffs and staging), and the counter is not touched.

The reference may zero the (at most 15) padding bytes after a plain packet in its own writable
buffer, as seal_into always did, to encrypt without a copy; the native kernel leaves inputs
untouched (it builds the plaintext in `out`).

Result: (status, pos, seg, counter, count, size, used). `out[:used]` holds `count` datagrams of
`size` bytes (the last may be shorter); (pos, seg) is where to resume (packet, segment). status
is OK, LIMIT, or `-1 - DropReason` for the packet at the old `pos`, skipped (returned only when
the run is empty, so every drop is reported on its own).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from shardwg.io.segment import GSO_PROTOCOLS, v6_transport
from shardwg.io.vnet import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
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
from shardwg.proto.constants import PADDING_MULTIPLE, TAG_LEN, TRANSPORT_HEADER_SIZE, DropReason
from shardwg.proto.crypto import AEAD
from shardwg.proto.keypair import padded_length

OK = 0
LIMIT = 1
MALFORMED = -1 - DropReason.BAD_INNER_PACKET
TOO_BIG = -1 - DropReason.BAD_SIZE
OVERHEAD = TRANSPORT_HEADER_SIZE + TAG_LEN
MAX_PLAIN = 65535 + PADDING_MULTIPLE  # the largest segment plus padding

# The virtio_net_hdr, the GSO types and the checksum arithmetic are io's (vnet.py, segment.py);
# seal.c keeps its own copies in C.
_B = VNET_HDR_LEN
_H = struct.Struct("!H")
_I = struct.Struct("!I")
_HEADER = struct.Struct("<IIQ")
_COUNTER = struct.Struct("<Q")
_TRANSPORT = 4
_NONE, _TCP, _UDP = 0, IPPROTO_TCP, IPPROTO_UDP
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80
_from = int.from_bytes

_PADS = [bytes(k) for k in range(PADDING_MULTIPLE)]  # padding is at most 15 zero bytes


class Sealer:
    """One session's send key, built once per session (the native one holds an EVP context)."""

    __slots__ = ("aead", "nonce", "plain")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a send key is 32 bytes")
        self.aead = AEAD(key)
        self.nonce = bytearray(12)
        self.plain = memoryview(bytearray(MAX_PLAIN))


class _Plan:
    """How to cut one packet: what the header says, checked, plus the sums every segment
    shares (computed once per packet, not per segment)."""

    __slots__ = ("kind", "v4", "start", "length", "cs", "at", "hl", "mss", "count", "ip_fixed",
                 "ident", "l4_fixed", "seq0", "offbyte", "flags")  # fmt: skip
    kind: int
    v4: bool
    start: int
    length: int
    cs: int
    at: int
    hl: int
    mss: int
    count: int
    ip_fixed: int
    ident: int
    l4_fixed: int
    seq0: int
    offbyte: int
    flags: int


def plan(pkt: Any, n: int, vnet: bool) -> _Plan | int:
    """Validate pkt[:n] and say how to cut it; MALFORMED for anything a NIC would refuse."""
    p = _Plan()
    p.at = -1
    if not vnet:
        if n < 20 or n > len(pkt):
            return MALFORMED
        p.kind, p.start, p.length, p.count = _NONE, 0, n, 1
        return p
    if n < _B + 20 or n > len(pkt):
        return MALFORMED
    flags, gso_type, hdr_len, gso_size, cs, co = VNET.unpack_from(pkt, 0)
    length = n - _B
    p.start, p.length = _B, length
    if gso_type == GSO_NONE:
        p.kind, p.count = _NONE, 1
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if cs + co + 2 > length:
                return MALFORMED
            p.cs, p.at = cs, cs + co
        return p
    proto = GSO_PROTOCOLS.get(gso_type)
    if proto is None:
        return MALFORMED
    tcp = proto == _TCP
    version = pkt[_B] >> 4
    if version == 4:
        ihl = (pkt[_B] & 15) * 4
        if gso_type & 0x7F == GSO_TCPV6 or ihl < 20 or cs != ihl or pkt[_B + 9] != proto:
            return MALFORMED
        if _H.unpack_from(pkt, _B + 2)[0] != length or _H.unpack_from(pkt, _B + 6)[0] & 0x3FFF:
            return MALFORMED
        addrs = _from(pkt[_B + 12 : _B + 20], "big")
    elif version == 6:
        if gso_type & 0x7F == GSO_TCPV4 or length < 40:
            return MALFORMED
        if _H.unpack_from(pkt, _B + 4)[0] != length - 40:
            return MALFORMED
        if v6_transport(pkt, length) != (proto, cs):
            return MALFORMED
        addrs = _from(pkt[_B + 8 : _B + 40], "big")
    else:
        return MALFORMED
    if cs + (20 if tcp else 8) > length:
        return MALFORMED
    thl = (pkt[_B + cs + 12] >> 4) * 4 if tcp else 8
    hl = cs + thl
    if (tcp and thl < 20) or hl >= length or hdr_len > length:
        return MALFORMED
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and co != (TCP_CSUM_OFFSET if tcp else UDP_CSUM_OFFSET):
        return MALFORMED
    if gso_size == 0:
        return MALFORMED
    p.kind, p.v4, p.cs, p.hl, p.mss = proto, version == 4, cs, hl, gso_size
    p.count = (length - hl + gso_size - 1) // gso_size
    if version == 4:
        p.ident = _H.unpack_from(pkt, _B + 4)[0]
        words = length + p.ident + _H.unpack_from(pkt, _B + 10)[0]
        p.ip_fixed = sum16(pkt[_B : _B + cs]) - words
    else:
        p.ident = p.ip_fixed = 0
    th = _B + cs
    if tcp:
        p.seq0 = _I.unpack_from(pkt, th + 4)[0]
        p.offbyte = pkt[th + 12] << 8
        p.flags = pkt[th + 13]
        p.l4_fixed = (
            sum16(pkt[th : _B + hl]) - _H.unpack_from(pkt, th + 4)[0]
            - _H.unpack_from(pkt, th + 6)[0] - (p.offbyte | p.flags)
            - _H.unpack_from(pkt, th + 16)[0] + addrs + _TCP
        )  # fmt: skip
    else:
        p.l4_fixed = _H.unpack_from(pkt, th)[0] + _H.unpack_from(pkt, th + 2)[0] + addrs + _UDP
    return p


def segment_length(p: _Plan, i: int) -> int:
    """Length of segment i of plan p (an IP packet)."""
    if p.kind == _NONE:
        return p.length
    left = p.length - p.hl - i * p.mss
    return p.hl + (left if left < p.mss else p.mss)


def write_segment(p: _Plan, pkt: Any, i: int, out: memoryview) -> int:
    """Write segment i into out (headers fixed, checksums complete); return its length."""
    if p.kind == _NONE:
        n = p.length
        out[:n] = pkt[p.start : p.start + n]
        if p.at >= 0:
            _H.pack_into(out, p.at, finish(sum16(out[p.cs : n])))
        return n
    hl, cs = p.hl, p.cs
    begin = _B + hl + i * p.mss
    total = segment_length(p, i)
    chunk = pkt[begin : begin + total - hl]
    out[:hl] = pkt[_B : _B + hl]
    out[hl:total] = chunk
    data = sum16(chunk)
    if p.v4:
        ident = (p.ident + i) & 0xFFFF
        _H.pack_into(out, 2, total)
        _H.pack_into(out, 4, ident)
        _H.pack_into(out, 10, finish(p.ip_fixed + total + ident))
    else:
        _H.pack_into(out, 4, total - 40)
    if p.kind == _TCP:
        fl = p.flags
        if i > 0:
            fl &= ~_CWR
        if i < p.count - 1:
            fl &= ~(_FIN | _PSH)
        seq = (p.seq0 + i * p.mss) & 0xFFFFFFFF
        _I.pack_into(out, cs + 4, seq)
        out[cs + 13] = fl
        csum = finish(p.l4_fixed + total - cs + (seq >> 16) + (seq & 0xFFFF) + (p.offbyte | fl)
                      + data)  # fmt: skip
        _H.pack_into(out, cs + 16, csum)
    else:
        ulen = total - cs
        _H.pack_into(out, cs + 4, ulen)
        _H.pack_into(out, cs + 6, finish(p.l4_fixed + 2 * ulen + data))
    return total


def seal_run(
    sealer: Sealer | None,
    bufs: Sequence[Any],
    sizes: Sequence[int],
    pos: int,
    seg: int,
    end: int,
    vnet: bool,
    mtu: int,
    remote_index: int,
    counter: int,
    limit: int,
    out: Any,
    max_count: int,
    max_bytes: int,
) -> tuple[int, int, int, int, int, int, int]:
    """Seal (or, with sealer None, copy) segments of bufs[pos:end] into one run in out."""
    if not 0 <= pos <= end <= min(len(bufs), len(sizes)) or seg < 0 or mtu < 0 or max_count < 1:
        raise ValueError("bad batch bounds")
    if not (0 <= remote_index < 1 << 32 and 0 <= counter < 1 << 64 and 0 <= limit < 1 << 64):
        raise ValueError("remote index, counter or limit out of range")
    if sealer is not None and not isinstance(sealer, Sealer):
        raise TypeError("sealer must be a seal_ref.Sealer or None")
    view = memoryview(out)
    cap = len(view)
    max_bytes = min(max_bytes, cap)
    count = size = used = n = padded = 0
    closed = False
    hdr = _B if vnet else 0
    p: _Plan | None = None
    while pos < end:
        buf = bufs[pos]
        # Fast lane: a plain packet (no vnet header, or one saying neither GSO nor
        # NEEDS_CSUM; DATA_VALID changes nothing) is one segment, itself; plan() would say
        # the same, slower.
        fast = False
        if p is None:
            n = sizes[pos]
            if seg == 0 and hdr + 20 <= n <= len(buf) and not (vnet and (buf[0] & 1 or buf[1])):
                fast = True
            else:
                got = plan(buf, n, vnet)
                if isinstance(got, int):
                    if count:
                        break
                    return got, pos + 1, 0, counter, 0, 0, 0
                p = got
                if seg >= p.count:  # a resume point past the end: nothing left of it
                    pos, seg, p = pos + 1, 0, None
                    continue
        seglen = n - hdr if fast else segment_length(p, seg)  # type: ignore[arg-type]
        if sealer is None:
            dlen = seglen
        else:
            padded = padded_length(seglen, mtu)
            dlen = OVERHEAD + padded
        if count and (count >= max_count or closed or dlen > size or used + dlen > max_bytes):
            break
        if not count and dlen > cap:
            return TOO_BIG, pos + 1, 0, counter, 0, 0, 0
        if sealer is None:
            if fast:
                view[used : used + dlen] = buf[hdr:n]
            else:
                write_segment(p, buf, seg, view[used : used + dlen])  # type: ignore[arg-type]
        else:
            if counter >= limit:
                return LIMIT, pos, seg, counter, count, size, used
            if fast and type(buf) is memoryview and not buf.readonly and len(buf) >= hdr + padded:
                src = buf  # pad in place in the read buffer's headroom: no copy
                start = hdr
            else:
                src = sealer.plain
                start = 0
                if fast:
                    src[:seglen] = buf[hdr:n]
                else:
                    write_segment(p, buf, seg, src)  # type: ignore[arg-type]
            if padded > seglen:
                src[start + seglen : start + padded] = _PADS[padded - seglen]
            _HEADER.pack_into(view, used, _TRANSPORT, remote_index, counter)
            nonce = sealer.nonce
            _COUNTER.pack_into(nonce, 4, counter)
            sealer.aead.encrypt_into(nonce, src[start : start + padded], None,
                                     view[used + TRANSPORT_HEADER_SIZE : used + dlen])  # fmt: skip
            counter += 1
        if not count:
            size = dlen
        elif dlen < size:
            closed = True
        count += 1
        used += dlen
        if fast:
            pos += 1
        else:
            seg += 1
            if seg >= p.count:  # type: ignore[union-attr]
                pos, seg, p = pos + 1, 0, None
    return OK, pos, seg, counter, count, size, used
