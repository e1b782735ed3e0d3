"""UDP sockets for WireGuard: one SO_REUSEPORT group per family, batched non-blocking I/O.

The group is created in one go, in order, by the supervisor: the reuseport BPF program returns an
index into the group in join order (PROTOCOL.md "Linux facts"), so socket i is worker i's.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_PORT = struct.Struct("!H")
_V4_MAPPED = bytes(10) + b"\xff\xff"
_PORT0_ATTEMPTS = 20

# Per-datagram send failures that are the network's answer, not our bug: the caller counts a drop.
SEND_DROP_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.ENOBUFS,
        errno.EPERM,  # netfilter said no
        errno.EACCES,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.ECONNREFUSED,  # a queued ICMP error surfacing on this send
        errno.EADDRNOTAVAIL,
        errno.EMSGSIZE,
        errno.EAFNOSUPPORT,  # IPv6 endpoint on a host without IPv6
        errno.EINVAL,  # e.g. a v4-mapped destination on a V6ONLY socket
    }
)


class UdpStats:
    """Per-process error counters (each worker is its own process, so no sharing).

    recv_batch and send_to count here unless given another instance.
    """

    __slots__ = ("recv_errors", "send_errors", "last_recv_errno", "last_send_errno")

    def __init__(self) -> None:
        self.recv_errors = 0
        self.send_errors = 0
        self.last_recv_errno = 0
        self.last_send_errno = 0


STATS = UdpStats()


def _set_buf(sock: socket.socket, force: int, plain: int, size: int) -> None:
    """As root, *BUFFORCE bypasses net.core.[rw]mem_max; otherwise take what the cap allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _make(family: int, port: int, fwmark: int, rcvbuf: int, sndbuf: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        if rcvbuf:
            _set_buf(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            _set_buf(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def _open_v6(port: int, count: int, fwmark: int, rcvbuf: int, sndbuf: int) -> list[socket.socket]:
    """count V6ONLY sockets on port; [] when this host has no IPv6 at all."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(_make(socket.AF_INET6, port, fwmark, rcvbuf, sndbuf))
    except OSError as e:
        _close_all(socks)
        if e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
            return []
        raise
    return socks


def open_udp_group(
    port: int,
    count: int,
    *,
    fwmark: int = 0,
    ipv6: bool = True,
    rcvbuf: int = 4 << 20,
    sndbuf: int = 4 << 20,
) -> tuple[list[socket.socket], list[socket.socket], int]:
    """Open count IPv4 and count IPv6 (V6ONLY) reuseport sockets on one port, in join order.

    port 0: a free port is probed first (see _free_port); if it is lost to a race or its v6 side
    is taken, the whole group is retried on another port (bounded attempts).
    Returns (v4_socks, v6_socks, port); v6_socks is [] when ipv6=False or IPv6 is unavailable.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    attempts = _PORT0_ATTEMPTS if port == 0 else 1
    for attempt in range(attempts):
        v4: list[socket.socket] = []
        try:
            want = port or _free_port(ipv6)
            for _ in range(count):
                v4.append(_make(socket.AF_INET, want, fwmark, rcvbuf, sndbuf))
            v6 = _open_v6(want, count, fwmark, rcvbuf, sndbuf) if ipv6 else []
        except OSError as e:
            _close_all(v4)
            if e.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                continue  # lost the race for the probed port: probe again
            raise
        except BaseException:
            _close_all(v4)
            raise
        return v4, v6, want
    raise AssertionError("unreachable")  # pragma: no cover


def _free_port(ipv6: bool) -> int:
    """A port free on both families, found with plain (non-reuseport) probe sockets.

    Not "autobind the first reuseport socket": the kernel's autobind treats a port held by a
    reuseport group of the same uid as free, so our group could silently join a stranger's.
    A non-reuseport bind conflicts with everything, so the probed port was unused.
    """
    probe4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    probe6: socket.socket | None = None
    try:
        probe4.bind(("0.0.0.0", 0))
        got = int(probe4.getsockname()[1])
        if ipv6:
            try:
                probe6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                probe6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe6.bind(("::", got))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise
        return got
    finally:
        probe4.close()
        if probe6 is not None:
            probe6.close()


def recv_batch(
    sock: socket.socket,
    bufs: list[bytearray],
    views: list[memoryview],
    sizes: list[int],
    addrs: list[Any],
    max_packets: int,
    stats: UdpStats = STATS,
) -> int:
    """Receive up to max_packets datagrams into views[i] (sizes[i], addrs[i]); return the count.

    Stops at EAGAIN. Any other per-datagram OSError (ECONNREFUSED from a queued ICMP error, ...)
    is counted in stats.recv_errors and skipped; it uses up one of the max_packets attempts, so a
    socket stuck in error cannot spin the loop. bufs is unused here (views alias it), kept so
    callers hand over one consistent buffer set.
    """
    n = 0
    limit = min(max_packets, len(views))
    recv = sock.recvfrom_into
    for _ in range(limit):
        try:
            size, addr = recv(views[n])
        except BlockingIOError:
            break
        except OSError as e:
            stats.recv_errors += 1
            stats.last_recv_errno = e.errno or 0
            continue
        sizes[n] = size
        addrs[n] = addr
        n += 1
    return n


def send_to(
    sock: socket.socket,
    data: bytes | bytearray | memoryview,
    addr: Any,
    stats: UdpStats = STATS,
) -> bool:
    """sendto; False (counted in stats.send_errors) when the network refuses: SEND_DROP_ERRNOS."""
    try:
        sock.sendto(data, addr)
    except OSError as e:
        if e.errno not in SEND_DROP_ERRNOS:
            raise
        stats.send_errors += 1
        stats.last_send_errno = e.errno or 0
        return False
    return True


def sockaddr_bytes(addr: tuple[Any, ...]) -> bytes:
    """Packed source address for cookies: IP (4 or 16 bytes) + port (2 bytes, big-endian).

    An IPv4-mapped IPv6 address packs as IPv4, so one client gets one cookie whichever socket
    it reached; a zone suffix ("fe80::1%eth0") is dropped.
    """
    host = str(addr[0])
    port = _PORT.pack(int(addr[1]))
    if ":" not in host:
        return socket.inet_pton(socket.AF_INET, host) + port
    raw = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    if raw[:12] == _V4_MAPPED:
        return raw[12:] + port
    return raw + port
