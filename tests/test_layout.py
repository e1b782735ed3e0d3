"""Layout: offsets, sizes, recovery from a real region, and the global state codec."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from shardwg.datapath import select
from shardwg.shm import counters
from shardwg.shm.endpoints import LIST_SIZE as ENDPOINT_LIST_SIZE
from shardwg.shm.handoff import HandoffMesh
from shardwg.shm.layout import (
    GLOBAL_SIZE,
    LAYOUT_BLOCK_SIZE,
    RING_MIN_SLOTS,
    GlobalState,
    Layout,
    decode_global,
    encode_global,
)
from shardwg.shm.peerslot import PEER_RECORD_SIZE, PeerRecord, decode_peer, encode_peer
from shardwg.shm.placement import table_size
from shardwg.shm.region import HEADER_SIZE, SharedRegion
from shardwg.shm.seqlock import SLOT_HEADER, slot_stride
from shardwg.shm.spread import area_size as spread_area_size


def _parts(lay: Layout) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every part, in region order."""
    return [
        ("header", 0, HEADER_SIZE),
        ("layout", lay.layout_offset, LAYOUT_BLOCK_SIZE),
        ("global", lay.global_offset, SLOT_HEADER + GLOBAL_SIZE),
        ("counters", lay.counters_offset, counters.counters_size(lay.workers)),
        ("endpoints", lay.endpoints_offset, lay.workers * slot_stride(ENDPOINT_LIST_SIZE, 64)),
        ("peers", lay.peers_offset, lay.peer_capacity * lay.peer_stride),
        ("handoff", lay.handoff_offset, HandoffMesh.size(lay.workers, lay.ring_slots, 2048)),
        ("placement", lay.placement_offset, SLOT_HEADER + table_size(lay.peer_capacity)),
        ("spread", lay.spread_offset, spread_area_size(lay.peer_capacity, lay.workers)),
    ]


@pytest.mark.parametrize("workers,peers", [(1, 0), (2, 256), (3, 7), (16, 1024), (256, 1)])
def test_offsets_aligned_ordered_and_non_overlapping(workers: int, peers: int) -> None:
    lay = Layout(workers, peers, ring_slots=16 if workers > 16 else 256)
    parts = _parts(lay)
    assert lay.layout_offset == HEADER_SIZE  # readers find it knowing only the name
    for name, off, _size in parts:
        assert off % 64 == 0, name
    for (a, a_off, a_size), (b, b_off, _) in zip(parts, parts[1:], strict=False):
        assert a_off + a_size <= b_off, (a, b)
        assert b_off - (a_off + a_size) < 64, (a, b)  # only alignment padding between parts
    _, last_off, last_size = parts[-1]
    assert lay.total_size == (last_off + last_size + 63) // 64 * 64
    assert lay.peer_stride >= SLOT_HEADER + PEER_RECORD_SIZE and lay.peer_stride % 64 == 0


def test_sizes_reported() -> None:
    small, big = Layout(2, 256), Layout(16, 1024)
    sized = Layout.sized(16, 1024)
    print(
        f"(2, 256): {small.total_size:,} B; (16, 1024): {big.total_size:,} B "
        f"({big.total_size / 2**20:.1f} MiB, mesh {HandoffMesh.size(16, 256, 2048) / 2**20:.1f}"
        f" MiB); sized(16, 1024): {sized.ring_slots} slots, {sized.total_size / 2**20:.1f} MiB"
    )
    assert small.total_size < 2 << 20
    assert big.total_size < 128 << 20
    assert sized.ring_slots == 256 and sized.total_size < 160 << 20
    assert Layout.sized(2, 256) == small


