"""Placement moves in memory: sessions carried through the peer's slot, across crashes.

Simulated workers (tests/placement_world.py) on one shared buffer with real rings, a real
remote WireGuard Device and the supervisor's Placer. A move must never need a handshake,
never seal two packets under one (key, counter), never accept one datagram twice, and
keep one writer per slot whatever crashes in between.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardwg.engine.placement import Move
from shardwg.proto.indextable import IndexTable
from shardwg.shm.peerslot import decode_peer
from shardwg.shm.placement import Reason
from tests.placement_world import World


def _move(world: World, dst: int) -> None:
    src = world.owner()
    world.placer.move(Move(world.remote_key, src, dst), Reason.LOAD)


def test_move_carries_the_session_without_a_handshake() -> None:
    world = World(3)
    assert world.holders() == [0]
    world.handshake()
    for _ in range(5):
        assert world.gateway_send() and world.remote_send() > 0
    last_counter = world.w[0].device.peers[world.remote_key].current.send_counter
    _move(world, 2)
    world.w[0].nudge()  # the old owner hands the slot over...
    assert world.holders() == []
    rec = decode_peer(world.layout.peer_slot(world.buf, 0).read())
    assert rec is not None and rec.owner == 2 and rec.handed
    assert rec.current is not None and rec.current.send_reserved == last_counter  # exact
    # ...a datagram under the old index reaches worker 0 and is passed on, not dropped
    assert world.remote_send() == 0
    world.w[2].drain()  # RELEASE first, then the datagram behind it: adopted and accepted
    assert world.holders() == [2]
    assert len(world.seen) == 7
    peer = world.w[2].device.peers[world.remote_key]
    assert peer.current is not None and peer.current.send_counter == last_counter
    assert world.gateway_send()  # the remote accepts counters that go on where 0 stopped
    for data in world.old:  # every old datagram again: none is accepted twice
        world.deliver(data)
        world.settle(1)
    assert world.handshakes == 1
    world.placer.tick(world.now + 0.01)
    assert world.placer.in_flight == {}


def test_third_worker_packets_wait_for_the_adoption() -> None:
    """Worker 1 learns of the move before the old owner hands over: a datagram it passes
    to the new owner is held there, then accepted once the slot is adopted."""
    world = World(3)
    world.handshake()
    _move(world, 2)
    world.w[2].nudge()  # the new owner knows first: the record is not its yet
    assert world.holders() == [0] and world.remote_key in world.w[2].placement.incoming
    world.w[0].nudge()
    assert world.remote_send() == 0  # old index -> worker 0 -> passed to 2
    world.w[2].drain()
    assert world.holders() == [2] and len(world.seen) == 2


def test_old_owner_crash_before_handing_over() -> None:
    """The old owner dies before it read the new table: its replacement hands the slot over."""
    world = World(2)
    world.handshake()
    world.gateway_send()
    _move(world, 1)
    world.w[1].nudge()
    world.crash(0)  # boots from the table: not the owner, but its record says it is
    assert world.holders() == []
    world.w[1].drain()
    assert world.holders() == [1]
    assert world.gateway_send()
    seen = len(world.seen)
    assert world.remote_send() == 0  # the old index: 0' passes it on (known from the record)
    world.w[1].drain()
    assert len(world.seen) == seen + 1 and world.handshakes == 1


def test_release_lost_with_its_sender() -> None:
    """The RELEASE never reaches the ring: the new owner finds the handed record by polling."""
    world = World(2)
    world.handshake()
    _move(world, 1)
    world.w[0].push = lambda dst, data, kind: False  # type: ignore[method-assign]
    world.w[0].placement.push = world.w[0].push
    world.w[0].nudge()
    world.crash(0)
    world.w[1].nudge()
    world.w[1].tick()
    assert world.holders() == [1] and world.gateway_send()


class MovesAndCrashes(RuleBasedStateMachine):
    """Random moves, nudges, ring drains, ticks, crashes, sends and replays."""

    def __init__(self) -> None:
        super().__init__()
        self.world = World(3)
        self.world.handshake()

    @rule(dst=st.integers(0, 2))
    def move(self, dst: int) -> None:
        if dst != self.world.owner():
            _move(self.world, dst)

    @rule(i=st.integers(0, 2))
    def nudge(self, i: int) -> None:
        self.world.w[i].nudge()

    @rule(i=st.integers(0, 2))
    def drain(self, i: int) -> None:
        self.world.w[i].drain()

    @rule(i=st.integers(0, 2))
    def tick(self, i: int) -> None:
        self.world.w[i].tick()

    @rule(i=st.integers(0, 2))
    def crash(self, i: int) -> None:
        self.world.crash(i)

    @rule()
    def remote_sends(self) -> None:
        self.world.remote_send()

    @rule()
    def gateway_sends(self) -> None:
        self.world.gateway_send()

    @precondition(lambda self: self.world.old)
    @rule(pick=st.integers(0, 10**6))
    def replay(self, pick: int) -> None:
        self.world.deliver(self.world.old[pick % len(self.world.old)])

    @invariant()
    def one_writer(self) -> None:
        assert len(self.world.holders()) <= 1

    def teardown(self) -> None:
        w = self.world
        w.settle()
        assert w.holders() == [w.owner()], "the table's owner adopted the peer"
        assert w.gateway_send(), "the session survived: no handshake needed"
        before = len(w.seen)
        w.remote_send()
        w.settle()
        assert len(w.seen) == before + 1
        assert w.handshakes == 1


MovesAndCrashes.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
test_moves_and_crashes = MovesAndCrashes.TestCase


def test_a_released_session_leaves_the_index_table_the_way_a_released_one_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever mirrors the index table (the batch data path) must see the session go: the
    old owner's replay state may never accept again. Its index stays reserved."""
    world = World(2)
    world.handshake()
    table = world.w[0].device.table
    index = world.w[0].device.peers[world.remote_key].current.local_index
    released: list[int] = []
    real = IndexTable.release

    def release(self: IndexTable, i: int) -> None:
        released.append(i)
        real(self, i)

    monkeypatch.setattr(IndexTable, "release", release)
    _move(world, 1)
    world.w[0].nudge()
    assert index in released and index not in table.sessions
    assert index in table.allocator and index in world.w[0].device.moved


def test_record_torn_by_a_dying_writer_is_claimed_afresh() -> None:
    """The old owner died mid-write (sequence left odd): nobody can read the slot, so the
    new owner waits a few checks (a live writer finishes in microseconds), then claims it
    without sessions: a new handshake, never a guess at counters."""
    world = World(2)
    world.handshake()
    _move(world, 1)
    slot = world.layout.peer_slot(world.buf, 0)
    seq = memoryview(world.buf)[slot.offset : slot.offset + 8].cast("Q")
    seq[0] |= 1  # a write begun and never finished
    world.crash(0)
    world.w[1].nudge()
    assert world.holders() == []
    for _ in range(3):
        world.w[1].tick()
    assert world.holders() == [1]
    assert world.w[1].device.peers[world.remote_key].current is None
    assert decode_peer(slot.read()) is not None  # the new writer repaired the slot
