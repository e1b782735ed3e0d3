"""Sending fast: sendmmsg(2) over payloads laid out once in one ctypes buffer (a million
datagrams is about a thousand system calls), from UDP sockets on several source ports
(`blast`) or from spoofed source addresses over a raw IP_HDRINCL socket (`spoof_blast`).
Bounded in count and in time, optionally paced."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_libc = ctypes.CDLL(None, use_errno=True)
_MAX_VLEN = 1024  # UIO_MAXIOV: the kernel caps one sendmmsg call at this many messages


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int


class MessageVector:
    """Payloads packed once into C memory with one mmsghdr each, for connected sockets."""

    def __init__(self, payloads: Sequence[bytes]) -> None:
        if not payloads:
            raise ValueError("no payloads")
        self.count = len(payloads)
        total = sum(len(p) for p in payloads)
        self._data = ctypes.create_string_buffer(b"".join(payloads), max(1, total))
        self._iov = (_IoVec * self.count)()
        self._msgs = (_MMsgHdr * self.count)()
        base = ctypes.addressof(self._data)
        off = 0
        for i, p in enumerate(payloads):
            self._iov[i].base = base + off
            self._iov[i].len = len(p)
            m = self._msgs[i].hdr
            m.iov = ctypes.addressof(self._iov[i])
            m.iovlen = 1
            off += len(p)
        self._base = ctypes.addressof(self._msgs)
        self._stride = ctypes.sizeof(_MMsgHdr)

    def send(self, fd: int, start: int, n: int) -> int:
        """sendmmsg messages [start, start + n) (n <= 1024); returns how many went, or -errno."""
        got = _libc.sendmmsg(fd, self._base + start * self._stride, n, 0)
        return got if got >= 0 else -ctypes.get_errno()


@dataclass
class BlastResult:
    """What a sender did: datagrams it tried, the kernel accepted, and errors it saw."""

    tried: int = 0
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0
    errnos: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def _pump(
    fds: Sequence[int],
    vec: MessageVector,
    count: int,
    rate: float | None,
    max_seconds: float,
    batch: int,
    stop: threading.Event | None = None,
) -> BlastResult:
    """Send `count` messages cycling over vec, round-robin over fds, one batch per call."""
    res = BlastResult()
    batch = max(1, min(batch, _MAX_VLEN))
    t0 = time.monotonic()
    deadline = t0 + max_seconds
    pos = 0
    turn = 0
    calls_left = count + 16  # every call moves >= 1 message or counts an error: bounded
    while res.tried < count and calls_left > 0:
        calls_left -= 1
        now = time.monotonic()
        if now >= deadline or (stop is not None and stop.is_set()):
            break
        if rate:
            ahead = res.tried / rate - (now - t0)
            if ahead > 0:
                time.sleep(min(ahead, 0.05))
        n = min(batch, vec.count - pos, count - res.tried)
        got = vec.send(fds[turn % len(fds)], pos, n)
        turn += 1
        if got < 0:
            err = -got
            res.errnos[err] = res.errnos.get(err, 0) + 1
            res.errors += 1
            res.tried += 1  # the first message of the batch failed; skip it
            got = 1
        else:
            res.tried += got
            res.sent += got
        pos = (pos + got) % vec.count
    res.seconds = time.monotonic() - t0
    return res


def blast(
    dst: str,
    port: int,
    payloads: Sequence[bytes],
    count: int,
    *,
    sources: int = 8,
    rate: float | None = None,
    max_seconds: float = 60.0,
    batch: int = 256,
    sndbuf: int = 4 << 20,
) -> BlastResult:
    """Send `count` UDP datagrams to dst:port cycling over `payloads`, from `sources` sockets
    (distinct source ports), at most `rate` per second, for at most `max_seconds`."""
    vec = MessageVector(payloads)
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    socks = [socket.socket(fam, socket.SOCK_DGRAM) for _ in range(max(1, sources))]
    try:
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            s.connect((dst, port))
        return _pump([s.fileno() for s in socks], vec, count, rate, max_seconds, batch)
    finally:
        for s in socks:
            s.close()


def _ip_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """IPv4 + UDP header in front of payload. The kernel fills the IP checksum and total
    length for IP_HDRINCL; a UDP checksum of 0 means "none", legal on IPv4."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0x4000, 64,
                     socket.IPPROTO_UDP, 0, src, dst)  # fmt: skip
    return ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def spoofed_packets(
    rng: random.Random, src_net: str, dst: str, port: int, payloads: Sequence[bytes], n: int
) -> list[bytes]:
    """n IPv4/UDP packets to dst:port, each from a random host of src_net and a random port,
    carrying payloads round-robin."""
    net = ipaddress.IPv4Network(src_net)
    first, size = int(net.network_address) + 1, max(1, net.num_addresses - 2)
    dst_b = socket.inet_aton(dst)
    out = []
    for i in range(n):
        src = struct.pack("!I", first + rng.randrange(size))
        out.append(_ip_udp(src, dst_b, rng.randint(1024, 65535), port,
                           payloads[i % len(payloads)]))  # fmt: skip
    return out


def spoof_blast(
    dst: str,
    packets: Sequence[bytes],
    count: int,
    *,
    rate: float | None = None,
    max_seconds: float = 60.0,
    batch: int = 256,
) -> BlastResult:
    """Send prebuilt IPv4 packets (spoofed_packets) over a raw IP_HDRINCL socket."""
    vec = MessageVector(packets)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.connect((dst, 0))
        return _pump([s.fileno()], vec, count, rate, max_seconds, batch)
    finally:
        s.close()
