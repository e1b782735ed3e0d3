"""Per-worker counters: layout, flush semantics, summing, and word-level tear safety."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import secrets
import signal
import struct
import time
from typing import Any

import pytest

from shardwg.proto.constants import DROP_REASON_COUNT, DropReason
from shardwg.shm import counters as c
from shardwg.shm.region import HEADER_SIZE, SharedRegion


def test_layout_is_aligned_and_padded() -> None:
    assert c.WORDS == c.DROP_BASE + DROP_REASON_COUNT
    assert c.BLOCK_SIZE % 64 == 0 and c.BLOCK_SIZE >= c.WORDS * 8
    assert c.counters_size(3) == 3 * c.BLOCK_SIZE
    assert c.FIELD_NAMES[c.PEERS_OWNED] == "peers_owned" and len(c.FIELD_NAMES) == c.DROP_BASE


def test_increments_stay_local_until_flush() -> None:
    buf = bytearray(c.counters_size(2))
    w = c.WorkerCounters.for_worker(buf, 0, 1)
    w.add(c.RX_PACKETS)
    w.add(c.RX_BYTES, 1400)
    w.v[c.TX_PACKETS] += 2  # the hot path's inline form
    w.drop(DropReason.REPLAYED, 3)
    w.set(c.PEERS_OWNED, 5)
    assert w.snapshot().rx_packets == 0 and buf == bytes(len(buf))
    w.beat(12.5)
    s = w.snapshot()
    assert (s.worker, s.heartbeat, s.rx_packets, s.rx_bytes, s.tx_packets) == (1, 12.5, 1, 1400, 2)
    assert s.peers_owned == 5 and s.drops["replayed"] == 3 and s.drops["too_short"] == 0
    assert buf[: c.BLOCK_SIZE] == bytes(c.BLOCK_SIZE)  # worker 0's block untouched
    # Native u64 at the documented word: readers in other languages can rely on it.
    assert struct.unpack_from("=Q", buf, c.BLOCK_SIZE + 8 * c.RX_BYTES)[0] == 1400


def test_tick_flushes_once_per_interval() -> None:
    buf = bytearray(c.counters_size(1))
    w = c.WorkerCounters(buf, 0, flush_interval=0.005)
    assert w.tick(100.0)
    w.add(c.RX_PACKETS)
    assert not w.tick(100.004)
    assert w.snapshot().rx_packets == 0 and w.snapshot().heartbeat == 100.0
    assert w.tick(100.006)
    assert w.snapshot().rx_packets == 1 and w.snapshot().heartbeat == 100.006


def test_a_deferred_flush_bounds_the_next_wait() -> None:
    """A turn inside the interval owes a flush: the loop may wait only until it is due."""
    buf = bytearray(c.counters_size(1))
    w = c.WorkerCounters(buf, 0, flush_interval=0.005)
    assert w.tick(100.0)
    assert w.flush_due(100.001) == math.inf  # flushed: nothing owed, wait for anything
    w.add(c.RX_PACKETS)
    assert not w.tick(100.001)
    assert w.flush_due(100.002) == pytest.approx(0.003)
    assert w.flush_due(100.009) == 0.0
    assert w.tick(100.009) and w.snapshot().rx_packets == 1
    assert w.flush_due(100.010) == math.inf


def test_load_continues_from_shared_memory() -> None:
    buf = bytearray(c.counters_size(1))
    first = c.WorkerCounters(buf, 0)
    first.add(c.HANDSHAKES_COMPLETED, 4)
    first.flush()
    second = c.WorkerCounters(buf, 0)  # the restarted worker
    second.load()
    second.add(c.HANDSHAKES_COMPLETED)
    second.flush()
    assert second.snapshot().handshakes_completed == 5


def test_read_all_and_total() -> None:
    buf = bytearray(64 + c.counters_size(3))
    for wid in range(3):
        w = c.WorkerCounters.for_worker(buf, 64, wid)
        w.set(c.PID, 100 + wid)
        w.add(c.TX_BYTES, 10 * (wid + 1))
        w.drop(DropReason.NO_ROUTE, wid)
        w.beat(float(wid + 1))
    stats = c.read_all(buf, 64, 3)
    assert [s.pid for s in stats] == [100, 101, 102]
    t = c.total(stats)
    assert t.tx_bytes == 60 and t.drops["no_route"] == 3 and t.heartbeat == 1.0


def test_bad_offsets_rejected() -> None:
    with pytest.raises(ValueError):
        c.WorkerCounters(bytearray(1024), 4)
    with pytest.raises(ValueError):
        c.WorkerCounters(bytearray(c.BLOCK_SIZE), 8)


# A writer flushes values whose 8 bytes are all equal and non-zero (k * 0x0101010101010101,
# k = 1..255); a torn word would mix bytes of two values, and a zero word would be a flush
# caught half-way (struct.pack_into clears its whole target before it writes the fields: a
# heartbeat read as 0 once made the supervisor kill a healthy worker). The reader checks
# every word of every snapshot.
_ONES = 0x0101010101010101


def _flusher(name: str, deadline: float) -> None:
    region = SharedRegion.attach(name)
    w = c.WorkerCounters(region.buf, HEADER_SIZE)
    k = 0
    while time.monotonic() < deadline:
        k = k % 255 + 1
        w.v = [0.0] + [k * _ONES] * (c.WORDS - 1)
        w.flush()


def _checker(name: str, deadline: float, q: Any) -> None:
    region = SharedRegion.attach(name)
    unpack = struct.Struct(f"={c.WORDS - 1}Q").unpack_from
    reads = torn = mixed = 0
    while time.monotonic() < deadline:
        words = unpack(region.buf, HEADER_SIZE + 8)
        reads += 1
        torn += sum(1 for x in words if x != (x & 0xFF) * _ONES or not x)
        mixed += len(set(words)) > 1  # snapshots spanning two flushes: allowed
    q.put((reads, torn, mixed))


def test_flush_never_tears_a_word() -> None:
    name = f"/shardwg-test-{os.getpid()}-{secrets.token_hex(4)}-counters"
    region = SharedRegion.create(name, HEADER_SIZE + c.counters_size(1))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    deadline = time.monotonic() + 1.0
    first = c.WorkerCounters(region.buf, HEADER_SIZE)
    first.v = [0.0] + [_ONES] * (c.WORDS - 1)
    first.flush()  # the reader may start first: it must never see the block empty
    del first
    procs = [
        ctx.Process(target=_flusher, args=(name, deadline), daemon=True),
        ctx.Process(target=_checker, args=(name, deadline, q), daemon=True),
    ]
    try:
        for p in procs:
            p.start()
        reads, torn, mixed = q.get(timeout=10)
    finally:
        for p in procs:
            p.join(timeout=3)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=2)
        region.unlink()
        region.close()
    print(f"{reads} snapshots, {mixed} spanning two flushes, {torn} torn words")
    assert reads > 1000 and torn == 0
