"""The control stream between supervisor and worker (issue 13, item 4), without processes:
messages of any size arrive whole, and a reader that stops never blocks the writer."""

from __future__ import annotations

import os
import socket
import time

import pytest

from shardwg.engine import control
from shardwg.engine.control_link import ControlLink


def big_batch(n: int) -> control.Batch:
    return control.Batch(
        added=[
            control.AddPeer(
                control.PeerSpec(os.urandom(32), allowed_ips=[f"10.{i >> 8}.{i & 255}.0/24"]), i
            )
            for i in range(n)
        ]
    )


def test_a_stopped_reader_never_blocks_and_big_messages_arrive_whole() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = ControlLink(ours)
    msgs: list[control.Control] = [big_batch(5000), control.RemovePeer(bytes(32)), big_batch(3)]
    t0 = time.monotonic()
    for m in msgs:  # ~700 KB: far more than the socket buffer, and than 64 KiB
        link.send(control.encode(m), t0)
    assert time.monotonic() - t0 < 1.0 and link.queue  # queued, not blocked
    assert link.stalled_for(t0 + 5) == pytest.approx(5, abs=0.01)  # the watchdog's figure
    reader = control.FrameReader()
    got: list[control.Control] = []
    theirs.setblocking(False)
    for _ in range(10000):
        link.flush(time.monotonic())
        try:
            data = theirs.recv(1 << 16)
        except BlockingIOError:
            if not link.queue:
                break
            continue
        got += [control.decode(p) for p in reader.feed(data)]
    assert got == msgs and not link.queue and link.stalled_for(time.monotonic()) == 0
    assert reader.pending == 0
    ours.close()
    theirs.close()


def test_a_closed_worker_end_drops_the_queue() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()
    link = ControlLink(ours)
    link.send(control.encode(big_batch(10)), time.monotonic())
    assert link.broken and not link.queue
    link.close()


def test_frame_reader_refuses_a_bogus_length() -> None:
    with pytest.raises(control.FrameError):
        control.FrameReader().feed(b"\xff\xff\xff\xff")
    reader = control.FrameReader()
    frame = control.frame(control.Stop())
    assert [reader.feed(frame[i : i + 1]) for i in range(len(frame))][-1] == [
        control.encode(control.Stop())
    ]


def test_the_watchdog_replaces_a_worker_that_beats_but_takes_no_control_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that still beats but has read nothing for STALL_LIMIT is killed (and then
    replaced by the reaper); one that reads slowly is left alone."""
    from shardwg.engine import workers as W
    from shardwg.engine.control_link import STALL_LIMIT

    killed: list[int] = []
    monkeypatch.setattr(W, "_kill", killed.append)
    now = time.monotonic()
    pool = W.WorkerPool(2, main=lambda slot, sock: 0, heartbeat=lambda worker: now)
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    pool.slots = [W.WorkerSlot(i, pid=1000 + i, started=now - 60) for i in range(2)]
    for slot, (ours, _theirs) in zip(pool.slots, pairs, strict=True):
        slot.control = ControlLink(ours)
        slot.control.send(control.encode(big_batch(5000)), now - STALL_LIMIT - 1)
    pairs[1][1].setblocking(False)
    pairs[1][1].recv(1 << 16)  # worker 1 took something just now: progress
    pool.slots[1].control.flush(now)  # type: ignore[union-attr]
    pool.check_heartbeats(now)
    assert killed == [1000]
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
