"""One peer spread over simulated workers: counter blocks, crashes, moves, rekeys (no root).

The workers are Keypairs over one real spread ledger (shm/spread.py on a bytearray) and
the owner's published sequential reservation; the remote end is both a plain WireGuard
receiver (one replay window, every datagram in send order) and a spread receiver (one
window per worker, steered by the counter as the reuseport program would). A hypothesis
state machine drives random sends, crashes, rekeys, spreading and moves, and checks:
no (key, counter) sealed twice, every datagram within the receiver's window (the plain
receiver accepts each one the first time), no datagram accepted twice on replay.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from shardwg.proto.constants import REPLAY_WINDOW
from shardwg.proto.index import SPREAD_INDEX_BIT
from shardwg.proto.keypair import RESERVATION_BLOCK, Keypair, open_into, seal_into
from shardwg.proto.spread import (
    SPREAD_BLOCK,
    SpreadBlocks,
    block_start,
    receiver_worker,
)
from shardwg.shm.spread import SpreadArea, area_size

_PLAIN = bytearray(64 + 32)
_COUNTER = struct.Struct("<Q")


def test_block_start_picks_the_workers_class() -> None:
    assert block_start(0, 2, 0) == 0
    assert block_start(1, 2, 0) == SPREAD_BLOCK
    assert block_start(0, 2, 1) == 2 * SPREAD_BLOCK
    assert block_start(1, 3, 5 * SPREAD_BLOCK) == 7 * SPREAD_BLOCK
    for w in range(4):
        for at in (0, 1, 1023, 1024, 5000, 99999):
            start = block_start(w, 4, at)
            assert start >= at and start % SPREAD_BLOCK == 0
            assert receiver_worker(start, 4) == w
            assert start - at < 4 * SPREAD_BLOCK + SPREAD_BLOCK


def test_ledger_cells_by_session() -> None:
    area = SpreadArea(bytearray(area_size(3, 2)), 3, 2)
    led = area.peer(1)
    assert led.base(7) == -1 and led.front(7) == 0 and led.reserved(0, 7) == 0
    led.publish_base(7, 4096)
    led.publish(1, 7, 6144)
    assert (led.base(7), led.reserved(1, 7), led.front(7)) == (4096, 6144, 6144)
    led.publish(1, 8, 1024)  # a new session replaces the old in the worker's cell
    assert led.reserved(1, 7) == 0 and led.reserved(1, 8) == 1024 and led.front(8) == 1024
    assert area.peer(0).front(7) == 0 and area.peer(2).front(8) == 0
    area.clear(1)
    assert led.base(7) == -1
    with pytest.raises(IndexError):
        area.peer(3)
    with pytest.raises(ValueError):
        SpreadArea(bytearray(10), 3, 2)


def test_a_lagging_worker_jumps_past_the_front() -> None:
    area = SpreadArea(bytearray(area_size(1, 2)), 1, 2)
    led = area.peer(0)
    send, recv = os.urandom(32), os.urandom(32)
    kps = [Keypair(send, recv, 5, 9, True, 0.0) for _ in range(2)]
    blocks = [SpreadBlocks(w, 2, led) for w in range(2)]
    blocks[0].begin(kps[0])
    assert blocks[1].follow(kps[1])
    out = bytearray(200)
    assert seal_into(kps[1], memoryview(_PLAIN), 32, 1420, memoryview(out)) > 0
    assert _COUNTER.unpack_from(out, 8)[0] == SPREAD_BLOCK  # worker 1's first block
    for _ in range(3 * REPLAY_WINDOW):
        seal_into(kps[0], memoryview(_PLAIN), 32, 1420, memoryview(out))
    blocks[1].keep_up(kps[1])
    seal_into(kps[1], memoryview(_PLAIN), 32, 1420, memoryview(out))
    counter = _COUNTER.unpack_from(out, 8)[0]
    assert counter >= led.front(5) - SPREAD_BLOCK * 2 > 2 * REPLAY_WINDOW
    assert receiver_worker(counter, 2) == 1


def test_a_follower_waits_for_the_owners_base() -> None:
    area = SpreadArea(bytearray(area_size(1, 2)), 1, 2)
    kp = Keypair(os.urandom(32), os.urandom(32), 5, 9, True, 0.0)
    assert not SpreadBlocks(1, 2, area.peer(0)).follow(kp)
    assert kp.blocks is None


def test_spreading_a_sequential_session_starts_above_its_reservation() -> None:
    """The owner counted sequentially (reserving RESERVATION_BLOCK ahead) before spreading:
    no worker's block may start below what the owner published."""
    area = SpreadArea(bytearray(area_size(1, 2)), 1, 2)
    led = area.peer(0)
    send, recv = os.urandom(32), os.urandom(32)
    owner, other = (Keypair(send, recv, 5, 9, True, 0.0) for _ in range(2))
    owner.on_reserve = lambda kp: True
    owner.send_reserved = 2000  # e.g. restored from a slot: published 2000 ahead
    out = bytearray(200)
    for _ in range(1500):
        seal_into(owner, memoryview(_PLAIN), 32, 1420, memoryview(out))
    SpreadBlocks(0, 2, led).begin(owner)
    assert led.base(5) == 2000
    assert SpreadBlocks(1, 2, led).follow(other)
    seal_into(other, memoryview(_PLAIN), 32, 1420, memoryview(out))
    seal_into(owner, memoryview(_PLAIN), 32, 1420, memoryview(out))
    assert other.send_counter - 1 >= 2000
    assert owner.send_counter - 1 >= 2000


