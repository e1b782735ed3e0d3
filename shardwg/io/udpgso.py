"""UDP GSO (one sendmsg, many datagrams) and GRO (one recvmsg, many datagrams).

Sealed datagrams of one peer are equal-sized whenever their plaintexts are full segments, so
a batch of them leaves in one sendmsg with a UDP_SEGMENT cmsg: the kernel cuts the buffer
every segment_size bytes (the last piece may be shorter) and the per-datagram syscall cost
is paid once. The buffers may be separate: sendmsg gathers them (no copy on our side).

GSO fails with EIO when the route's device lacks checksum offload, and with EINVAL on kernels
or paths that refuse it: the batch is then resent one sendto per datagram, and if those go
through, the socket is remembered and never tries GSO again.

With UDP_GRO on, one recvmsg can return several datagrams of one sender glued together, with
the segment size in a cmsg; the caller walks the buffer in segment_size steps.
"""

from __future__ import annotations

import errno
import socket
import struct
import weakref
from collections.abc import Sequence
from typing import Any

from shardwg.io.udp import SEND_DROP_ERRNOS, STATS, UdpStats

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
# The kernel refuses more than UDP_MAX_SEGMENTS (64 before Linux 6.x's 128) in one send, and
# the whole datagram must fit 64 KiB with the IPv6 header.
MAX_SEGMENTS = 64
MAX_GSO_BYTES = 65535 - 8 - 40
GRO_BUFFER = 65535  # a GRO receive never returns more
_GSO_ERRNOS = frozenset({errno.EIO, errno.EINVAL})
_SEG = struct.Struct("=H")  # cmsg payloads are in host byte order
_GRO_INT = struct.Struct("=i")
_ANC_SIZE = socket.CMSG_SPACE(4)
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: `&` on the IntFlag member costs ~2 us
_no_gso: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_gso_ok: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_Buf = bytes | bytearray | memoryview


def gso_disabled(sock: socket.socket) -> bool:
    """True once this socket has been seen to refuse GSO (it sends one datagram per call)."""
    return sock in _no_gso


