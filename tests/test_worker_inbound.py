"""The worker's inbound path end to end over a real loopback UDP socket: datagrams in, TUN
writes out (a datagram socketpair stands in for the TUN queue, so write boundaries show)."""

from __future__ import annotations

import socket
import time

import pytest
from open_world import World
from test_segment import payload_of, tcp_packet

from shardwg.engine.worker import Worker
from shardwg.io import vnet
from shardwg.proto.constants import DropReason
from shardwg.shm import counters as C


def _worker(world: World) -> tuple[Worker, socket.socket, socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tun_w, tun_r = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_r.settimeout(0.2)
    tun_w.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    counters = C.WorkerCounters(bytearray(C.BLOCK_SIZE), 0)
    w = Worker(world.a, tun_w.fileno(), rx, None, counters)
    return w, rx, tun_w, tun_r


def _drain(tun_r: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(tun_r.recv(1 << 17))
        except (TimeoutError, BlockingIOError):
            return got


def _inner_segments(writes: list[bytes]) -> list[bytes]:
    """Payload-bearing bytes the kernel would take in: whole packets (singles) and the
    data part of super-packets."""
    return [w[vnet.VNET_HDR_LEN :] for w in writes]


def test_corrupted_segment_is_dropped_not_merged() -> None:
    """A TCP segment whose checksum is wrong (corrupted before sealing, so the AEAD is fine)
    must not join a super-packet: written with NEEDS_CSUM, the kernel would compute a fresh,
    valid checksum over the corrupted data. It is dropped and counted instead."""
    world = World()
    w, rx, tun_w, tun_r = _worker(world)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        mss = 1200
        bad_payload = payload_of(mss, salt=99)
        pkts = []
        for i in range(6):
            payload = bad_payload if i == 3 else payload_of(mss, salt=i)
            pkts.append(tcp_packet(False, 1 + i * mss, payload, good_csum=i != 3))
        for p in pkts:
            tx.sendto(world.seal(p), rx.getsockname())
        time.sleep(0.05)
        n = w.read_udp(rx, world.now, world.wall)
        assert n == len(pkts)
        writes = _drain(tun_r)
        assert writes, "nothing reached the TUN"
        assert not any(bad_payload in seg for seg in _inner_segments(writes))
        assert w.v[C.DROP_BASE + DropReason.BAD_INNER_CHECKSUM] == 1
        # the good segments still went through (merged or not)
        for i in (0, 1, 2, 4, 5):
            assert any(payload_of(mss, salt=i) in seg for seg in _inner_segments(writes))
    finally:
        for s in (rx, tun_w, tun_r, tx):
            s.close()


@pytest.mark.parametrize("v6", [False, True])
def test_good_segments_merge_into_one_write(v6: bool) -> None:
    world = World()
    w, rx, tun_w, tun_r = _worker(world)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pkts = [tcp_packet(v6, 1 + i * 1000, payload_of(1000, salt=i)) for i in range(8)]
        sizes = []
        for p in pkts:
            dg = world.seal(p)
            sizes.append(len(dg))
            tx.sendto(dg, rx.getsockname())
        time.sleep(0.05)
        assert w.read_udp(rx, world.now, world.wall) == len(pkts)
        writes = _drain(tun_r)
        assert len(writes) == 1
        hdr = vnet.parse(writes[0])
        assert hdr.flags == vnet.VIRTIO_NET_HDR_F_NEEDS_CSUM and hdr.gso_size == 1000
        assert w.v[C.RX_PACKETS] == len(pkts)
        assert world.peer_b.current is not None and world.peer_b.next is None  # confirmed
        assert world.peer_b.rx_bytes == sum(sizes)
        assert world.peer_b.endpoint == ("127.0.0.1", tx.getsockname()[1])  # roamed
    finally:
        for s in (rx, tun_w, tun_r, tx):
            s.close()


@pytest.mark.parametrize("impl", ["native", "python"])
def test_recv_floor_is_raised_before_the_tun_writes(impl: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Crash safety: once a packet reached the TUN, the shared receive high-water mark
    already rejects it, so a replacement worker never accepts it twice."""
    from shardwg.datapath import select
    from shardwg.engine import inbound

    if impl == "native" and select.native_module() is None:
        pytest.skip("native extension not built")
    chosen = select.choose("1") if impl == "native" else select.python_impl()
    world = World()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tun_w, tun_r = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    counters = C.WorkerCounters(bytearray(C.BLOCK_SIZE), 0)
    w = Worker(world.a, tun_w.fileno(), rx, None, counters, datapath=chosen)
    kp = world.peer_b.next
    assert kp is not None
    shm_word = memoryview(bytearray(8)).cast("Q")
    kp.recv_floor = shm_word
    seen: list[int] = []
    real = inbound.tun_io.write_packet

    def spy(fd: int, data: memoryview) -> bool:
        seen.append(shm_word[0])
        return real(fd, data)

    monkeypatch.setattr(inbound.tun_io, "write_packet", spy)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(5):
            tx.sendto(world.seal(tcp_packet(False, 1 + i * 100, payload_of(100, i))),
                      rx.getsockname())  # fmt: skip
        time.sleep(0.05)
        assert w.read_udp(rx, world.now, world.wall) == 5
        sender = world.peer_a.current
        assert sender is not None
        top = sender.send_counter - 1  # the last counter B used
        assert seen and all(floor == top + 1 for floor in seen)
        assert kp.replay.highest == top and shm_word[0] == top + 1
        assert w.datapath.name == impl
    finally:
        for s in (rx, tun_w, tun_r, tx):
            s.close()