def test_a_replacement_worker_starts_past_its_published_block() -> None:
    area = SpreadArea(bytearray(area_size(1, 2)), 1, 2)
    led = area.peer(0)
    send, recv = os.urandom(32), os.urandom(32)
    owner = Keypair(send, recv, 5, 9, True, 0.0)
    SpreadBlocks(0, 2, led).begin(owner)
    first = Keypair(send, recv, 5, 9, True, 0.0)
    SpreadBlocks(1, 2, led).follow(first)
    out = bytearray(200)
    seal_into(first, memoryview(_PLAIN), 32, 1420, memoryview(out))
    used = _COUNTER.unpack_from(out, 8)[0]
    again = Keypair(send, recv, 5, 9, True, 0.0)  # the crashed worker's replacement
    SpreadBlocks(1, 2, led).follow(again)
    seal_into(again, memoryview(_PLAIN), 32, 1420, memoryview(out))
    assert _COUNTER.unpack_from(out, 8)[0] >= used + SPREAD_BLOCK


class Remote:
    """The peer's receive side for one session: a plain window and a spread one."""

    def __init__(self, kp: Keypair, workers: int) -> None:
        self.plain = Keypair(kp.recv_key, kp.send_key, kp.remote_index, kp.local_index,
                             not kp.is_initiator, 0.0)  # fmt: skip
        self.spread = [
            Keypair(kp.recv_key, kp.send_key, kp.remote_index, kp.local_index, False, 0.0)
            for _ in range(workers)
        ]


