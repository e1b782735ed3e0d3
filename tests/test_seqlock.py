"""Seqlock: unit tests on plain buffers, then a multi-process torture test in real shm."""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing as mp
import os
import secrets
import signal
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shardwg.shm.region import HEADER_SIZE, SharedRegion
from shardwg.shm.seqlock import SeqlockSlot, SeqlockTimeout, slot_stride

# ---------------------------------------------------------------- unit tests


def test_roundtrip_and_sequence_stays_even() -> None:
    buf = bytearray(64)
    slot = SeqlockSlot(buf, 8, 16)
    assert slot.sequence() == 0
    slot.write(b"A" * 16)
    slot.write(b"B" * 16)
    assert slot.sequence() == 4
    assert slot.read() == b"B" * 16
    assert buf[16:32] == b"B" * 16  # payload right after the 8-byte sequence
    assert slot.retries == 0


def test_short_write_keeps_tail_and_long_write_is_rejected() -> None:
    slot = SeqlockSlot(bytearray(32), 0, 8)
    slot.write(b"12345678")
    slot.write(b"ab")
    assert slot.read() == b"ab345678"
    with pytest.raises(ValueError):
        slot.write(b"123456789")
    assert slot.sequence() == 4  # the rejected write never touched the sequence


@pytest.mark.parametrize("offset,size", [(4, 8), (-8, 8), (24, 8), (0, 40)])
def test_bad_geometry_rejected(offset: int, size: int) -> None:
    with pytest.raises(ValueError):
        SeqlockSlot(bytearray(32), offset, size)


def test_read_into_out_reuses_it() -> None:
    slot = SeqlockSlot(bytearray(32), 0, 8)
    slot.write(b"abcdefgh")
    out = bytearray(8)
    assert slot.read(out) is out
    assert out == b"abcdefgh"


def test_write_fields_is_one_update() -> None:
    slot = SeqlockSlot(bytearray(32), 8, 16)
    seen: list[int] = []

    def mutate(view: memoryview) -> None:
        seen.append(slot.sequence())
        struct.pack_into("<QQ", view, 0, 7, 9)

    slot.write_fields(mutate)
    assert seen == [1] and slot.sequence() == 2
    assert struct.unpack("<QQ", slot.read()) == (7, 9)


def test_write_fields_exception_still_ends_the_write() -> None:
    slot = SeqlockSlot(bytearray(32), 0, 8)

    def boom(view: memoryview) -> None:
        view[0] = 1
        raise RuntimeError

    with pytest.raises(RuntimeError):
        slot.write_fields(boom)
    assert slot.sequence() == 2 and slot.read()[0] == 1


def test_odd_sequence_times_out() -> None:
    buf = bytearray(32)
    slot = SeqlockSlot(buf, 0, 8)
    struct.pack_into("=Q", buf, 0, 5)  # a writer is (or died) mid-write
    with pytest.raises(SeqlockTimeout):
        slot.read(max_retries=40)
    assert slot.retries == 40


def test_write_recovers_slot_left_odd_by_dead_writer() -> None:
    buf = bytearray(32)
    slot = SeqlockSlot(buf, 0, 8)
    struct.pack_into("=Q", buf, 0, 5)
    slot.write(b"fresh!!!")
    assert slot.sequence() == 8  # 5 -> 7 (odd, distinct) -> 8
    assert slot.read() == b"fresh!!!"


class _RacingPayload:
    """Stands in for the payload view: a writer strikes during the reader's copy."""

    def __init__(self, slot: SeqlockSlot, real: memoryview) -> None:
        self.slot, self.real, self.calls = slot, real, 0

    def tobytes(self) -> bytes:
        self.calls += 1
        data = self.real.tobytes()
        if self.calls == 1:
            self.slot.write(b"NEW!NEW!")  # lands between the reader's two sequence loads
        return data


def test_reader_retries_when_sequence_changes_during_copy() -> None:
    slot = SeqlockSlot(bytearray(32), 0, 8)
    slot.write(b"old-old-")
    racing = _RacingPayload(slot, slot._payload)
    slot._payload = racing  # type: ignore[assignment]
    assert slot.read() == b"NEW!NEW!"  # the copy of b"old-old-" was discarded
    assert racing.calls == 2 and slot.retries == 1


def test_works_over_mmap_and_release_allows_close() -> None:
    m = mmap.mmap(-1, 4096)
    slot = SeqlockSlot(m, 64, 100)
    slot.write(b"x" * 100)
    assert SeqlockSlot(memoryview(m), 64, 100).read() == b"x" * 100
    with pytest.raises(BufferError):
        m.close()
    slot.release()
    m.close()  # the second slot died with its expression, releasing its views


