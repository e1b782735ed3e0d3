"""shardwg.io.mmsg: recvmmsg through ctypes on loopback, against what the socket module says."""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any

import pytest
from test_udpgso import _pair as udpgso_pair

from shardwg.io import mmsg, udpgso
from shardwg.io.udp import UdpStats

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg in libc")
SIZE = 1452


def _pair(v6: bool = False, gro: bool = True) -> tuple[socket.socket, socket.socket, Any]:
    """test_udpgso's loopback pair, non-blocking, the sender bound (its address is checked)."""
    tx, rx, addr = udpgso_pair(v6, gro)
    rx.setblocking(False)
    tx.bind(("::1" if v6 else "127.0.0.1", 0))
    return tx, rx, addr


def _all(r: mmsg.BatchReceiver, rx: socket.socket) -> list[tuple[bytes, int, Any]]:
    select.select([rx], [], [], 2)
    out = []
    for _ in range(100):
        k = r.recv(rx)
        if not k:
            return out
        for i in range(k):
            if r.lengths[i] >= 0:
                out.append((bytes(r.views[i][: r.lengths[i]]), r.segs[i], r.addrs[i]))
    raise AssertionError("never drained")


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_datagrams_sizes_and_addresses_match_the_socket_module(v6: bool) -> None:
    tx, rx, addr = _pair(v6)
    with tx, rx:
        r = mmsg.BatchReceiver(slots=8)
        assert r.recv(rx) == 0  # nothing pending: no block, no error
        sent = [os.urandom(n) for n in (1, 100, 1420, 0, 7, 1500, 64, 3, 9, 1000, 33)]
        for d in sent:
            tx.sendto(d, addr)
        got = _all(r, rx)
        assert [g[0] for g in got] == sent  # order kept across calls (8 slots, 11 datagrams)
        assert all(seg == len(d) for (d, seg, _a) in got)
        tx.sendto(b"ref", addr)
        select.select([rx], [], [], 2)
        _data, reference = rx.recvfrom(10)  # the tuple Python itself builds
        assert {a for _d, _s, a in got} == {reference}


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_gro_batches_come_with_their_segment_size(v6: bool) -> None:
    tx, rx, addr = _pair(v6)
    with tx, rx:
        dgrams = [os.urandom(SIZE) for _ in range(19)] + [os.urandom(1000)]
        assert udpgso.send_gso(tx, dgrams, SIZE, 20, addr) == 20
        got = _all(mmsg.BatchReceiver(slots=4), rx)
        pieces = [d[i : i + seg] for d, seg, _a in got for i in range(0, len(d), seg)]
        assert pieces == dgrams and {seg for _d, seg, _a in got} == {SIZE}


def test_truncated_messages_are_counted_and_marked() -> None:
    tx, rx, addr = _pair(gro=False)
    with tx, rx:
        r = mmsg.BatchReceiver(slots=4, size=100)
        stats = UdpStats()
        for d in (b"a" * 50, b"b" * 500, b"c" * 60):
            tx.sendto(d, addr)
        select.select([rx], [], [], 2)
        assert r.recv(rx, stats) == 3
        assert r.lengths[:3] == [50, -1, 60]
        assert bytes(r.views[2][:60]) == b"c" * 60
        assert stats.recv_errors == 1


def test_reusing_the_receiver_resets_the_kernel_fields() -> None:
    """namelen and controllen are rewritten by every call: a v4 message after a v6 one, and a
    GRO message after a plain one, must still get their full address and cmsg."""
    r = mmsg.BatchReceiver(slots=2)
    for v6 in (True, False, True):
        tx, rx, addr = _pair(v6)
        with tx, rx:
            tx.sendto(b"x", addr)
            udpgso.send_gso(tx, [b"y" * 100] * 3, 100, 3, addr)
            got = _all(r, rx)
            assert [(d, s) for d, s, _a in got] == [(b"x", 1), (b"y" * 300, 100)]
            assert got[0][2][1] == tx.getsockname()[1]


def test_cost_per_datagram_against_recvmsg_into() -> None:
    """Prints the two costs (no assertion on time: the box is shared)."""
    tx, rx, addr = _pair()
    with tx, rx:
        r = mmsg.BatchReceiver(slots=64)
        buf = bytearray(udpgso.GRO_BUFFER)
        payload = os.urandom(1400)
        one = batch = 0.0
        rounds = 100
        for _ in range(rounds):
            for _ in range(64):
                tx.sendto(payload, addr)
            t = time.perf_counter()
            n = 0
            while udpgso.recv_gro(rx, buf) is not None:
                n += 1
            one += time.perf_counter() - t
            assert n == 64
            for _ in range(64):
                tx.sendto(payload, addr)
            t = time.perf_counter()
            assert r.recv(rx) == 64
            batch += time.perf_counter() - t
        print(f"\nrecvmsg_into {one / rounds / 64 * 1e6:.2f} us per datagram, "
              f"recvmmsg {batch / rounds / 64 * 1e6:.2f} us")  # fmt: skip


def test_sockaddr_tuple_ignores_other_families() -> None:
    assert mmsg.sockaddr_tuple(b"\x01\x00" + bytes(14)) is None
    assert mmsg.sockaddr_tuple(b"") is None
