"""HandoffMesh: ring independence, eventfd wake-ups, initiation payload codec."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from shardwg.proto.constants import INITIATION_SIZE
from shardwg.shm.handoff import (
    ADDR_SIZE,
    INITIATION_PAYLOAD_SIZE,
    HandoffKind,
    HandoffMesh,
    addr_fields,
    addr_from_fields,
    pack_initiation,
    unpack_initiation,
)
from shardwg.shm.ring import SpscRing

W, SLOTS, SLOT_SIZE = 3, 4, 64


@pytest.fixture
def fds() -> Iterator[list[int]]:
    fds = HandoffMesh.make_eventfds(W)
    try:
        yield fds
    finally:
        HandoffMesh.close_eventfds(fds)


def test_kinds_are_the_engine_values() -> None:
    assert (HandoffKind.TUN_PACKET, HandoffKind.INITIATION) == (1, 2)


def test_size_and_ring_placement() -> None:
    ring = SpscRing.size(SLOTS, SLOT_SIZE)
    assert HandoffMesh.size(W, SLOTS, SLOT_SIZE) == W * (W - 1) * ring
    assert HandoffMesh.size(1, SLOTS, SLOT_SIZE) == 0
    mesh = HandoffMesh(bytearray(128 + 6 * ring), 128, W, SLOTS, SLOT_SIZE)
    offsets = sorted(mesh.ring(s, d).offset for s in range(W) for d in range(W) if s != d)
    assert offsets == [128 + i * ring for i in range(6)]  # dense, no overlap, no gap
    with pytest.raises(ValueError):
        mesh.ring(1, 1)
    with pytest.raises(ValueError):
        mesh.ring(0, 3)
    with pytest.raises(ValueError):
        HandoffMesh(bytearray(6 * ring - 1), 0, W, SLOTS, SLOT_SIZE)


def test_each_pair_ring_is_independent() -> None:
    buf = bytearray(HandoffMesh.size(W, SLOTS, SLOT_SIZE))
    mesh = HandoffMesh(buf, 0, W, SLOTS, SLOT_SIZE)
    for src in range(W):
        out = mesh.outgoing(src)
        assert out[src] is None and len(out) == W
        for dst, r in enumerate(out):
            if r is not None:
                assert r.push(f"{src}->{dst}".encode(), HandoffKind.TUN_PACKET, src)
    # Fill one ring completely: no other ring is affected.
    full = mesh.ring(2, 0)
    while full.push(b"fill"):
        pass
    assert mesh.ring(0, 2).push(b"extra")
    other = HandoffMesh(buf, 0, W, SLOTS, SLOT_SIZE)  # a second process's view
    out = bytearray(SLOT_SIZE)
    for dst in range(W):
        incoming = other.incoming(dst)
        assert len(incoming) == W - 1
        for r, src in zip(incoming, [s for s in range(W) if s != dst], strict=True):
            n = r.pop_into(out)
            assert bytes(out[:n]) == f"{src}->{dst}".encode() and r.last_aux == src
    assert len(other.ring(2, 0)) == SLOTS - 1 and len(other.ring(0, 2)) == 1
    assert len(other.ring(1, 0)) == 0 and len(other.ring(0, 1)) == 0
    assert mesh.ring(0, 1) is mesh.ring(0, 1)  # built once, then cached
    mesh.release()
    other.release()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_eventfd_wake_and_clear(fds: list[int]) -> None:
    mesh = HandoffMesh(
        bytearray(HandoffMesh.size(W, SLOTS, SLOT_SIZE)), 0, W, SLOTS, SLOT_SIZE, fds
    )
    assert not any(_readable(fd) for fd in fds)
    mesh.clear_wake(1)  # nothing pending: EAGAIN swallowed
    mesh.wake(1)
    mesh.wake(1)
    assert _readable(fds[1]) and not _readable(fds[0]) and not _readable(fds[2])
    mesh.clear_wake(1)
    assert not _readable(fds[1])
    assert os.get_blocking(fds[0]) is False
    assert os.get_inheritable(fds[0])  # not CLOEXEC, by design (see make_eventfds)


def test_wake_swallows_eagain_on_overflow(fds: list[int]) -> None:
    mesh = HandoffMesh(
        bytearray(HandoffMesh.size(W, SLOTS, SLOT_SIZE)), 0, W, SLOTS, SLOT_SIZE, fds
    )
    os.eventfd_write(fds[0], 0xFFFFFFFFFFFFFFFE)  # the counter's maximum
    mesh.wake(0)  # would overflow: EAGAIN, ignored
    mesh.clear_wake(0)
    assert not _readable(fds[0])


def test_mesh_without_eventfds_and_bad_count() -> None:
    mesh = HandoffMesh(bytearray(HandoffMesh.size(W, SLOTS, SLOT_SIZE)), 0, W, SLOTS, SLOT_SIZE)
    mesh.wake(0)
    mesh.clear_wake(0)
    with pytest.raises(ValueError):
        HandoffMesh(bytearray(HandoffMesh.size(W, SLOTS, SLOT_SIZE)), 0, W, SLOTS, SLOT_SIZE, [3])


MSG = bytes([1, 0, 0, 0]) + bytes(range(INITIATION_SIZE - 4))


@pytest.mark.parametrize(
    "addr",
    [
        ("192.0.2.7", 51820),
        ("0.0.0.0", 0),
        ("2001:db8::1", 65535, 0, 0),
        ("::ffff:192.0.2.1", 1, 0, 0),
    ],
)
def test_initiation_roundtrip(addr: tuple[object, ...]) -> None:
    payload = pack_initiation(MSG, addr)
    assert len(payload) == INITIATION_PAYLOAD_SIZE == ADDR_SIZE + INITIATION_SIZE
    assert payload[ADDR_SIZE:] == MSG
    msg, back = unpack_initiation(payload)
    assert msg == MSG and back == addr


def test_link_local_scope_survives() -> None:
    lo = socket.if_nametoindex("lo")
    msg, back = unpack_initiation(pack_initiation(MSG, ("fe80::1%lo", 7, 0, lo)))
    assert back == ("fe80::1%lo", 7, 0, lo)  # as recvfrom spells it
    assert addr_from_fields(*addr_fields(("fe80::2", 9, 0, 0))) == ("fe80::2", 9, 0, 0)


@pytest.mark.parametrize(
    "addr", [("2001:db8::1", 1), ("192.0.2.1", 1, 0, 0), ("192.0.2.1", 70000), ("x", 1), ()]
)
def test_bad_addresses_rejected(addr: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        pack_initiation(MSG, addr)


def test_bad_payloads_rejected() -> None:
    with pytest.raises(ValueError):
        pack_initiation(MSG[:-1], ("192.0.2.1", 1))
    good = pack_initiation(MSG, ("192.0.2.1", 1))
    with pytest.raises(ValueError):
        unpack_initiation(good[:-1])
    with pytest.raises(ValueError):
        unpack_initiation(b"\x05" + good[1:])  # unknown family
    with pytest.raises(ValueError):
        unpack_initiation(bytes(ADDR_SIZE) + MSG)  # no address
