"""The mesh of SPSC rings between workers, and the eventfds that wake them.

Why: a packet read by worker `src` but owned by worker `dst` (a plaintext packet
on the wrong TUN queue, an initiation for a peer `src` does not own) goes into
rings[src][dst]. One ring per ordered pair keeps every ring single-producer
single-consumer, hence lock-free; a flow always takes the same ring, so order
is kept.

Rings are laid out src-major, skipping src == dst, each `SpscRing.size` bytes.
Ring objects are built lazily: a worker touches only its 2(N-1) rings, not all
N(N-1) (each ring holds one memoryview per slot).

Wake-ups: one eventfd per worker, polled by that worker. A producer pushes its
whole batch, then calls `wake(dst)` once; the consumer calls `clear_wake` before
draining its incoming rings, so a push that races the drain leaves the eventfd
readable and is picked up on the next turn (never lost).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from enum import IntEnum
from typing import Any

from shardwg.proto.constants import INITIATION_SIZE
from shardwg.shm.ring import SpscRing


class HandoffKind(IntEnum):
    """The `kind` of a handoff record."""

    TUN_PACKET = 1  # a plaintext IP packet read on the wrong TUN queue
    INITIATION = 2  # a handshake initiation received by a non-owner, with its source
    TRANSPORT = 3  # a transport datagram under a session its worker gave away (placement move)
    RELEASE = 4  # the sender gave the peer whose public key this is to the receiver


# family (4 or 6), port, address (IPv4 in the first 4 bytes), IPv6 scope id.
_ADDR = struct.Struct("<BH16sI")
ADDR_SIZE = _ADDR.size
INITIATION_PAYLOAD_SIZE = ADDR_SIZE + INITIATION_SIZE


def addr_fields(addr: tuple[Any, ...] | None) -> tuple[int, int, bytes, int]:
    """(family, port, 16-byte address, scope id) of a socket address tuple; None -> zeros.

    Tuples are (ip, port) for IPv4 and (ip, port, flowinfo, scope_id) for IPv6.
    """
    if addr is None:
        return (0, 0, bytes(16), 0)
    try:
        host = str(addr[0])
        if len(addr) == 2 and 0 <= addr[1] <= 0xFFFF:
            return (4, addr[1], socket.inet_pton(socket.AF_INET, host), 0)
        if len(addr) == 4 and 0 <= addr[1] <= 0xFFFF and 0 <= addr[3] <= 0xFFFFFFFF:
            # recvfrom spells link-local sources "fe80::1%eth0"; the scope travels as the index.
            return (6, addr[1], socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), addr[3])
    except (OSError, TypeError, IndexError) as exc:
        raise ValueError(f"not a socket address: {addr!r}") from exc
    raise ValueError(f"not a socket address: {addr!r}")


def addr_from_fields(family: int, port: int, raw: bytes, scope: int) -> tuple[Any, ...] | None:
    """Inverse of addr_fields: (ip, port), (ip, port, 0, scope_id) as recvfrom spells it, or None.

    flowinfo is not kept (0 on our sockets). ValueError on an unknown family byte.
    """
    if family == 4:
        return (socket.inet_ntop(socket.AF_INET, raw[:4]), port)
    if family == 0:
        return None
    if family != 6:
        raise ValueError(f"bad address family byte {family}")
    host = socket.inet_ntop(socket.AF_INET6, raw)
    if scope and ipaddress.IPv6Address(host).is_link_local:
        try:
            host = f"{host}%{socket.if_indextoname(scope)}"
        except OSError:  # interface gone: the index still routes the reply
            host = f"{host}%{scope}"
    return (host, port, 0, scope)


def pack_initiation(msg: bytes | bytearray | memoryview, addr: tuple[Any, ...]) -> bytes:
    """Payload of an INITIATION handoff: the packed source address, then the message."""
    if len(msg) != INITIATION_SIZE:
        raise ValueError(f"initiation must be {INITIATION_SIZE} bytes, got {len(msg)}")
    return _ADDR.pack(*addr_fields(addr)) + bytes(msg)


def unpack_initiation(payload: bytes | bytearray | memoryview) -> tuple[bytes, tuple[Any, ...]]:
    """(message bytes, source address tuple); ValueError on a malformed payload."""
    if len(payload) != INITIATION_PAYLOAD_SIZE:
        raise ValueError(f"initiation handoff must be {INITIATION_PAYLOAD_SIZE} bytes")
    addr = addr_from_fields(*_ADDR.unpack_from(payload, 0))
    if addr is None:
        raise ValueError("initiation handoff without a source address")
    return bytes(payload[ADDR_SIZE:]), addr


def pack_transport(msg: bytes | bytearray | memoryview, addr: tuple[Any, ...]) -> bytes:
    """Payload of a TRANSPORT handoff: the packed source address, then the datagram."""
    return _ADDR.pack(*addr_fields(addr)) + bytes(msg)


def unpack_transport(payload: bytes | bytearray | memoryview) -> tuple[memoryview, tuple[Any, ...]]:
    """(datagram view, source address); ValueError on a malformed payload."""
    if len(payload) <= ADDR_SIZE:
        raise ValueError("transport handoff too short")
    addr = addr_from_fields(*_ADDR.unpack_from(payload, 0))
    if addr is None:
        raise ValueError("transport handoff without a source address")
    return memoryview(payload)[ADDR_SIZE:], addr


class HandoffMesh:
    """rings[src][dst] for src != dst: worker src hands a packet to worker dst.

    One eventfd per worker wakes it (`eventfds` None: no wake-ups, e.g. readers/tests).
    """

    def __init__(
        self,
        buf: Any,
        offset: int,
        workers: int,
        slots: int = 256,
        slot_size: int = 2048,
        eventfds: list[int] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a mesh needs at least one worker")
        if eventfds is not None and len(eventfds) != workers:
            raise ValueError(f"{len(eventfds)} eventfds for {workers} workers")
        if offset < 0 or offset + self.size(workers, slots, slot_size) > len(memoryview(buf)):
            raise ValueError("handoff mesh does not fit in the buffer")
        self.buf = buf
        self.offset = offset
        self.workers = workers
        self.slots = slots
        self.slot_size = slot_size
        self.eventfds = eventfds
        self._ring_size = SpscRing.size(slots, slot_size)
        self._rings: dict[tuple[int, int], SpscRing] = {}

    @staticmethod
    def size(workers: int, slots: int, slot_size: int) -> int:
        return workers * (workers - 1) * SpscRing.size(slots, slot_size)

    def _ring_offset(self, src: int, dst: int) -> int:
        n = self.workers
        if not (0 <= src < n and 0 <= dst < n) or src == dst:
            raise ValueError(f"no ring from worker {src} to worker {dst} (of {n})")
        pos = src * (n - 1) + (dst if dst < src else dst - 1)
        return self.offset + pos * self._ring_size

    def ring(self, src: int, dst: int) -> SpscRing:
        key = (src, dst)
        r = self._rings.get(key)
        if r is None:
            r = SpscRing(self.buf, self._ring_offset(src, dst), self.slots, self.slot_size)
            self._rings[key] = r
        return r

    def outgoing(self, src: int) -> list[SpscRing | None]:
        """Worker src's producer ends, indexed by dst (None at src itself)."""
        return [None if dst == src else self.ring(src, dst) for dst in range(self.workers)]

    def incoming(self, dst: int) -> list[SpscRing]:
        """Worker dst's consumer ends, in src order (src != dst)."""
        return [self.ring(src, dst) for src in range(self.workers) if src != dst]

    @staticmethod
    def make_eventfds(workers: int) -> list[int]:
        """One non-blocking eventfd per worker, created by the supervisor before forking.

        Not EFD_CLOEXEC: forked workers inherit fds either way, and leaving the flag
        off also lets a worker be started by fork+exec with the fds passed through.
        Other children (subprocess) do not get them: subprocess closes fds by default.
        """
        return [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(workers)]

    @staticmethod
    def close_eventfds(fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def wake(self, dst: int) -> None:
        """Make dst's eventfd readable (EAGAIN means it already is, overflowing)."""
        if self.eventfds is None:
            return
        try:
            os.eventfd_write(self.eventfds[dst], 1)
        except BlockingIOError:
            pass

    def clear_wake(self, dst: int) -> None:
        """Reset dst's eventfd before draining (EAGAIN: it was not readable)."""
        if self.eventfds is None:
            return
        try:
            os.eventfd_read(self.eventfds[dst])
        except BlockingIOError:
            pass

    def release(self) -> None:
        """Release every ring's views so the mmap under the mesh can be closed."""
        for r in self._rings.values():
            r.release()
        self._rings.clear()