def test_slot_stride_keeps_next_sequence_aligned() -> None:
    assert slot_stride(1) == 16 and slot_stride(8) == 16 and slot_stride(9) == 24
    assert slot_stride(1, align=64) == 64


# ---------------------------------------------------------------- torture test

SLOTS = 4
PAYLOAD = 4096
DIGEST = 32
DURATION = 3.0
SLOTS_BASE = HEADER_SIZE + 64  # word at HEADER_SIZE: stop flag for the writer
STRIDE = slot_stride(PAYLOAD)


def _make_payload(counter: int) -> bytes:
    body = counter.to_bytes(8, "little") + os.urandom(PAYLOAD - 8 - DIGEST)
    return body + hashlib.blake2s(body).digest()


def _intact(p: bytes) -> bool:
    return hashlib.blake2s(p[:-DIGEST]).digest() == p[-DIGEST:]


def _writer(name: str, slots: int) -> None:
    region = SharedRegion.attach(name)
    stop = memoryview(region.buf)[HEADER_SIZE : HEADER_SIZE + 8].cast("Q")
    targets = [SeqlockSlot(region.buf, SLOTS_BASE + i * STRIDE, PAYLOAD) for i in range(slots)]
    pool = [_make_payload(c) for c in range(64)]  # consecutive writes to a slot always differ
    i = 0
    while not stop[0]:
        targets[i % slots].write(pool[i % 64])
        i += 1


def _reader(name: str, slots: int, deadline: float, raw: bool, q: Any) -> None:
    region = SharedRegion.attach(name)
    mv = memoryview(region.buf)
    locks = [SeqlockSlot(region.buf, SLOTS_BASE + i * STRIDE, PAYLOAD) for i in range(slots)]
    views = [mv[s._start : s._end] for s in locks]  # the same copy primitive, minus the protocol
    reads = torn = timeouts = 0
    while time.monotonic() < deadline:
        for i in range(slots):
            try:
                data = views[i].tobytes() if raw else locks[i].read()
            except SeqlockTimeout:
                timeouts += 1
                continue
            reads += 1
            if not _intact(data):
                torn += 1
        if raw and torn:
            break
    q.put((os.getpid(), reads, torn, sum(s.retries for s in locks), timeouts))


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    name = f"/shardwg-test-{os.getpid()}-{secrets.token_hex(4)}-seqlock"
    r = SharedRegion.create(name, SLOTS_BASE + SLOTS * STRIDE)
    try:
        for i in range(SLOTS):  # every slot starts intact
            SeqlockSlot(r.buf, SLOTS_BASE + i * STRIDE, PAYLOAD).write(_make_payload(i))
        yield r
    finally:
        r.unlink()
        r.close()


def _torture(region: SharedRegion, slots: int, raw: bool) -> list[tuple[int, ...]]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    deadline = time.monotonic() + DURATION
    writer = ctx.Process(target=_writer, args=(region.name, slots), daemon=True)
    readers = [
        ctx.Process(target=_reader, args=(region.name, slots, deadline, raw, q), daemon=True)
        for _ in range(3)
    ]
    procs = [writer, *readers]
    stop = memoryview(region.buf)[HEADER_SIZE : HEADER_SIZE + 8].cast("Q")
    try:
        for p in procs:
            p.start()
        return [q.get(timeout=DURATION + 5) for _ in readers]
    finally:
        stop[0] = 1
        stop.release()
        for p in procs:
            p.join(timeout=2)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=2)


def test_torture_no_torn_reads(region: SharedRegion) -> None:
    results = _torture(region, SLOTS, raw=False)
    for pid, reads, torn, retries, timeouts in results:
        print(f"reader {pid}: {reads} reads, {retries} retries, {timeouts} timeouts, {torn} torn")
    assert all(torn == 0 for _, _, torn, _, _ in results)
    assert all(reads > 1000 for _, reads, _, _, _ in results)
    # Proof the writer really raced the readers: some reads had to be retried.
    assert sum(retries for _, _, _, retries, _ in results) > 0


def test_torture_raw_reads_do_tear(region: SharedRegion) -> None:
    """The same readers without the protocol must see torn payloads: the check can fail."""
    results = _torture(region, 1, raw=True)
    for pid, reads, torn, _, _ in results:
        print(f"raw reader {pid}: {reads} reads, {torn} torn")
    assert sum(torn for _, _, torn, _, _ in results) >= 1