class SpreadMachine(RuleBasedStateMachine):
    """Random sends, crashes, rekeys, spreading and moves over N simulated workers."""

    @initialize(workers=st.integers(2, 4))
    def start(self, workers: int) -> None:
        self.n = workers
        self.area = SpreadArea(bytearray(area_size(1, workers)), 1, workers)
        self.ledger = self.area.peer(0)
        self.owner = 0
        self.spread = False  # the placement says "spread"
        self.next_index = 1
        self.slot_reserved: dict[int, int] = {}  # the owner's published send_reserved
        self.sent: set[tuple[bytes, int]] = set()
        self.wire: list[tuple[int, bytes]] = []
        self.accepted: set[tuple[int, int]] = set()
        self.kps: list[dict[int, Keypair]] = [{} for _ in range(workers)]
        self.remotes: dict[int, Remote] = {}
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.rekey()

    def _publish(self, kp: Keypair) -> bool:
        self.slot_reserved[kp.local_index] = kp.send_reserved
        return True

    def _owner_kp(self, index: int) -> Keypair:
        """The owner's Keypair as its worker holds it (restored from the slot if new)."""
        kps = self.kps[self.owner]
        kp = kps.get(index)
        if kp is None:
            send, recv = self.keys[index]
            kp = Keypair(send, recv, index, index ^ 0xFFFF, True, 0.0)
            kp.send_counter = kp.send_reserved = self.slot_reserved[index]
            kp.on_reserve = self._publish
            if self.ledger.base(index) >= 0:
                SpreadBlocks(self.owner, self.n, self.ledger).follow(kp)
            kps[index] = kp
        return kp

    @rule()
    def rekey(self) -> None:
        index = self.next_index
        self.next_index += 1
        send = hashlib.sha256(b"s%d" % index).digest()
        recv = hashlib.sha256(b"r%d" % index).digest()
        self.keys[index] = (send, recv)
        self.current = index
        kp = Keypair(send, recv, index, index ^ 0xFFFF, True, 0.0)
        kp.on_reserve = self._publish
        kp.send_reserved = kp.send_counter + RESERVATION_BLOCK  # the publisher's first block
        self._publish(kp)
        self.kps[self.owner][index] = kp
        self.remotes[index] = Remote(kp, self.n)
        if self.spread:
            SpreadBlocks(self.owner, self.n, self.ledger).begin(kp)

    @precondition(lambda self: not self.spread)
    @rule()
    def spread_on(self) -> None:
        self.spread = True
        SpreadBlocks(self.owner, self.n, self.ledger).begin(self._owner_kp(self.current))

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """A worker dies at a batch boundary; its replacement holds nothing but shm."""
        self.kps[data.draw(st.integers(0, self.n - 1))] = {}

    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        """The owner hands the peer over through its slot (exact counter, as adoption.py)."""
        dst = data.draw(st.integers(0, self.n - 1))
        if dst == self.owner:
            return
        old = self._owner_kp(self.current)
        if self.ledger.base(self.current) < 0:
            self.slot_reserved[self.current] = old.send_counter
        self.kps[self.owner].pop(self.current, None)
        self.owner = dst
        self.kps[dst].pop(self.current, None)
        self._owner_kp(self.current)

    @rule(data=st.data(), count=st.integers(1, 64), repeat=st.integers(1, 80))
    def send(self, data: st.DataObject, count: int, repeat: int) -> None:
        """`repeat` batches of `count` packets read by one worker from its TUN queue."""
        w = data.draw(st.integers(0, self.n - 1))
        index = self.current
        kp = self._follower(w, index)
        out = bytearray(128)
        for _ in range(repeat):
            if kp.blocks is not None:
                kp.blocks.keep_up(kp)
            for _ in range(count):
                size = seal_into(kp, memoryview(_PLAIN), 32, 1420, memoryview(out))
                assert size > 0
                counter = _COUNTER.unpack_from(out, 8)[0]
                assert (kp.send_key, counter) not in self.sent, "counter reused"
                self.sent.add((kp.send_key, counter))
                if kp.blocks is not None:
                    assert counter < self.ledger.reserved(kp.blocks.worker, index), "unpublished"
                    assert receiver_worker(counter, self.n) == kp.blocks.worker
                else:
                    assert counter < self.slot_reserved[index]
                self.deliver(index, bytes(out[:size]), fresh=True)

    def _follower(self, w: int, index: int) -> Keypair:
        if w == self.owner or not self.spread or self.ledger.base(index) < 0:
            return self._owner_kp(index)  # a non-owner hands the packet over
        kp = self.kps[w].get(index)
        if kp is None:
            send, recv = self.keys[index]
            kp = Keypair(send, recv, index, index ^ 0xFFFF, True, 0.0)
            assert SpreadBlocks(w, self.n, self.ledger).follow(kp)
            self.kps[w][index] = kp
        return kp

    def deliver(self, index: int, msg: bytes, fresh: bool) -> None:
        remote = self.remotes[index]
        counter = _COUNTER.unpack_from(msg, 8)[0]
        view, out = memoryview(bytearray(msg)), memoryview(bytearray(128))
        got = open_into(remote.plain, view, len(msg), out)
        if fresh and index == self.current:
            assert got >= 0, f"counter {counter} out of the window at {remote.plain.replay.highest}"
        steered = remote.spread[receiver_worker(counter, self.n)]
        got2 = open_into(steered, view, len(msg), out)
        if got2 >= 0:
            assert (index, counter) not in self.accepted, "accepted twice"
            self.accepted.add((index, counter))
        elif fresh and index == self.current:
            raise AssertionError(f"spread receiver refused fresh counter {counter}")
        if fresh:
            self.wire.append((index, msg))

    @precondition(lambda self: len(self.wire) > 0)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        index, msg = data.draw(st.sampled_from(self.wire[-200:]))
        self.deliver(index, msg, fresh=False)


SpreadMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                           deadline=None)  # fmt: skip
TestSpread = SpreadMachine.TestCase


def test_a_non_owner_seals_with_the_owners_session_from_shared_memory() -> None:
    """Real publisher, slot, secret area and ledger: the owner spreads its session, the
    other worker follows it read-only and seals; the remote WireGuard accepts every
    datagram, none with a counter used twice, also after the follower crashes."""
    from shardwg.shm.follower import SpreadFollower
    from tests.placement_world import GW_ADDR, World, ip_packet

    world = World(workers=2)
    world.handshake()
    owner = world.owner()
    other = 1 - owner
    ledger = world.layout.spread_area(world.buf).peer(0)
    peer = world.w[owner].device.peers[world.remote_key]

    def follower() -> SpreadFollower:
        return SpreadFollower(world.layout.peer_slot(world.buf, 0), world.secrets, 0,
                              world.remote_key, ledger, other, 2)  # fmt: skip

    fol = follower()
    assert fol.session() is None  # not spread yet: the packet goes to the owner
    SpreadBlocks(owner, 2, ledger).begin(peer.current)
    world.w[owner].flush_events()
    out = memoryview(bytearray(2048))
    seen: set[int] = set()

    def send(kp: Keypair) -> None:
        pkt = ip_packet("10.0.0.1", "10.9.0.2", b"spread!!")
        n = seal_into(kp, memoryview(pkt), len(pkt) - 16, 1420, out)
        assert n > 0
        counter = _COUNTER.unpack_from(out, 8)[0]
        assert counter not in seen
        seen.add(counter)
        got = world.remote.receive_transport(out, n, GW_ADDR, memoryview(bytearray(2048)),
                                             world.now, world.wall)  # fmt: skip
        assert got > 0, (counter, got)

    for round_ in range(3):
        kp = fol.session()
        assert kp is not None and kp.local_index == peer.current.local_index
        assert fol.endpoint is not None
        for _ in range(1500):
            send(kp)
        for _ in range(700):
            send(peer.current)
        if round_ == 1:
            fol = follower()  # the follower's worker crashed and was replaced
    assert {receiver_worker(c, 2) for c in seen} == {0, 1}


