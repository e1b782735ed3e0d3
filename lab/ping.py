"""ICMP echo from inside a namespace, over raw sockets so no ping binary or its output format
is involved; counts replies for pass/fail checks and times them for reports."""

from __future__ import annotations

import contextlib
import errno
import secrets
import select
import socket
import struct
import time

from lab.netns import Namespace, is_v6


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data, as it goes into an IP, ICMP, UDP or TCP header."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def icmp_rtts(addr: str, count: int, timeout: float, interval: float = 0.2) -> list[float]:
    """Send echo requests from the current namespace until `count` replies arrive or timeout;
    returns the round-trip times (ms) of the replies seen, in sequence order."""
    v6 = is_v6(addr)
    fam, proto = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    )
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    ident = secrets.randbits(16)
    sent_at: dict[int, float] = {}
    got: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        seq, next_send = 0, 0.0
        while len(got) < count and seq < 10_000:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_send:
                seq += 1
                body = struct.pack("!HH", ident, seq) + b"shardwg-ping"
                hdr = struct.pack("!BBH", req_type, 0, 0)
                csum = 0 if v6 else checksum(hdr + body)  # the kernel fills ICMPv6's
                sent_at[seq] = time.monotonic()
                with contextlib.suppress(OSError):  # unreachable now may work later
                    s.sendto(struct.pack("!BBH", req_type, 0, csum) + body, (addr, 0))
                next_send = now + interval
            if not select.select([s], [], [], max(0.0, min(next_send, deadline) - now))[0]:
                continue
            pkt = s.recv(2048)
            arrived = time.monotonic()
            icmp = pkt if v6 else pkt[(pkt[0] & 0x0F) * 4 :]
            if len(icmp) >= 8 and icmp[0] == rep_type:
                rid, rseq = struct.unpack_from("!HH", icmp, 4)
                if rid == ident and rseq in sent_at and rseq not in got:
                    got[rseq] = (arrived - sent_at[rseq]) * 1000
    return [got[k] for k in sorted(got)]


def icmp_echo(addr: str, count: int, timeout: float, interval: float = 0.2) -> int:
    """Like icmp_rtts, but only the number of replies (ping -c N -w T's verdict)."""
    return len(icmp_rtts(addr, count, timeout, interval))


def ping_rtts(
    ns: Namespace, addr: str, count: int = 3, timeout: float = 10, interval: float = 0.2
) -> list[float]:
    """Round-trip times (ms) of the replies `count` echoes from ns to addr got within timeout;
    an unreachable network yields no replies rather than an error."""
    try:
        rtts: list[float] = ns.call(
            icmp_rtts, addr, count, timeout, interval, timeout=timeout + 10
        )
    except OSError as e:
        if e.errno == errno.ENETUNREACH:
            return []
        raise
    return rtts


def ping(ns: Namespace, addr: str, count: int = 3, timeout: float = 10) -> bool:
    """True when `count` echo replies from addr arrive within timeout (like ping -c N -w T)."""
    return len(ping_rtts(ns, addr, count, timeout)) >= count