@pytest.mark.parametrize("args", [(0, 1), (257, 1), (2, -1), (2, 1, 6), (2, 1, 256, 0)])
def test_bad_parameters_rejected(args: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        Layout(*args)


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    name = f"/shardwg-test-{os.getpid()}-{secrets.token_hex(4)}-layout"
    lay = Layout(3, 40, ring_slots=8, ring_slot_size=256)
    r = SharedRegion.create(name, lay.total_size)
    try:
        yield r
    finally:
        r.unlink()
        r.close()


def test_read_from_recovers_layout_from_a_real_region(region: SharedRegion) -> None:
    lay = Layout(3, 40, ring_slots=8, ring_slot_size=256)
    with pytest.raises(ValueError):
        Layout.read_from(region.buf)  # nothing written yet
    lay.write_to(region.buf)
    reader = SharedRegion.attach(region.name, readonly=True)  # e.g. `shardwg show`, later
    try:
        assert Layout.read_from(reader.buf) == lay
    finally:
        reader.close()

    # Every accessor lands where the map says, and parts do not clobber each other.
    state = GlobalState(3, 40, 7, 2.5, os.getpid(), "wg0", 51820, 1.7e9)
    lay.global_slot(region.buf).write(encode_global(state))
    for i in (0, 39):
        rec = PeerRecord(public_key=bytes([i + 1]) * 32, owner=i % 3, generation=i)
        lay.peer_slot(region.buf, i).write_fields(lambda v, rec=rec: encode_peer(rec, v))
    w = lay.counters(region.buf, 2)
    w.add(counters.RX_PACKETS, 5)
    w.flush()
    mesh = lay.mesh(region.buf, None)
    for src in range(3):
        for dst in range(3):
            if src != dst:
                r = mesh.ring(src, dst)
                while r.push(b"\xff" * 256):  # fill every ring to its last byte
                    pass
    assert decode_global(lay.global_slot(region.buf).read()) == state
    p = decode_peer(lay.peer_slot(region.buf, 39).read())
    assert p is not None and p.generation == 39 and p.public_key == bytes([40]) * 32
    assert decode_peer(lay.peer_slot(region.buf, 1).read()) is None
    stats = counters.read_all(region.buf, lay.counters_offset, 3)
    assert stats[2].rx_packets == 5 and stats[1].rx_packets == 0
    assert Layout.read_from(region.buf) == lay
    with pytest.raises(IndexError):
        lay.peer_slot(region.buf, 40)
    with pytest.raises(IndexError):
        lay.counters(region.buf, 3)
    mesh.release()


def test_read_from_rejects_mismatches() -> None:
    lay = Layout(2, 4)
    buf = bytearray(lay.total_size)
    lay.write_to(buf)
    assert Layout.read_from(buf) == lay
    with pytest.raises(ValueError):
        Layout.read_from(buf[:-64])  # region smaller than the map
    bad = bytearray(buf)
    bad[HEADER_SIZE + 32 : HEADER_SIZE + 36] = (PEER_RECORD_SIZE + 64).to_bytes(4, "little")
    with pytest.raises(ValueError):
        Layout.read_from(bad)  # written by a build with another record size
    with pytest.raises(ValueError):
        lay.write_to(bytearray(lay.total_size - 1))


def test_global_state_codec() -> None:
    state = GlobalState(16, 1024, 2**64 - 1, 4.5, 2**31, "a" * 15, 1, 2.0)
    assert decode_global(encode_global(state)) == state
    assert decode_global(bytes(GLOBAL_SIZE)) is None
    with pytest.raises(ValueError):
        decode_global(b"XXXX" + encode_global(state)[4:])
    for bad in (
        GlobalState(1, 1, interface="a" * 16),
        GlobalState(1, 1, listen_port=70000),
    ):
        with pytest.raises(ValueError):
            encode_global(bad)


def data_path_descriptions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What `shardwg run` can publish as its data path: native, off, and not built."""
    native = select.Impl("native", "OpenSSL 3.0.19 27 Jan 2026", None, None, None, None)
    monkeypatch.setattr(select, "native_module", lambda: None)
    return [select.describe(native)] + [select.describe(select.choose(e)) for e in ("0", "")]


def test_global_state_carries_the_whole_data_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """show and /metrics print what the supervisor published: it must arrive uncut."""
    for datapath in data_path_descriptions(monkeypatch):
        state = GlobalState(2, 64, datapath=datapath)
        assert decode_global(encode_global(state)) == state, datapath


@pytest.mark.parametrize("mtu", [1280, 1420, 2048, 9000, 65475])
def test_ring_slots_carry_a_whole_mtu_packet(mtu: int) -> None:
    """Handed-over TUN packets are up to MTU bytes: a 2048-byte slot dropped jumbo ones."""
    for workers in (2, 4, 16):
        lay = Layout.sized(workers, 8, mtu=mtu)
        assert lay.ring_slot_size >= mtu
        assert lay.mesh(bytearray(lay.total_size)).outgoing(0)[1].push(bytes(mtu))


@pytest.mark.parametrize("workers", [2, 8, 16, 32, 64, 128, 256])
def test_rings_keep_a_turns_batch_at_any_worker_count(workers: int) -> None:
    """Ring slots shrank to 16 from 32 workers on (a fixed 32 MiB mesh): fewer than one
    turn's batch of packets for one owner. The floor is RING_MIN_SLOTS, and what one worker
    may receive from all the others never shrinks as workers grow."""
    lay = Layout.sized(workers, 0)
    assert lay.ring_slots >= RING_MIN_SLOTS
    assert (workers - 1) * lay.ring_slots >= min(256, 64 * (workers - 1))


def test_a_turns_batch_fits_one_ring_at_32_workers() -> None:
    import mmap

    lay = Layout.sized(32, 0)
    buf = mmap.mmap(-1, lay.total_size)  # anonymous: only the pages touched are allocated
    mesh = lay.mesh(buf)
    ring = mesh.ring(5, 7)
    assert all(ring.push(b"p" * 1400, 1) for _ in range(64))
    mesh.release()
    buf.close()
