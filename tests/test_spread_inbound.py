"""A followed spread session's datagram through the worker's real inbound path (engine/inbound
with the native kernel and with its Python reference): opened, written to the TUN once, and
counted once. The kernel already counts every datagram it sees, the ones it hands back to
Python included; counting a followed one again doubled a non-owner's receive figures, so the
per-worker shares of tests/test_spread_netns.py and `shardwg show` were off by that much."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from shardwg.datapath import select as datapath_select
from shardwg.engine.inbound import InboundPath
from shardwg.proto.constants import DropReason
from shardwg.shm import counters as C
from tests.placement_world import REMOTE_ADDR
from tests.test_spread import _spread_world, _steer


class _Path(InboundPath):
    """The inbound mixin with what a Worker gives it, over a simulated worker's Device."""

    def __init__(self, device: Any, tun_fd: int, impl: datapath_select.Impl) -> None:
        self.device = device
        self.tun_fd = tun_fd
        self.v = [0.0] + [0] * (C.WORDS - 1)
        self._turn_data = 0
        self.queued: list[Any] = []
        self._init_inbound(None, None, impl)

    def _queue_handshake(self, msg: Any, addr: Any, screened: bool, now: float) -> None:
        self.queued.append(bytes(msg))


def _impls() -> list[datapath_select.Impl]:
    out = [datapath_select.python_impl()]
    try:
        out.append(datapath_select.choose("1"))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("impl", _impls(), ids=lambda i: i.name)
def test_a_followed_datagram_is_counted_once(impl: datapath_select.Impl) -> None:
    world = _spread_world(2)
    other = 1 - world.owner()
    tun_us, tun_host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_host.setblocking(False)
    try:
        path = _Path(world.w[other].device, tun_us.fileno(), impl)
        opened = sizes = 0
        for _ in range(6000):  # the remote counts sequentially: every other block is ours
            data = world.remote_datagram()
            if _steer(world, data) != other:
                continue
            buf = bytearray(data)
            n = path._open(buf, len(buf), [len(buf)], [len(buf)], 1, [memoryview(buf)],
                           [REMOTE_ADDR], world.now, world.wall)  # fmt: skip
            assert n == 1, n
            opened += 1
            sizes += len(buf)
            assert len(tun_host.recv(4096)) > 0  # one TUN write for it
        assert opened > 1000
        assert path.v[C.RX_PACKETS] == opened and path.v[C.RX_BYTES] == sizes
        assert not any(path.v[C.DROP_BASE :]) and not path.queued
    finally:
        tun_us.close()
        tun_host.close()