def test_the_table_spreads_a_peer_and_every_worker_seals_for_it() -> None:
    """--spread on: the supervisor's table marks the peer, the owner spreads its session on
    its tick, the others get followers; a move keeps every counter unique; spread off again
    hands the packets back to the owner while the session stays on blocks."""
    from shardwg.engine.placement import Move
    from shardwg.shm.placement import Reason, decode_table
    from tests.placement_world import GW_ADDR, World, ip_packet

    world = World(workers=3)
    world.placer.spread_policy = "on"
    world.placer.flush()
    assert decode_table(world.layout.placement_slot(world.buf).read()).spread == {0}
    world.settle()
    world.handshake()
    world.settle()
    out = memoryview(bytearray(2048))
    seen: set[tuple[bytes, int]] = set()

    def send_from(w: int) -> bool:
        dev = world.w[w].device
        if w == world.owner():
            peer = dev.peers[world.remote_key]
            kp = peer.current
        else:
            fol = dev.remote[world.remote_key].follower
            kp = fol.session() if fol is not None else None
        if kp is None:
            return False
        pkt = ip_packet("10.0.0.1", "10.9.0.2", b"spread!!")
        n = seal_into(kp, memoryview(pkt), len(pkt) - 16, 1420, out)
        assert n > 0
        key = (kp.send_key, _COUNTER.unpack_from(out, 8)[0])
        assert key not in seen, "counter reused"
        seen.add(key)
        got = world.remote.receive_transport(out, n, GW_ADDR, memoryview(bytearray(2048)),
                                             world.now, world.wall)  # fmt: skip
        assert got > 0
        return True

    for w in range(3):
        assert send_from(w)  # every worker seals, the owner too
    for i in range(3000):
        assert send_from(i % 3)
    others = [w for w in range(3) if w != world.owner()]
    world.placer.move(Move(world.remote_key, world.owner(), others[0]), Reason.LOAD)
    world.settle()
    for i in range(3000):
        send_from(i % 3)
    workers_seen = {receiver_worker(c, 3) for _k, c in seen}
    assert workers_seen == {0, 1, 2}
    world.placer.spread_policy = "off"
    world.placer.flush()
    world.settle()
    owner = world.owner()
    assert all(world.w[w].device.remote[world.remote_key].follower is None
               for w in range(3) if w != owner)  # fmt: skip
    for _ in range(100):
        assert send_from(owner)


def _spread_world(workers: int) -> Any:
    from tests.placement_world import World

    world = World(workers=workers)
    world.steer_spread = True  # and for every replacement worker
    for w in world.w:
        w.device.table.allocator.steer_spread = True
    world.placer.spread_policy = "on"
    world.placer.flush()
    world.settle()
    world.handshake()
    world.settle()
    return world


def _steer(world: Any, data: bytes) -> int:
    import cbpf_model

    from shardwg.io import steering

    got = cbpf_model.run(steering.program(world.workers, spread=True), b"", data)
    return data[4] if got == steering.FALLBACK else got


def test_receive_spread_over_workers_each_with_its_own_window() -> None:
    """A spread peer's datagrams, steered by counter as the kernel program does, are opened
    by every worker (its own replay window, its floor in the ledger); a replay of any of
    them, also after the receiving worker crashed, is refused."""
    world = _spread_world(3)
    peer = world.w[world.owner()].device.peers[world.remote_key]
    assert peer.current.local_index & SPREAD_INDEX_BIT
    got_by = [0, 0, 0]
    sent: list[bytes] = []
    for _ in range(5000):  # the remote (a plain WireGuard) counts sequentially
        data = world.remote_datagram()
        w = _steer(world, data)
        assert world.w[w].receive(data) > 0, w
        got_by[w] += 1
        sent.append(data)
    assert min(got_by) > 1000, got_by
    world.crash((world.owner() + 1) % 3)  # a non-owner dies; its replacement boots from shm
    world.settle()
    for data in sent[-3000:]:
        assert world.w[_steer(world, data)].receive(data) <= 0
    for _ in range(3000):
        data = world.remote_datagram()
        assert world.w[_steer(world, data)].receive(data) > 0


