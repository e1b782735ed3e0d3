"""SpscRing: unit tests on plain buffers, then a two-process torture test in real shm."""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import struct
import time
import zlib
from typing import Any

import pytest

from shardwg.shm.region import HEADER_SIZE, SharedRegion
from shardwg.shm.ring import SpscRing


def _ring(slots: int = 8, slot_size: int = 64) -> tuple[bytearray, SpscRing]:
    buf = bytearray(64 + SpscRing.size(slots, slot_size))
    return buf, SpscRing(buf, 64, slots, slot_size)


def _pop(r: SpscRing) -> bytes | None:
    out = bytearray(r.slot_size)
    n = r.pop_into(out)
    return None if n < 0 else bytes(out[:n])


def test_push_pop_order_integrity_kind_aux() -> None:
    _, r = _ring()
    items = [(bytes([i]) * i, i % 3, 1000 + i) for i in range(1, 7)]
    for data, kind, aux in items:
        assert r.push(data, kind, aux)
    assert len(r) == 6
    for data, kind, aux in items:
        assert _pop(r) == data and (r.last_kind, r.last_aux) == (kind, aux)
    assert _pop(r) is None and len(r) == 0


def test_empty_record_and_memoryview_input() -> None:
    _, r = _ring()
    assert r.push(b"") and r.push(memoryview(b"abc")) and r.push(bytearray(b"xy"), 65535, 65535)
    assert _pop(r) == b"" and _pop(r) == b"abc" and _pop(r) == b"xy"
    assert (r.last_kind, r.last_aux) == (65535, 65535)


def test_documented_byte_layout() -> None:
    buf, r = _ring(slots=4, slot_size=64)
    r.push(b"hello", kind=2, aux=7)
    base = 64
    assert struct.unpack_from("<Q", buf, base)[0] == 1  # head
    assert struct.unpack_from("<Q", buf, base + 64)[0] == 0  # tail, next cache line
    assert struct.unpack_from("<IHH", buf, base + 128) == (5, 2, 7)
    assert buf[base + 136 : base + 141] == b"hello"
    assert SpscRing.size(4, 64) % 64 == 0 and SpscRing.size(4, 64) == 128 + 4 * 128


def test_full_ring_refuses_and_recovers() -> None:
    _, r = _ring(slots=4)
    assert all(r.push(bytes([i])) for i in range(4))
    assert not r.push(b"x") and len(r) == 4
    assert _pop(r) == b"\x00"
    assert r.push(b"late")
    assert [_pop(r) for _ in range(4)] == [b"\x01", b"\x02", b"\x03", b"late"]


def test_oversize_refused_exact_size_accepted() -> None:
    _, r = _ring(slot_size=64)
    assert not r.push(bytes(65)) and len(r) == 0
    assert r.push(bytes(range(64))) and _pop(r) == bytes(range(64))


def test_wraparound_over_many_laps() -> None:
    _, r = _ring(slots=4, slot_size=32)
    expected: list[bytes] = []
    got: list[bytes] = []
    for i in range(1000):  # uneven push/pop mix so head and tail wrap at different phases
        data = i.to_bytes(4, "little") * (1 + i % 8)
        if r.push(data):
            expected.append(data)
        if i % 3:
            item = _pop(r)
            if item is not None:
                got.append(item)
    while (item := _pop(r)) is not None:
        got.append(item)
    assert got == expected and len(expected) > 600


def test_pop_batch_limits_and_single_tail_store() -> None:
    buf, r = _ring(slots=8, slot_size=16)
    for i in range(5):
        r.push(bytes([i]) * (i + 1), kind=i, aux=10 * i)
    bufs = [memoryview(bytearray(16)) for _ in range(3)]
    sizes, kinds, auxs = [0] * 3, [0] * 3, [0] * 3
    assert r.pop_batch(bufs, sizes, kinds, auxs, 8) == 3  # bounded by len(bufs)
    assert sizes == [1, 2, 3] and kinds == [0, 1, 2] and auxs == [0, 10, 20]
    assert bytes(bufs[2][:3]) == b"\x02\x02\x02"
    assert struct.unpack_from("<Q", buf, 64 + 64)[0] == 3
    assert r.pop_batch(bufs, sizes, kinds, auxs, 1) == 1 and sizes[0] == 4
    assert r.pop_batch(bufs, sizes, kinds, auxs, 3) == 1 and kinds[0] == 4
    assert r.pop_batch(bufs, sizes, kinds, auxs, 3) == 0


def test_separate_producer_and_consumer_objects() -> None:
    """Each side caches the other's index; stale (lagging) caches must stay correct."""
    buf, prod = _ring(slots=4)
    cons = SpscRing(buf, 64, 4, 64)
    late = SpscRing(buf, 64, 4, 64)  # made before any traffic, like a forked replacement
    for lap in range(5):
        assert all(prod.push(bytes([lap, i])) for i in range(4)) and not prod.push(b"!")
        assert [_pop(cons) for _ in range(4)] == [bytes([lap, i]) for i in range(4)]
    assert _pop(late) is None  # its cached head (0) lags the tail (20): re-read, empty
    prod.push(b"z")
    assert _pop(late) == b"z" and _pop(cons) is None


def test_reset_and_len() -> None:
    _, r = _ring(slots=4)
    r.push(b"a")
    r.push(b"b")
    assert len(r) == 2
    r.reset()
    assert len(r) == 0 and _pop(r) is None
    assert all(r.push(b"c") for _ in range(4)) and not r.push(b"c")