@pytest.mark.parametrize("impl", _impls(), ids=lambda i: i.name)
def test_the_kernel_opens_a_followed_session_after_its_first_datagram(
    impl: datapath_select.Impl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a followed session's first datagram goes the Python way (it loads the session);
    the batch kernel opens the rest, with the follower's own window, raising its floor in
    the ledger before the TUN write (a replacement must not accept them again), and replays
    are refused. Before: every followed datagram was opened one by one in Python, ~5x slower
    than the owner's share with the native kernel (tests/test_spread_netns.py)."""
    world = _spread_world(2)
    other = 1 - world.owner()
    dev = world.w[other].device
    tun_us, tun_host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_host.setblocking(False)
    try:
        path = _Path(dev, tun_us.fileno(), impl)
        by_python = [0]
        slow = path._open_followed

        def counted(*a: Any) -> None:
            by_python[0] += 1
            slow(*a)

        monkeypatch.setattr(path, "_open_followed", counted)
        ours: list[bytes] = []
        for _ in range(4000):
            data = world.remote_datagram()
            if _steer(world, data) == other:
                ours.append(data)
        assert len(ours) > 1000
        for data in ours:
            buf = bytearray(data)
            n = path._open(buf, len(buf), [len(buf)], [len(buf)], 1, [memoryview(buf)],
                           [REMOTE_ADDR], world.now, world.wall)  # fmt: skip
            assert n == 1
            assert len(tun_host.recv(4096)) > 0
        assert by_python[0] == 1, by_python  # the first one only
        (kp,) = dev.followed.values()
        assert kp in path.opener.state.kps
        last = int.from_bytes(ours[-1][8:16], "little")
        assert kp.recv_floor is not None and kp.recv_floor[0] == last + 1
        for data in ours[-50:]:  # replays
            buf = bytearray(data)
            path._open(buf, len(buf), [len(buf)], [len(buf)], 1, [memoryview(buf)],
                       [REMOTE_ADDR], world.now, world.wall)  # fmt: skip
            with pytest.raises(BlockingIOError):
                tun_host.recv(4096)  # nothing written
        assert path.v[C.RX_PACKETS] == len(ours) + 50
        assert path.v[C.DROP_BASE + DropReason.REPLAYED] == 50
    finally:
        tun_us.close()
        tun_host.close()


def test_a_reconcile_that_changes_nothing_leaves_the_kernel_state_alone() -> None:
    """Placement reconciles on every table change (a move, a reload): the followed set is
    rebuilt each time, but only a real change may bump its generation, since the kernel's
    state (index table and allowed-IP ranges: ~0.1 s at 10,000 peers) is rebuilt on it."""
    world = _spread_world(2)
    other = world.w[1 - world.owner()]
    for _ in range(4000):  # the follower's session is loaded by its first datagram
        data = world.remote_datagram()
        if _steer(world, data) == 1 - world.owner():
            assert other.receive(data) > 0
            break
    assert other.device.followed
    gen = other.device.followed_generation
    for _ in range(3):
        other.placement.reconcile(world.now, world.wall, keys=[])
    assert other.device.followed_generation == gen


@pytest.mark.parametrize("impl", _impls(), ids=lambda i: i.name)
def test_a_replacement_refuses_what_the_kernel_accepted_for_a_followed_session(
    impl: datapath_select.Impl,
) -> None:
    """Crash safety of the kernel's followed opens: the floor `settle` raised in the ledger
    before each TUN write is what a replacement of the non-owner starts its window from, so
    none of the datagrams its predecessor accepted (and wrote) is accepted again."""
    world = _spread_world(2)
    other = 1 - world.owner()
    tun_us, tun_host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_host.setblocking(False)

    def feed(path: _Path, data: bytes) -> None:
        buf = bytearray(data)
        path._open(buf, len(buf), [len(buf)], [len(buf)], 1, [memoryview(buf)],
                   [REMOTE_ADDR], world.now, world.wall)  # fmt: skip

    try:
        path = _Path(world.w[other].device, tun_us.fileno(), impl)
        ours = []
        for _ in range(3000):
            data = world.remote_datagram()
            if _steer(world, data) == other:
                ours.append(data)
                feed(path, data)
                assert len(tun_host.recv(4096)) > 0  # written (read now: the pair is small)
        assert len(ours) > 500
        world.crash(other)  # the non-owner dies; its replacement boots from shared memory
        world.settle()
        again = _Path(world.w[other].device, tun_us.fileno(), impl)
        for data in ours[-200:]:
            feed(again, data)
        with pytest.raises(BlockingIOError):
            tun_host.recv(4096)  # none of them written twice
        assert again.v[C.DROP_BASE + DropReason.REPLAYED] == 200
    finally:
        tun_us.close()
        tun_host.close()


@pytest.mark.parametrize("impl", _impls(), ids=lambda i: i.name)
def test_a_rekey_through_a_non_owners_inbound_path(impl: datapath_select.Impl) -> None:
    """Worker 0 does not own the peer. The remote rekeys; the first 1024 counters of its
    new session (still `next` at the owner) are steered to worker 0 and opened by its real
    inbound path, the kernel doing all but the first; the owner confirms the session; then
    the old session's datagrams still in flight reach worker 0 and are opened too (it keeps
    the previous session), each written to the TUN once, none accepted twice."""
    from tests.test_spread import _rekey_by_the_remote, _spread_world_not_owned_by_0

    world = _spread_world_not_owned_by_0()
    tun_us, tun_host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_host.setblocking(False)

    def feed(path: _Path, data: bytes) -> int:
        buf = bytearray(data)
        return path._open(buf, len(buf), [len(buf)], [len(buf)], 1, [memoryview(buf)],
                          [REMOTE_ADDR], world.now, world.wall)  # fmt: skip

    try:
        path = _Path(world.w[0].device, tun_us.fileno(), impl)
        old = [world.remote_datagram() for _ in range(3000)]
        in_flight = [d for d in old[-1500:] if _steer(world, d) == 0]
        for data in old[:-1500]:
            if _steer(world, data) == 0:
                assert feed(path, data) == 1
                assert len(tun_host.recv(4096)) > 0
        _rekey_by_the_remote(world)
        new = [world.remote_datagram() for _ in range(1000)]
        assert all(_steer(world, d) == 0 for d in new)  # block 0
        for data in new:
            assert feed(path, data) == 1
            assert len(tun_host.recv(4096)) > 0
        world.settle()
        owner_peer = world.w[1].device.peers[world.remote_key]
        assert owner_peer.current.local_index == world.rpeer.current.remote_index
        assert in_flight
        for data in in_flight:
            assert feed(path, data) == 1
            assert len(tun_host.recv(4096)) > 0
        for data in in_flight[-20:] + new[-20:]:  # replays
            feed(path, data)
        with pytest.raises(BlockingIOError):
            tun_host.recv(4096)
        assert path.v[C.DROP_BASE + DropReason.REPLAYED] == 40
        assert path.v[C.DROP_BASE + DropReason.UNKNOWN_INDEX] == 0
    finally:
        tun_us.close()
        tun_host.close()
