"""UDP for the real worker without root, as wireguard-go's `conn/bindtest` is for its device.

Why real sockets: the worker's receive path is recvmmsg through ctypes with UDP_GRO, its
send path sendmsg with UDP_SEGMENT, its flood guard a socket filter, and the gateway's
steering a reuseport cBPF program. All of that works for an unprivileged user on
127.0.0.1, so nothing is faked: `LoopbackGroup` is the supervisor's reuseport group
(same options, join order, steering attached), bound to loopback instead of every address.

What the kernel decides, the test can still choose: `sender_towards` finds a source socket
whose datagrams the group's hash sends to a given member (initiations carry no worker id,
so this is how an initiation lands on a worker that does not own the peer). `Wire` stands
between two gateways like bindtest's channel pairs: every datagram is recorded, and the
test forwards, drops or replays them.
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from shardwg.io import steering

LOOPBACK = "127.0.0.1"
PROBE = b"?"  # a runt: the steering program hashes it like an initiation
SENDER_ATTEMPTS = 256  # each attempt lands on the wanted member with chance 1/N


def _udp(port: int = 0, reuseport: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((LOOPBACK, port))
    except BaseException:
        sock.close()
        raise
    return sock


class LoopbackGroup:
    """N reuseport sockets on one loopback port, joined in order, steered by receiver index
    (`io/udp.open_udp_group` + `io/steering.attach`, on 127.0.0.1)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("a group needs at least one socket")
        first = _udp(reuseport=True)
        self.port = int(first.getsockname()[1])
        self.socks = [first]
        try:
            for _ in range(n - 1):
                self.socks.append(_udp(self.port, reuseport=True))
            steering.attach(first, n)
        except BaseException:
            self.close()
            raise

    @property
    def addr(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def member_hit(self, timeout: float = 1.0) -> int | None:
        """Which member holds a waiting datagram (read and discarded); None if none does."""
        ready, _, _ = select.select(self.socks, [], [], timeout)
        for sock in ready:
            try:
                sock.recvfrom(2048)
            except BlockingIOError:
                continue
            return self.socks.index(sock)
        return None

    def sender_towards(self, member: int) -> socket.socket:
        """A fresh loopback socket whose datagrams the group hashes to `member` (probed with
        runts, so call it before workers read the group)."""
        for _ in range(SENDER_ATTEMPTS):
            sock = _udp()
            sock.sendto(PROBE, self.addr)
            hit = self.member_hit()
            if hit == member:
                return sock
            sock.close()
        raise RuntimeError(f"no source port hashed to member {member} in {SENDER_ATTEMPTS} tries")

    def close(self) -> None:
        for s in self.socks:
            s.close()


@dataclass
class Datagram:
    direction: str  # "a>b" or "b>a"
    data: bytes
    at: float


@dataclass
class Wire:
    """A recorded UDP path between gateway A and gateway B, driven by the test.

    A sends to `for_a` (configure it as B's endpoint at A); B sees everything coming from
    `for_b` (pass a socket from `sender_towards` to choose which of B's workers the hash
    picks). `pump()` forwards what is waiting and records it; `hold` drops instead.
    """

    b_addr: tuple[str, int]
    for_b: socket.socket = field(default_factory=_udp)
    for_a: socket.socket = field(default_factory=_udp)
    a_addr: tuple[Any, ...] | None = None  # learned from A's first datagram
    log: list[Datagram] = field(default_factory=list)
    hold: bool = False

    @property
    def a_endpoint(self) -> tuple[str, int]:
        """Where A sends to reach B."""
        return (LOOPBACK, int(self.for_a.getsockname()[1]))

    def pump(self, timeout: float = 0.0) -> int:
        """Forward every datagram waiting on either side (waiting up to `timeout` for the
        first); returns how many moved."""
        moved = 0
        ready, _, _ = select.select([self.for_a, self.for_b], [], [], timeout)
        while ready:
            for sock in ready:
                try:
                    data, src = sock.recvfrom(1 << 16)
                except BlockingIOError:
                    continue
                if sock is self.for_a:
                    self.a_addr = src
                    self._forward("a>b", data)
                else:
                    self._forward("b>a", data)
                moved += 1
            ready, _, _ = select.select([self.for_a, self.for_b], [], [], 0)
        return moved

    def _forward(self, direction: str, data: bytes) -> None:
        self.log.append(Datagram(direction, data, time.monotonic()))
        if not self.hold:
            self.inject(direction, data)

    def inject(self, direction: str, data: bytes) -> None:
        """Send `data` as if it crossed the wire now (a replay, a forgery)."""
        if direction == "a>b":
            self.for_b.sendto(data, self.b_addr)
        elif self.a_addr is not None:
            self.for_a.sendto(data, self.a_addr)
        else:
            raise RuntimeError("A has not sent anything yet: its address is unknown")

    def sent(self, direction: str, kind: int | None = None) -> list[bytes]:
        """Recorded datagrams one way, optionally of one WireGuard message type."""
        return [
            d.data
            for d in self.log
            if d.direction == direction and (kind is None or d.data[:1] == bytes([kind]))
        ]

    def close(self) -> None:
        self.for_a.close()
        self.for_b.close()