@pytest.mark.parametrize(
    "offset,slots,slot_size", [(4, 8, 64), (0, 6, 64), (0, 8, 0), (-8, 8, 64), (0, 64, 64)]
)
def test_bad_geometry_rejected(offset: int, slots: int, slot_size: int) -> None:
    with pytest.raises(ValueError):
        SpscRing(bytearray(SpscRing.size(8, 64)), offset, slots, slot_size)


# ---------------------------------------------------------------- torture test

SLOTS = 64
SLOT_SIZE = 2048
DURATION = 2.0
CTRL = HEADER_SIZE  # u64 stop flag for the producer
RING_AT = HEADER_SIZE + 64
DATA, END = 1, 2
_SEQ_CRC = struct.Struct("<QI")


class _EarlyPublishRing(SpscRing):
    """The bug the design forbids: head published before the record is written."""

    __slots__ = ()

    def push(self, data: Any, kind: int = 0, aux: int = 0) -> bool:
        w = self._w
        head = w[0]
        if head - w[8] >= self.slots:
            return False
        w[0] = head + 1
        i = head & self._mask
        w[self._hdr[i]] = len(data) | kind << 32 | aux << 48
        self._payload[i][: len(data)] = data
        return True


def _producer(name: str, broken: bool) -> None:
    region = SharedRegion.attach(name)
    cls = _EarlyPublishRing if broken else SpscRing
    ring = cls(region.buf, RING_AT, SLOTS, SLOT_SIZE)
    stop = memoryview(region.buf)[CTRL : CTRL + 8].cast("Q")
    bodies = [os.urandom(n) for n in range(0, SLOT_SIZE - _SEQ_CRC.size + 1, 97)]
    record = bytearray(SLOT_SIZE)
    seq = 0
    while not stop[0]:
        body = bodies[seq % len(bodies)]
        n = _SEQ_CRC.size + len(body)
        record[_SEQ_CRC.size : n] = body
        struct.pack_into("<Q", record, 0, seq)
        crc = zlib.crc32(memoryview(record)[12:n], zlib.crc32(record[:8]))
        struct.pack_into("<I", record, 8, crc)
        while not ring.push(memoryview(record)[:n], DATA, seq & 0xFFFF):
            if stop[0]:
                break  # this record was not sent: END below carries the true count
        else:
            seq += 1
    while not ring.push(seq.to_bytes(8, "little"), END):
        pass


def _consumer(name: str, deadline: float, broken: bool, q: Any) -> None:
    region = SharedRegion.attach(name)
    ring = SpscRing(region.buf, RING_AT, SLOTS, SLOT_SIZE)
    bufs = [memoryview(bytearray(SLOT_SIZE)) for _ in range(16)]
    sizes, kinds, auxs = [0] * 16, [0] * 16, [0] * 16
    expected = corrupt = empty = batches = 0
    sent = -1
    start = time.monotonic()
    while time.monotonic() < deadline:
        if expected % 2:  # exercise both pop paths under contention
            count = ring.pop_batch(bufs, sizes, kinds, auxs, 16)
            batches += count > 0
        else:
            sizes[0] = ring.pop_into(bufs[0])
            kinds[0], auxs[0] = ring.last_kind, ring.last_aux
            count = int(sizes[0] >= 0)
        if not count:
            empty += 1
            continue
        for k in range(count):
            rec, n = bufs[k], sizes[k]
            if kinds[k] == END:
                sent = int.from_bytes(rec[:8], "little")
                break
            seq, crc = _SEQ_CRC.unpack_from(rec, 0)
            ok = (
                kinds[k] == DATA
                and seq == expected
                and auxs[k] == seq & 0xFFFF
                and crc == zlib.crc32(rec[12:n], zlib.crc32(rec[:8]))
            )
            if not ok:
                corrupt += 1
                if broken:
                    q.put((expected, corrupt, empty, batches, sent, time.monotonic() - start))
                    return
            expected = seq + 1
        if sent >= 0:
            break
    q.put((expected, corrupt, empty, batches, sent, time.monotonic() - start))


def _torture(broken: bool, duration: float) -> tuple[Any, ...]:
    name = f"/shardwg-test-{os.getpid()}-{secrets.token_hex(4)}-ring"
    region = SharedRegion.create(name, RING_AT + SpscRing.size(SLOTS, SLOT_SIZE))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    stop = memoryview(region.buf)[CTRL : CTRL + 8].cast("Q")
    deadline = time.monotonic() + duration + 3  # consumer's hard bound
    procs = [
        ctx.Process(target=_producer, args=(name, broken), daemon=True),
        ctx.Process(target=_consumer, args=(name, deadline, broken, q), daemon=True),
    ]
    try:
        for p in procs:
            p.start()
        time.sleep(duration)
        stop[0] = 1
        return tuple(q.get(timeout=10))
    finally:
        stop[0] = 1
        stop.release()
        for p in procs:
            p.join(timeout=3)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=2)
        region.unlink()
        region.close()


def test_torture_two_processes_strict_order_no_corruption() -> None:
    received, corrupt, empty, batches, sent, elapsed = _torture(False, DURATION)
    print(
        f"{received} records in {elapsed:.2f} s ({received / elapsed:,.0f}/s), "
        f"{corrupt} corrupt, {empty} empty polls, {batches} batch pops, producer sent {sent}"
    )
    assert corrupt == 0
    assert sent == received  # every record arrived, in order, and nothing extra
    assert received > 10000 and batches > 100
    assert empty > 100  # the consumer caught up with the producer: they really raced


def test_torture_detects_early_publish() -> None:
    """The same checker against a ring that publishes too early must see corruption."""
    received, corrupt, empty, *_ = _torture(True, DURATION)
    print(f"early publish: corrupt record after {received} good ones ({empty} empty polls)")
    assert corrupt >= 1
