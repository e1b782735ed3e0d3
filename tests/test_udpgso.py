"""shardwg.io.udpgso: GSO sends and GRO receives on loopback, and the per-socket fallback."""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
from typing import Any

import pytest

from shardwg.io import udpgso
from shardwg.io.udp import UdpStats

SIZE = 1452


def _pair(v6: bool = False, gro: bool = False) -> tuple[socket.socket, socket.socket, Any]:
    fam, host = (socket.AF_INET6, "::1") if v6 else (socket.AF_INET, "127.0.0.1")
    rx = socket.socket(fam, socket.SOCK_DGRAM)
    rx.bind((host, 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    if gro:
        assert udpgso.enable_gro(rx)
    tx = socket.socket(fam, socket.SOCK_DGRAM)
    return tx, rx, rx.getsockname()


def _drain(rx: socket.socket, want: int) -> list[bytes]:
    got = []
    rx.settimeout(2)
    for _ in range(want):
        got.append(rx.recv(70000))
    rx.setblocking(False)
    try:
        extra = rx.recv(70000)
    except BlockingIOError:
        return got
    raise AssertionError(f"more datagrams than sent: {len(extra)} bytes")


def _datagrams(count: int, size: int = SIZE, last: int = 1000) -> list[bytes]:
    out = [os.urandom(size) for _ in range(count - 1)]
    return out + [os.urandom(last)]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("count", [1, 2, 16, 44, 64, 100])
def test_send_gso_contiguous(v6: bool, count: int) -> None:
    tx, rx, addr = _pair(v6)
    with tx, rx:
        dgrams = _datagrams(count)
        assert udpgso.send_gso(tx, b"".join(dgrams), SIZE, count, addr) == count
        assert _drain(rx, count) == dgrams
        assert not udpgso.gso_disabled(tx)


def test_send_gso_separate_buffers_and_chunks() -> None:
    tx, rx, addr = _pair()
    with tx, rx:
        dgrams = _datagrams(150, 300, 7)  # more than 64 per call: several sendmsg
        views = [memoryview(bytearray(d)) for d in dgrams]
        assert udpgso.send_gso(tx, views, 300, 150, addr) == 150
        assert _drain(rx, 150) == dgrams


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_recv_gro_reports_segment_size(v6: bool) -> None:
    tx, rx, addr = _pair(v6, gro=True)
    with tx, rx:
        dgrams = _datagrams(20)
        assert udpgso.send_gso(tx, dgrams, SIZE, 20, addr) == 20
        buf = bytearray(udpgso.GRO_BUFFER)
        rx.setblocking(False)
        select.select([rx], [], [], 2)
        got: list[bytes] = []
        segs = set()
        while (res := udpgso.recv_gro(rx, buf)) is not None:
            total, seg, src = res
            assert src[1] == tx.getsockname()[1]
            got += [bytes(buf[i : min(i + seg, total)]) for i in range(0, total, seg)]
            segs.add(seg)
        assert got == dgrams
        assert segs == {SIZE}  # loopback keeps the GSO batch whole


def test_recv_gro_plain_datagram_and_empty() -> None:
    tx, rx, addr = _pair(gro=True)
    with tx, rx:
        rx.setblocking(False)
        buf = bytearray(udpgso.GRO_BUFFER)
        assert udpgso.recv_gro(rx, buf) is None
        tx.sendto(b"one", addr)
        select.select([rx], [], [], 2)
        res = udpgso.recv_gro(rx, buf)
        assert res is not None and res[:2] == (3, 3) and res[2][1] == tx.getsockname()[1]


def test_recv_gro_truncation_is_counted() -> None:
    tx, rx, addr = _pair()
    with tx, rx:
        rx.setblocking(False)
        stats = UdpStats()
        tx.sendto(b"x" * 500, addr)
        select.select([rx], [], [], 2)
        assert udpgso.recv_gro(rx, bytearray(100), stats) is None
        assert stats.recv_errors == 1 and stats.last_recv_errno == errno.EMSGSIZE


class FakeSock:
    """A socket whose sendmsg fails with a chosen errno (weakref-able like socket.socket)."""

    def __init__(self, gso_errno: int, sendto_errno: int = 0) -> None:
        self.gso_errno, self.sendto_errno = gso_errno, sendto_errno
        self.sent: list[bytes] = []
        self.gso_calls = 0

    def sendmsg(self, bufs: Any, anc: Any, flags: int, addr: Any) -> int:
        self.gso_calls += 1
        raise OSError(self.gso_errno, os.strerror(self.gso_errno))

    def sendto(self, data: Any, addr: Any) -> int:
        if self.sendto_errno:
            raise OSError(self.sendto_errno, os.strerror(self.sendto_errno))
        self.sent.append(bytes(data))
        return len(data)


@pytest.mark.parametrize("code", [errno.EIO, errno.EINVAL])
def test_fallback_remembers_the_socket(code: int) -> None:
    s = FakeSock(code)
    dgrams = _datagrams(5, 100, 10)
    assert udpgso.send_gso(s, b"".join(dgrams), 100, 5, ("x", 1)) == 5  # type: ignore[arg-type]
    assert s.sent == dgrams and udpgso.gso_disabled(s)  # type: ignore[arg-type]
    assert udpgso.send_gso(s, dgrams, 100, 5, ("x", 1)) == 5  # type: ignore[arg-type]
    assert s.gso_calls == 1 and s.sent == dgrams * 2


def test_einval_from_the_destination_keeps_gso() -> None:
    s = FakeSock(errno.EINVAL, errno.EINVAL)  # plain sends fail too: not GSO's fault
    stats = UdpStats()
    assert udpgso.send_gso(s, b"x" * 300, 100, 3, ("x", 1), stats) == 0  # type: ignore[arg-type]
    assert not udpgso.gso_disabled(s) and stats.send_errors == 3  # type: ignore[arg-type]


def test_drop_errnos_are_counted_not_raised() -> None:
    s = FakeSock(errno.ENOBUFS)
    stats = UdpStats()
    assert udpgso.send_gso(s, b"x" * 300, 100, 3, ("x", 1), stats) == 0  # type: ignore[arg-type]
    assert stats.send_errors == 3 and stats.last_send_errno == errno.ENOBUFS
    with pytest.raises(OSError):
        udpgso.send_gso(FakeSock(errno.EBADF), b"x" * 300, 100, 3, ("x", 1))  # type: ignore[arg-type]


class RecordingSock(FakeSock):
    """Records each sendmsg as (segment size, datagram sizes, address)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.calls: list[tuple[int, list[int], Any]] = []

    def sendmsg(self, bufs: Any, anc: Any, flags: int, addr: Any) -> int:
        seg = int.from_bytes(anc[0][2], sys.byteorder)
        data = b"".join(bytes(b) for b in bufs)
        self.calls.append((seg, [len(data[i : i + seg]) for i in range(0, len(data), seg)], addr))
        self.sent += [data[i : i + seg] for i in range(0, len(data), seg)]
        return len(data)

    def sendto(self, data: Any, addr: Any) -> int:
        self.calls.append((0, [len(data)], addr))  # seg 0: a plain sendto
        return super().sendto(data, addr)


def test_batcher_runs_per_destination_and_size() -> None:
    s = RecordingSock()
    b = udpgso.GsoBatcher(capacity=20000)
    A, B = ("a", 1), ("b", 2)
    plan = [(A, 100), (A, 100), (A, 60), (A, 100), (B, 100), (B, 100), (A, 100), (A, 200)]
    want = []
    for i, (addr, size) in enumerate(plan):
        out = b.room(1500)
        data = bytes([i]) * size
        out[:size] = data
        want.append(data)
        assert b.add(s, size, addr) == 0  # type: ignore[arg-type]
    assert b.flush() == 0 and b.flush() == 0
    assert s.calls == [
        (100, [100, 100, 60], A),  # a shorter one ends the run
        (0, [100], A),  # a run of one goes out with sendto
        (100, [100, 100], B),  # another destination: its own run
        (0, [100], A),
        (0, [200], A),  # larger than the run's size: its own run
    ]
    assert s.sent == want and b.sent == len(plan)


def test_batcher_wraps_and_caps() -> None:
    s = RecordingSock()
    b = udpgso.GsoBatcher(capacity=1000)
    for i in range(30):
        out = b.room(100)
        out[:100] = bytes([i]) * 100
        b.add(s, 100, ("a", 1))  # type: ignore[arg-type]
    b.flush()
    assert [len(c[1]) for c in s.calls] == [10, 10, 10]  # the buffer holds 10 at a time
    assert s.sent == [bytes([i]) * 100 for i in range(30)]
    s2 = RecordingSock()
    b = udpgso.GsoBatcher(capacity=1 << 17)
    for _ in range(100):
        b.room(1000)
        b.add(s2, 1000, ("a", 1))  # type: ignore[arg-type]
    b.flush()
    assert [len(c[1]) for c in s2.calls] == [64, 36]  # the kernel's per-send segment cap


def test_batcher_on_loopback() -> None:
    tx, rx, addr = _pair()
    with tx, rx:
        b = udpgso.GsoBatcher()
        want = _datagrams(30, SIZE, 333)
        for d in want:
            b.room(SIZE)[: len(d)] = d
            b.add(tx, len(d), addr)
        assert b.flush() == 0
        assert _drain(rx, 30) == want


def _eio_through_plain_tun() -> dict[str, Any]:
    """A TUN without offloads has no tx checksum offload: older kernels refuse GSO towards it
    with EIO (then send_gso falls back), 6.x kernels checksum in software. Either way every
    datagram must arrive intact."""
    from shardwg.io import netlink as nl
    from shardwg.io.tun import TunDevice

    dev = TunDevice.create("tun9", queues=1, multi_queue=False)
    nl.set_link_up("tun9", 1500)
    nl.add_addresses("tun9", ["10.209.0.1/24"])
    nl.add_routes("tun9", ["10.210.0.0/24"])
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dgrams = _datagrams(6, 1000, 99)
    sent = udpgso.send_gso(tx, b"".join(dgrams), 1000, 6, ("10.210.0.5", 4444))
    got = []
    fd = dev.fds[0]
    while len(got) < 6 and select.select([fd], [], [], 3)[0]:
        pkt = os.read(fd, 2048)
        if pkt[0] == 0x45 and pkt[9] == 17:
            got.append(pkt[28:])
    res = {"sent": sent, "disabled": udpgso.gso_disabled(tx), "got": got, "want": dgrams}
    tx.close()
    dev.close()
    return res


@pytest.mark.netns
def test_gso_through_a_device_without_csum_offload(netns_factory) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(_eio_through_plain_tun)
    assert r["sent"] == 6
    assert r["got"] == r["want"]