def test_when_to_spread() -> None:
    from shardwg.engine.placement import spread_reasons
    from shardwg.shm.placement import Mode, SpreadWhy

    def spread_peers(*args: Any) -> set[bytes]:
        return set(spread_reasons(*args))

    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    assert spread_peers(Mode.LOAD, [a], 2, "auto", {}) == set()  # auto: only when measured
    assert spread_reasons(Mode.LOAD, [a], 2, "auto", {}, {a}) == {a: SpreadWhy.FEWER}
    assert spread_reasons(Mode.LOAD, [a, b], 2, "auto", {}, {a}) == {a: SpreadWhy.TRAFFIC}
    assert spread_peers(Mode.COUNT, [a, b], 2, "auto", {}) == set()
    assert spread_peers(Mode.COUNT, [a, b], 4, "auto", {b: False}, {a, b}) == {a}  # override
    assert spread_peers(Mode.COUNT, [a, b, c], 2, "auto", {c: True}) == {c}
    assert spread_peers(Mode.COUNT, [a, b, c], 2, "on", {c: False}) == {a, b}
    assert spread_peers(Mode.LOAD, [a], 2, "off", {a: True}) == set()
    assert spread_peers(Mode.HASH, [a], 2, "on", {a: True}) == set()  # --placement hash
    assert spread_peers(Mode.LOAD, [a], 1, "on", {}) == set()  # one worker: nothing to spread


def _rekey_by_the_remote(world: Any) -> None:
    """The remote initiates a new handshake and the owner answers; the remote switches at
    once (initiator), the owner holds the new session as `next` until data arrives on it.
    Unlike World.handshake no datagram confirms it here: the caller steers them."""
    from tests.placement_world import GW_ADDR, REMOTE_ADDR, SOURCE

    world.now += 130.0  # past REKEY_TIMEOUT since the last initiation
    world.wall += 130.0
    world.remote.outbox.clear()
    world.rpeer.send_initiation(world.now, world.wall)
    ((_p, init),) = world.remote.outbox
    world.remote.outbox.clear()
    owner = world.w[world.owner()]
    assert owner.device.receive_handshake(init, REMOTE_ADDR, SOURCE, world.now,
                                          world.wall) is None  # fmt: skip
    ((_p, resp),) = owner.device.outbox
    owner.device.outbox.clear()
    owner.flush_events()
    assert world.remote.receive_handshake(resp, GW_ADDR, SOURCE, world.now, world.wall) is None


def _spread_world_not_owned_by_0() -> Any:
    """Two workers, receive steering on, the peer owned by worker 1: the first 1024
    counters of every session (block 0) are steered to worker 0, a non-owner."""
    from shardwg.engine.placement import Move
    from shardwg.shm.placement import Reason

    world = _spread_world(2)
    if world.owner() == 0:
        world.placer.move(Move(world.remote_key, 0, 1), Reason.LOAD)
        world.settle()
        world.now += 10.0  # a new handshake with the new owner (REKEY_TIMEOUT, 20 ms)
        world.wall += 10.0
        world.remote.outbox.clear()
        world.handshake()
        world.settle()
    assert world.owner() == 1
    return world


def test_a_session_the_remote_begins_is_opened_where_its_first_datagrams_land() -> None:
    """The remote rekeys and its first datagrams under the new session (block 0) reach
    worker 0, which does not own the peer and to whose owner the session is still `next`:
    they are opened there all the same, and the owner confirms the session (it then
    seals with it) although it never received a datagram of it itself."""
    world = _spread_world_not_owned_by_0()
    for _ in range(300):
        data = world.remote_datagram()
        assert world.w[_steer(world, data)].receive(data) > 0
    _rekey_by_the_remote(world)
    new_index = world.rpeer.current.remote_index
    opened = [0, 0]
    for _ in range(1000):  # counters 0..999: block 0, worker 0
        data = world.remote_datagram()
        w = _steer(world, data)
        assert world.w[w].receive(data) > 0, (w, "dropped a datagram of the new session")
        opened[w] += 1
    assert opened == [1000, 0]
    world.settle()
    owner_peer = world.w[world.owner()].device.peers[world.remote_key]
    assert owner_peer.current is not None and owner_peer.current.local_index == new_index
    assert world.gateway_send()  # the remote opens what the owner seals with it