def send_gso(
    sock: socket.socket,
    bufs: _Buf | Sequence[_Buf],
    segment_size: int,
    count: int,
    addr: Any,
    stats: UdpStats = STATS,
) -> int:
    """Send `count` datagrams of segment_size bytes (the last may be shorter) to addr.

    bufs is one contiguous buffer holding them back to back, or a sequence of one buffer per
    datagram. Returns how many datagrams the kernel took; refusals in SEND_DROP_ERRNOS are
    counted in stats (never raised), other errors raise as from sendto.
    """
    if count <= 0:
        return 0
    if isinstance(bufs, bytes | bytearray | memoryview):
        parts: Sequence[_Buf] | None = None
        whole = memoryview(bufs)
    else:
        parts = bufs
        whole = memoryview(b"")
    if count == 1 or sock in _no_gso:
        return _send_each(sock, parts, whole, segment_size, count, addr, stats)
    per_call = min(MAX_SEGMENTS, MAX_GSO_BYTES // segment_size) if segment_size > 0 else 0
    if per_call < 2:
        return _send_each(sock, parts, whole, segment_size, count, addr, stats)
    sent = 0
    for first in range(0, count, per_call):
        n = min(per_call, count - first)
        if sock in _no_gso:
            sent += _send_each(sock, parts, whole, segment_size, n, addr, stats, first)
            continue
        if parts is None:
            iov: Sequence[_Buf] = (whole[first * segment_size : (first + n) * segment_size],)
        else:
            iov = parts[first : first + n]
        try:
            sock.sendmsg(iov, [(SOL_UDP, UDP_SEGMENT, _SEG.pack(segment_size))], 0, addr)
        except OSError as e:
            code = e.errno
            if code in _GSO_ERRNOS:
                got = _send_each(sock, parts, whole, segment_size, n, addr, stats, first)
                # Plain sends went through where GSO did not: GSO is the problem, unless it
                # worked on this socket before and the EINVAL is about this destination/size.
                if got and (code == errno.EIO or sock not in _gso_ok):
                    _no_gso.add(sock)
                sent += got
                continue
            if code not in SEND_DROP_ERRNOS:
                raise
            stats.send_errors += n
            stats.last_send_errno = code or 0
            continue
        _gso_ok.add(sock)
        sent += n
    return sent


def _send_each(
    sock: socket.socket,
    parts: Sequence[_Buf] | None,
    whole: memoryview,
    size: int,
    count: int,
    addr: Any,
    stats: UdpStats,
    first: int = 0,
) -> int:
    """The fallback: one sendto per datagram."""
    sent = 0
    for i in range(first, first + count):
        data = parts[i] if parts is not None else whole[i * size : (i + 1) * size]
        try:
            sock.sendto(data, addr)
        except OSError as e:
            if e.errno not in SEND_DROP_ERRNOS:
                raise
            stats.send_errors += 1
            stats.last_send_errno = e.errno or 0
            continue
        sent += 1
    return sent


def enable_gro(sock: socket.socket) -> bool:
    """Ask for UDP_GRO; False when the kernel does not know it (then every receive is one
    datagram and recv_gro still works)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def recv_gro(
    sock: socket.socket, buf: bytearray | memoryview, stats: UdpStats = STATS
) -> tuple[int, int, Any] | None:
    """One recvmsg into buf (make it GRO_BUFFER bytes): (total length, segment size, address),
    or None when nothing is pending. Datagrams are buf[k*seg:(k+1)*seg] (the last may be
    shorter); without a UDP_GRO cmsg the whole receive is one datagram (seg == total).
    A truncated receive (buf too small) or a queued socket error is counted and skipped.
    """
    for _ in range(4):  # bounded: a socket stuck in error cannot spin the caller
        try:
            n, anc, flags, addr = sock.recvmsg_into((buf,), _ANC_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            stats.recv_errors += 1
            stats.last_recv_errno = e.errno or 0
            continue
        if flags & _MSG_TRUNC:
            stats.recv_errors += 1
            stats.last_recv_errno = errno.EMSGSIZE
            continue
        seg = n
        for level, kind, data in anc:
            if level == SOL_UDP and kind == UDP_GRO:
                if len(data) >= 4:
                    seg = _GRO_INT.unpack_from(data)[0]
                elif len(data) >= 2:
                    seg = _SEG.unpack_from(data)[0]
        return n, (seg if 0 < seg < n else n), addr
    return None



class GsoBatcher:
    """Seal datagrams straight into one contiguous buffer and send each run of them that goes
    to one address in one size (the last may be shorter) with one send_gso.

    Use: `out = b.room(max_size)`, seal into out, `b.add(sock, size, addr)`; `b.flush()` at
    the end of the batch. A datagram that cannot join the open run flushes it first, so order
    per destination is kept. add/flush return how many datagrams the kernel refused.
    """

    def __init__(self, capacity: int = 1 << 17, stats: UdpStats = STATS) -> None:
        self.buf = memoryview(bytearray(capacity))
        self.stats = stats
        self.used = 0  # bytes sealed into buf
        self.start = 0  # where the open run begins
        self.count = 0  # datagrams in the open run
        self.size = 0  # the open run's segment size
        self.closed = False  # a shorter datagram ended the open run
        self.sock: socket.socket | None = None
        self.addr: Any = None
        self.sent = 0
        self.sent_bytes = 0

    def room(self, need: int) -> memoryview:
        """Where to seal the next datagram (need bytes at most); sends everything first when
        the buffer is too full."""
        if self.used + need > len(self.buf):
            self.flush()
            self.used = self.start = 0
        return self.buf[self.used :]

    def add(self, sock: socket.socket, size: int, addr: Any) -> int:
        """Count the size bytes just sealed at room() into the batch; returns drops."""
        dropped = 0
        if self.count and not (
            sock is self.sock
            and addr == self.addr
            and not self.closed
            and size <= self.size
            and self.count < MAX_SEGMENTS
            and self.used - self.start + size <= MAX_GSO_BYTES
        ):
            dropped = self.flush()
        if not self.count:
            self.start, self.size, self.closed = self.used, size, False
            self.sock, self.addr = sock, addr
        elif size < self.size:
            self.closed = True
        self.count += 1
        self.used += size
        return dropped

    def flush(self) -> int:
        """Send the open run; returns how many of its datagrams were refused."""
        count = self.count
        if not count or self.sock is None:
            return 0
        self.count = 0
        data = self.buf[self.start : self.used]
        sent = send_gso(self.sock, data, self.size, count, self.addr, self.stats)
        self.sent += sent
        self.sent_bytes += len(data) if sent == count else sent * self.size
        self.start = self.used
        return count - sent
