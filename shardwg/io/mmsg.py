"""recvmmsg through ctypes: many UDP receives (each possibly a GRO batch) in one system call.

Why: a peer that does not send GSO batches (wireguard-go 0.0.20220316, most kernels' own
WireGuard) costs one `recvmsg_into` per datagram, ~4.5 us in CPython once the address tuple
and the ancillary list are built. Python has no recvmmsg; libc does. One ctypes call fills up
to `slots` preallocated buffers, and the per-message results (length, GRO segment size, flags,
source address) are read from the mmsghdr array with one precompiled struct per message:
~2 us per datagram measured on loopback (tests/test_mmsg.py prints both).

Layout (x86-64 and every LP64 Linux): struct msghdr is 56 bytes (name 8, namelen 4 + pad,
iov 8, iovlen 8, control 8, controllen 8, flags 4 + pad) and struct mmsghdr adds msg_len
(4 + pad): 64 bytes. The kernel rewrites namelen, controllen, flags and msg_len of every
message it fills, so the receiver resets namelen and controllen before the next call.

Source addresses are returned as the tuples Python's socket module would build ((host, port)
for IPv4, (host, port, flowinfo, scope_id) for IPv6), cached by their raw sockaddr bytes so a
steady peer costs one dict lookup; the cache is cleared when it grows past CACHE_MAX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
from typing import Any

from shardwg.io.udp import STATS, UdpStats
from shardwg.io.udpgso import GRO_BUFFER, SOL_UDP, UDP_GRO

CACHE_MAX = 4096
NAME_SIZE = 28  # sizeof(struct sockaddr_in6)
CTRL_SIZE = 32  # one cmsg with an int: CMSG_SPACE(4) = 24, rounded up
_MSGHDR = struct.Struct("=QI4xQQQQi4xI4x")  # one struct mmsghdr: 64 bytes
# what the kernel fills in: namelen, controllen, flags, msg_len
_RESULT = struct.Struct("=8xI4x24xQi4xI4x")
_CMSG = struct.Struct("=Qii")  # cmsg_len, cmsg_level, cmsg_type; the data follows at 16
_GRO_INT = struct.Struct("=i")
_PORT = struct.Struct("!H")
_V6_TAIL = struct.Struct("=I16sI")  # flowinfo (network order bytes read raw), addr, scope
MSG_DONTWAIT = int(socket.MSG_DONTWAIT)  # plain ints: `&` on an IntFlag costs ~2 us
MSG_TRUNC = int(socket.MSG_TRUNC)
_MISSING = object()
assert _MSGHDR.size == _RESULT.size == 64


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _libc_recvmmsg() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_recvmmsg = _libc_recvmmsg()


def available() -> bool:
    """libc has recvmmsg and the platform is LP64 (the layout above)."""
    return _recvmmsg is not None and ctypes.sizeof(ctypes.c_void_p) == 8


def sockaddr_tuple(raw: bytes) -> tuple[Any, ...] | None:
    """The Python socket address for a raw sockaddr_in / sockaddr_in6 (None for others)."""
    family = int.from_bytes(raw[:2], "little")
    if family == socket.AF_INET and len(raw) >= 8:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), _PORT.unpack_from(raw, 2)[0])
    if family == socket.AF_INET6 and len(raw) >= NAME_SIZE:
        flow_raw, addr, scope = _V6_TAIL.unpack_from(raw, 4)
        flowinfo = int.from_bytes(flow_raw.to_bytes(4, "little"), "big")
        return (socket.inet_ntop(socket.AF_INET6, addr), _PORT.unpack_from(raw, 2)[0],
                flowinfo, scope)  # fmt: skip
    return None


class BatchReceiver:
    """Preallocated buffers for `slots` receives of up to GRO_BUFFER bytes each.

    After `recv(sock)` returns k, message i < k is views[i][:lengths[i]], cut into datagrams
    of segs[i] bytes (the last may be shorter), from addrs[i]; lengths[i] == -1 marks a
    message that was truncated (counted, to be skipped).
    """

    def __init__(self, slots: int = 16, size: int = GRO_BUFFER) -> None:
        if not available():
            raise OSError(errno.ENOSYS, "recvmmsg is not available here")
        self.slots = slots
        self.size = size
        self._data = (ctypes.c_char * (slots * size))()
        self._names = (ctypes.c_char * (slots * NAME_SIZE))()
        self._ctrl = (ctypes.c_char * (slots * CTRL_SIZE))()
        self._iovs = (_Iovec * slots)()
        self._msgs = (ctypes.c_char * (slots * _MSGHDR.size))()
        data = memoryview(self._data).cast("B")
        self.data = data  # message i is data[i * size:][:lengths[i]]
        self.views = [data[i * size : (i + 1) * size] for i in range(slots)]
        self._names_view = memoryview(self._names).cast("B")
        self._ctrl_view = memoryview(self._ctrl).cast("B")
        self._msgs_view = memoryview(self._msgs).cast("B")
        base, names, ctrl = (ctypes.addressof(x) for x in (self._data, self._names, self._ctrl))
        for i in range(slots):
            self._iovs[i].base = base + i * size
            self._iovs[i].len = size
            _MSGHDR.pack_into(self._msgs_view, i * _MSGHDR.size,
                              names + i * NAME_SIZE, NAME_SIZE,
                              ctypes.addressof(self._iovs[i]), 1,
                              ctrl + i * CTRL_SIZE, CTRL_SIZE, 0, 0)  # fmt: skip
        self._msgs_addr = ctypes.addressof(self._msgs)
        self._template = bytes(self._msgs_view)  # the array as built: restored after each call
        self.lengths = [0] * slots
        self.segs = [0] * slots
        self.addrs: list[Any] = [None] * slots
        self._cache: dict[bytes, Any] = {}

    def recv(self, sock: socket.socket, stats: UdpStats = STATS) -> int:
        """Receive up to `slots` messages without blocking; 0 when none is pending. Truncated
        messages and socket errors are counted in `stats` and skipped."""
        fd = sock.fileno()
        for _ in range(4):  # bounded: a socket stuck in error cannot spin the caller
            n = _recvmmsg(fd, self._msgs_addr, self.slots, MSG_DONTWAIT, None)
            if n >= 0:
                return self._collect(n, stats)
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            if err == errno.EINTR:
                continue
            stats.recv_errors += 1  # a queued ICMP error and the like: the next call goes on
            stats.last_recv_errno = err
        return 0

    def _collect(self, n: int, stats: UdpStats) -> int:
        msgs, ctrl = self._msgs_view, self._ctrl_view
        end = n * _MSGHDR.size
        results = _RESULT.iter_unpack(bytes(msgs[:end]))  # a copy: the restore comes next
        names = bytes(self._names_view[: n * NAME_SIZE])
        # the kernel rewrote namelen and controllen: give the next call the full room again
        msgs[:end] = self._template[:end]
        cache = self._cache
        lengths, segs, addrs = self.lengths, self.segs, self.addrs
        for i, (namelen, controllen, flags, length) in enumerate(results):
            if flags & MSG_TRUNC:
                stats.recv_errors += 1
                stats.last_recv_errno = errno.EMSGSIZE
                lengths[i] = -1  # skipped
                continue
            seg = length
            if controllen >= 20:
                _len, level, kind = _CMSG.unpack_from(ctrl, i * CTRL_SIZE)
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = _GRO_INT.unpack_from(ctrl, i * CTRL_SIZE + 16)[0]
            raw = names[i * NAME_SIZE : i * NAME_SIZE + namelen]
            addr = cache.get(raw, _MISSING)
            if addr is _MISSING:
                if len(cache) >= CACHE_MAX:
                    cache.clear()
                addr = cache[raw] = sockaddr_tuple(raw)
            lengths[i] = length
            segs[i] = seg if 0 < seg < length else length
            addrs[i] = addr
        return n