def test_in_flight_datagrams_of_the_previous_session_are_opened_after_a_rekey() -> None:
    """Datagrams the remote sealed just before a rekey arrive after it, steered over both
    workers: each is opened once (previous session kept, with its floor in the ledger),
    a replay of any of them is refused, also by a worker replaced after the rekey."""
    world = _spread_world_not_owned_by_0()
    for _ in range(2000):
        data = world.remote_datagram()
        assert world.w[_steer(world, data)].receive(data) > 0
    in_flight = [world.remote_datagram() for _ in range(1500)]  # spans both workers' blocks
    _rekey_by_the_remote(world)
    for _ in range(3000):
        data = world.remote_datagram()
        assert world.w[_steer(world, data)].receive(data) > 0
    world.settle()  # the owner confirms; every worker now follows the new session
    got = [0, 0]
    for data in in_flight:
        w = _steer(world, data)
        assert world.w[w].receive(data) > 0, (w, "dropped an in-flight datagram")
        got[w] += 1
    assert min(got) > 0, got
    for data in in_flight[::7]:
        assert world.w[_steer(world, data)].receive(data) <= 0
    world.crash(0)
    world.settle()
    for data in in_flight:
        assert world.w[_steer(world, data)].receive(data) <= 0


@pytest.mark.parametrize("replay_first", [0, 1])
def test_a_move_never_accepts_a_steered_datagram_twice(replay_first: int) -> None:
    """A receive-steered peer moves: the old owner now follows it (its floor was the
    slot's, not a ledger cell), the old follower now owns it (its floor was its ledger
    cell, not the slot's). A replay of anything either accepted before is refused after."""
    from shardwg.engine.placement import Move
    from shardwg.shm.placement import Reason

    world = _spread_world(2)
    owner = world.owner()
    sent: list[bytes] = []
    # end inside a block of the follower's: its floor is then above the owner's
    while len(sent) < 5000 or _steer(world, sent[-300]) == owner:
        data = world.remote_datagram()
        assert world.w[_steer(world, data)].receive(data) > 0
        sent.append(data)
    world.placer.move(Move(world.remote_key, owner, 1 - owner), Reason.LOAD)
    world.settle()
    assert world.owner() == 1 - owner
    ordered = sorted(sent, key=lambda d: _steer(world, d) != replay_first)
    for data in ordered:
        assert world.w[_steer(world, data)].receive(data) <= 0
    for _ in range(3000):  # and fresh datagrams still get through
        data = world.remote_datagram()
        assert world.w[_steer(world, data)].receive(data) > 0


@pytest.mark.parametrize("how", ["crash", "move"])
def test_a_new_owner_seals_from_its_own_blocks_before_its_first_tick(how: str) -> None:
    """The owner of a spread session is replaced (crash) or the peer moves; the new owner
    seals before its first tick. Its restored counter (the slot's reservation, i.e. the
    base) must not run on sequentially into a block another worker seals from."""
    from shardwg.engine.placement import Move
    from shardwg.shm.placement import Reason
    from tests.placement_world import GW_ADDR, ip_packet

    world = _spread_world(3)
    owner = world.owner()
    sealed: set[tuple[bytes, int]] = set()
    out = memoryview(bytearray(2048))

    def seal(w: int, count: int) -> None:
        dev = world.w[w].device
        if w == world.owner():
            kp = dev.peers[world.remote_key].current
        else:
            kp = dev.remote[world.remote_key].follower.session()
        assert kp is not None
        for i in range(count):
            if i % 64 == 0 and kp.blocks is not None:
                kp.blocks.keep_up(kp)  # before each GSO run, as engine/outbound.py
            pkt = ip_packet("10.0.0.1", "10.9.0.2", b"counter!")
            n = seal_into(kp, memoryview(pkt), len(pkt) - 16, 1420, out)
            assert n > 0
            key = (kp.send_key, _COUNTER.unpack_from(out, 8)[0])
            assert key not in sealed, f"worker {w} reused counter {key[1]}"
            sealed.add(key)
            assert world.remote.receive_transport(out, n, GW_ADDR, memoryview(bytearray(2048)),
                                                  world.now, world.wall) > 0  # fmt: skip

    for w in range(3):
        seal(w, 10)
    if how == "crash":
        world.crash(owner)  # boots from shared memory; no tick yet
        new = owner
    else:
        new = (owner + 1) % 3
        world.placer.move(Move(world.remote_key, owner, new), Reason.LOAD)
        for sim in world.w:  # the move lands (table, release, adoption), no tick after
            sim.nudge()
            sim.drain()
        for sim in world.w:
            sim.drain()
        assert world.remote_key in world.w[new].device.peers
    seal(new, 6 * SPREAD_BLOCK)
    for w in range(3):
        if w != new:
            seal(w, 2 * SPREAD_BLOCK)


def test_a_peer_no_longer_spread_still_opens_its_steered_sessions() -> None:
    """`Spread = off` on a reload while the peer's sessions carry the steering bit: the
    remote's datagrams are still steered by counter until a new session, and every worker
    still opens them (none sealed by a non-owner any more); the confirming of a next
    session still works; once no session of the peer is steered the followers go."""
    world = _spread_world(2)
    world.placer.spread_overrides = {world.remote_key: False}
    world.placer.flush()
    world.settle()
    owner = world.owner()
    other = world.w[1 - owner].device.remote[world.remote_key]
    assert other.follower is None or other.follower.session() is None  # no sealing
    for _ in range(4096):
        data = world.remote_datagram()
        assert world.w[_steer(world, data)].receive(data) > 0
    assert world.gateway_send()
    _rekey_by_the_remote(world)  # the new session is not steered: all to the owner
    for _ in range(100):
        assert world.remote_send() > 0
    world.settle()
    peer = world.w[owner].device.peers[world.remote_key]
    assert not peer.current.local_index & SPREAD_INDEX_BIT
    assert world.gateway_send()
    _rekey_by_the_remote(world)  # the last steered session is gone from the owner's peer
    assert world.remote_send() > 0
    world.settle()
    assert other.follower is None
    assert world.w[1 - owner].device.followed == {}


def test_an_old_owner_opens_steered_datagrams_itself_after_spreading_is_off() -> None:
    """Spread = off, then the peer moves: its sessions are still steered by counter, so the
    old owner still gets its block class. It must open them itself (a receive-only
    follower), not hand them to the new owner, whose window never saw that class: after
    the old owner's replacement took its cells over, a replay was accepted twice (found by
    the state machine)."""
    from shardwg.engine.placement import Move
    from shardwg.shm.placement import Reason

    world = _spread_world(2)
    world.placer.spread_overrides = {world.remote_key: False}
    world.placer.flush()
    world.settle()
    old = world.owner()
    world.placer.move(Move(world.remote_key, old, 1 - old), Reason.LOAD)
    world.settle()
    sent = []
    for _ in range(3000):
        data = world.remote_datagram()
        sent.append(data)
        assert world.w[_steer(world, data)].receive(data) > 0  # opened where it lands
    world.crash(old)
    world.settle()
    for data in sent:
        assert world.w[_steer(world, data)].receive(data) <= 0


class SteeredGatewayMachine(RuleBasedStateMachine):
    """The real engine pieces (tests/placement_world.py: devices, publishers, placements,
    ledger, rings) of a gateway whose one peer is spread both ways, under random remote
    sends (steered by counter as the reuseport program does), datagrams held in flight,
    replays, rekeys by the remote, placement moves, worker crashes, the peer's Spread
    setting flipped and sends by any worker. Safety at every step: no datagram accepted
    twice (World.accepted), no (key, counter) sealed twice. Liveness once settled: fresh
    datagrams get through both ways."""

    @initialize(workers=st.integers(2, 3))
    def start(self, workers: int) -> None:
        self.world = _spread_world(workers)
        self.wire: list[bytes] = []
        self.in_flight: list[bytes] = []
        self.sealed: set[tuple[bytes, int]] = set()

    def _deliver(self, data: bytes) -> int:
        return int(self.world.w[_steer(self.world, data)].receive(data))

    @rule(count=st.integers(1, 1200))
    def remote_sends(self, count: int) -> None:
        for _ in range(count):
            data = self.world.remote_datagram()
            self.wire.append(data)
            self._deliver(data)

    @rule(count=st.integers(1, 1200))
    def remote_seals_for_later(self, count: int) -> None:
        for _ in range(count):
            self.in_flight.append(self.world.remote_datagram())

    @precondition(lambda self: len(self.in_flight) > 0)
    @rule(data=st.data())
    def in_flight_arrive(self, data: st.DataObject) -> None:
        batch = data.draw(st.permutations(self.in_flight))
        self.in_flight = []
        for msg in batch:
            self.wire.append(msg)
            self._deliver(msg)

    @precondition(lambda self: len(self.wire) > 0)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        for msg in data.draw(st.lists(st.sampled_from(self.wire), min_size=1, max_size=50)):
            self._deliver(msg)  # accepted only if never before (World.accepted asserts)

    @rule()
    def rekey_by_the_remote(self) -> None:
        _rekey_by_the_remote(self.world)

    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        from shardwg.engine.placement import Move
        from shardwg.shm.placement import Reason

        world = self.world
        owner = world.owner()
        to = data.draw(st.integers(0, world.workers - 1).filter(lambda w: w != owner))
        world.placer.move(Move(world.remote_key, owner, to), Reason.LOAD)
        world.settle()

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self.world.crash(data.draw(st.integers(0, self.world.workers - 1)))

    @rule(on=st.booleans())
    def spread_setting(self, on: bool) -> None:
        """A reload sets the peer's `Spread` (off: its steered sessions keep flowing)."""
        world = self.world
        world.placer.spread_overrides = {world.remote_key: on}
        world.placer.flush()
        world.settle()

    @rule(data=st.data(), count=st.integers(1, 300))
    def gateway_sends(self, data: st.DataObject, count: int) -> None:
        """Worker w reads `count` packets of the peer from its TUN queue and seals them
        (owner: its peer's current session; others: the followed one, if spread yet)."""
        from tests.placement_world import GW_ADDR, ip_packet

        world = self.world
        w = data.draw(st.integers(0, world.workers - 1))
        dev = world.w[w].device
        if w == world.owner() and world.remote_key in dev.peers:
            kp = dev.peers[world.remote_key].current
        else:
            remote = dev.remote.get(world.remote_key)
            fol = remote.follower if remote is not None else None
            kp = fol.session() if fol is not None else None
        if kp is None:
            return
        out = memoryview(bytearray(2048))
        for i in range(count):
            if i % 64 == 0 and kp.blocks is not None:
                kp.blocks.keep_up(kp)  # before each GSO run, as engine/outbound.py
            pkt = ip_packet("10.0.0.1", "10.9.0.2", b"steered!")
            n = seal_into(kp, memoryview(pkt), len(pkt) - 16, 1420, out)
            if n <= 0:
                return  # no counter could be published: nothing sent
            key = (kp.send_key, _COUNTER.unpack_from(out, 8)[0])
            assert key not in self.sealed, "a nonce was used twice"
            self.sealed.add(key)
            world.remote.receive_transport(out, n, GW_ADDR, memoryview(bytearray(2048)),
                                           world.now, world.wall)  # fmt: skip

    @rule()
    def settle_then_both_ways(self) -> None:
        world = self.world
        world.settle()
        fresh = []
        for i in range(2 * 1024 * world.workers):  # every worker's block class
            data = world.remote_datagram()
            self.wire.append(data)
            fresh.append(data)
            assert self._deliver(data) >= 0, "a fresh datagram was refused"
            if i % 64 == 63:
                world.settle(1)  # handoffs (an index of a moved peer) land, as the owner
                # drains its rings while they arrive; the owner confirms a next session
        world.settle()
        assert all(data in world.seen for data in fresh), "a fresh datagram was lost"
        assert world.gateway_send()


SteeredGatewayMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20,
                                                   deadline=None)  # fmt: skip
TestSteeredGateway = SteeredGatewayMachine.TestCase


def test_a_follower_asks_the_owner_to_rekey_a_session_it_began() -> None:
    """The gateway began the session (initiator): past REKEY_AFTER_TIME a follower that
    seals for the peer hands the owner one packet, at most once per REKEY_TIMEOUT, and the
    owner's send of it starts the rekey. Before, an owner whose peer's flows all hashed to
    other workers never rekeyed, and the session expired under load."""
    from shardwg.proto.constants import REKEY_AFTER_TIME, REKEY_TIMEOUT
    from tests.placement_world import GW_ADDR, REMOTE_ADDR, SOURCE, ip_packet

    world = _spread_world(2)
    owner = world.w[world.owner()]
    peer = owner.device.peers[world.remote_key]
    peer.endpoint = REMOTE_ADDR
    world.now += 10.0
    world.wall += 10.0
    assert peer.send_initiation(world.now, world.wall)
    ((_p, init),) = owner.device.outbox
    owner.device.outbox.clear()
    world.remote.outbox.clear()
    assert world.remote.receive_handshake(init, GW_ADDR, SOURCE, world.now, world.wall) is None
    ((_p, resp),) = world.remote.outbox
    world.remote.outbox.clear()
    assert owner.device.receive_handshake(resp, REMOTE_ADDR, SOURCE, world.now,
                                          world.wall) is None  # fmt: skip
    owner.flush_events()
    world.settle()
    assert peer.current is not None and peer.current.is_initiator
    fol = world.w[1 - world.owner()].device.remote[world.remote_key].follower
    kp = fol.session()
    assert kp is not None and kp.local_index == peer.current.local_index
    assert not fol.rekey_due(world.now + REKEY_AFTER_TIME - 1)
    late = world.now + REKEY_AFTER_TIME + 1
    assert fol.rekey_due(late)
    assert not fol.rekey_due(late + REKEY_TIMEOUT - 0.5)  # asked already
    assert fol.rekey_due(late + REKEY_TIMEOUT + 0.5)
    world.now, world.wall = late, world.wall + REKEY_AFTER_TIME + 1
    pkt = ip_packet("10.0.0.1", "10.9.0.2", b"handed!!")  # the packet the follower handed
    out = memoryview(bytearray(2048))
    assert owner.device.send_packet(peer, memoryview(pkt), len(pkt) - 16, out, world.now,
                                    world.wall) > 0  # fmt: skip
    assert any(d[0] == 1 for _p, d in owner.device.outbox), "the owner did not rekey"
