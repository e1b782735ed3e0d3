"""Nonces and timestamps fail closed across crashes (issue 13, item 5), in memory.

A gateway worker (Worker + Device + SessionPublisher over a bytearray region) talks to a
remote peer (a plain Device). Hypothesis drives random traffic both ways, handshakes from
either side, re-deliveries of old datagrams (replays), and faults in the worker's writes of
its peer record: a crash just before or just after a write, a crash in the middle of one (the
sequence word left odd), or a write that fails without a crash. A crash throws away
everything the worker held in memory; its replacement boots from the region, as
engine/boot.py does. What was sent before the crash stays sent.

Invariants, over every run and across every incarnation of the worker:
- no (send key, counter) pair is ever sent twice (a reused nonce breaks ChaCha20-Poly1305);
- no datagram from the peer is accepted twice: a transport packet delivered twice, or an
  initiation answered twice (its TAI64N timestamp must be published before the response
  leaves). A crash in the middle of a write loses the record, keys and timestamp with it,
  like a restarted wireguard: initiations answered before it may be answered once more.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from shardwg.engine.worker import Worker
from shardwg.proto import crypto, keypair
from shardwg.proto.constants import MessageType
from shardwg.proto.device import Device
from shardwg.shm.layout import Layout
from shardwg.shm.publisher import SessionPublisher
from shardwg.shm.secrets import SecretArea

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("192.0.2.2", 51821)
PRIV_A = crypto.generate_private_key(os.urandom(32))
PRIV_B = crypto.generate_private_key(os.urandom(32))
PUB_A, PUB_B = crypto.public_key(PRIV_A), crypto.public_key(PRIV_B)
PACKET = bytes.fromhex("4500001c000000004011") + bytes(10) + bytes(8)  # IPv4/UDP, 28 bytes
BLOCK = 4  # send counters reserved per publication (small: many reservation points)
STATS: Counter[str] = Counter()


class Crash(BaseException):
    """The worker process died here (BaseException: no `except Exception` survives it)."""


class Faults:
    """What the next write of the peer record does: 'ok', 'crash-before', 'crash-after',
    'crash-torn' (dies between the sequence's two stores), or 'fail' (OSError)."""

    def __init__(self) -> None:
        self.plan: list[str] = []
        self.torn = False

    def next(self) -> str:
        return self.plan.pop(0) if self.plan else "ok"


class FaultySlot:
    def __init__(self, slot: Any, faults: Faults) -> None:
        self.slot, self.faults = slot, faults

    def read(self, *a: Any, **kw: Any) -> Any:
        return self.slot.read(*a, **kw)

    def write(self, payload: Any) -> None:
        action = self.faults.next()
        STATS[f"write {action}"] += 1
        if action == "crash-before":
            raise Crash(action)
        if action == "fail":
            raise OSError("injected: the record could not be written")
        if action == "crash-torn":
            self.slot._begin()  # sequence odd, half the payload written, then death
            n = len(payload) // 2
            self.slot._mv[self.slot._start : self.slot._start + n] = payload[:n]
            self.faults.torn = True  # the record (keys, last timestamp) is lost
            raise Crash(action)
        self.slot.write(payload)
        if action == "crash-after":
            raise Crash(action)


def ip_packet(tag: int) -> bytes:
    pkt = bytearray(PACKET)
    pkt[12:16] = bytes([10, 0, 0, 2])  # source: the remote peer's tunnel address
    pkt[16:20] = bytes([10, 0, 0, 1])
    pkt[4:6] = (tag & 0xFFFF).to_bytes(2, "big")
    return bytes(pkt)


class GatewayCrashes(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        STATS["runs"] += 1
        self.layout = Layout.sized(1, 4)
        self.buf = bytearray(self.layout.total_size)
        self.layout.write_to(self.buf)
        # Session keys live in their own area (inherited by forked workers); it survives a
        # crash like the region does.
        self.secrets = SecretArea(self.layout.peer_capacity, bytearray(
            SecretArea.size_for(self.layout.peer_capacity)))  # fmt: skip
        self.slot_of = {PUB_B: 0}
        self.faults = Faults()
        self.now, self.wall = 1000.0, 1.7e9
        self.b = Device(PRIV_B, os.urandom)
        self.b_peer = self.b.add_peer(PUB_A, allowed_ips=["10.0.0.1/32"], endpoint=A_ADDR)
        self.to_a: list[bytes] = []  # every datagram the peer ever sent (kept: replays)
        self.to_b: list[bytes] = []
        self.sent: set[tuple[bytes, int]] = set()  # (send key, counter) the gateway sent
        self.accepted: set[bytes] = set()  # transport datagrams the gateway accepted
        self.answered: set[bytes] = set()  # each initiation answered
        self.handling = b""  # the peer's datagram the gateway is handling
        self.seq = 0
        # Checked by the invariant (an assert inside a rule would be taken for a crash).
        self.violations: list[str] = []
        self.boot()

    # ------------------------------------------------------------------ the worker
    def boot(self) -> None:
        """A (replacement) worker, as engine/boot.py builds one."""
        while True:
            try:
                self._boot()
                return
            except Crash:
                STATS["crash during boot"] += 1
                self.forget_if_torn()

    def _boot(self) -> None:
        dev = Device(PRIV_A, os.urandom)
        peer = dev.add_peer(PUB_B, allowed_ips=["10.0.0.2/32"], endpoint=B_ADDR)
        pub = SessionPublisher(self.layout, self.buf, self.slot_of, 0, self.secrets)
        pub._slot = lambda index, _s=pub._slot: FaultySlot(_s(index), self.faults)  # type: ignore[method-assign,misc,assignment]
        counters = self.layout.counters(self.buf, 0)
        worker = Worker(dev, -1, None, None, counters, publisher=pub)
        worker.send_datagram = self.wire_out  # type: ignore[method-assign]
        self.dev, self.peer, self.worker = dev, peer, worker
        try:
            if not pub.restore(peer, self.now):
                pub.track(peer)
        except OSError:
            pass  # a failed write at boot: the worker runs on, unpublished

    def crash(self, why: str) -> None:
        STATS[f"crash: {why}"] += 1
        self.forget_if_torn()
        self.boot()

    def forget_if_torn(self) -> None:
        """A death inside a write leaves the record unreadable: the replacement knows no
        session (no nonce can be reused) and no timestamp, like a restarted wireguard, so
        initiations answered before may be answered once more."""
        if self.faults.torn:
            self.faults.torn = False
            self.answered.clear()

    def wire_out(self, data: Any, addr: Any) -> None:
        """The gateway sent `data`: check the invariants on it."""
        data = bytes(data)
        if data[0] == MessageType.TRANSPORT:
            index, counter = struct.unpack_from("<IQ", data, 4)
            key = self.send_key(index)
            if (key, counter) in self.sent:
                self.violations.append(f"nonce {counter} reused under one key")
            self.sent.add((key, counter))
            STATS["transport sent"] += 1
        elif data[0] == MessageType.RESPONSE:
            answers = self.handling
            assert answers[:1] == bytes([MessageType.INITIATION])
            if answers in self.answered:
                self.violations.append("an initiation was answered twice")
            self.answered.add(answers)
            STATS["responses sent"] += 1
        self.to_b.append(data)

    def send_key(self, remote_index: int) -> bytes:
        for kp in (self.peer.current, self.peer.previous, self.peer.next):
            if kp is not None and kp.remote_index == remote_index:
                return kp.send_key
        raise AssertionError("sent under a session the worker does not hold")

    def guarded(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
            self.worker.flush_outbox()
        except Crash as c:
            self.crash(str(c))
        except Exception as exc:  # escaping the worker's loop kills the process too
            self.crash(f"died of {type(exc).__name__}")

    # ------------------------------------------------------------------ rules
    @rule(kinds=st.lists(st.sampled_from(["crash-before", "crash-after", "crash-torn", "fail"]),
                         min_size=1, max_size=3),
          gap=st.integers(0, 6))  # fmt: skip
    def arm(self, kinds: list[str], gap: int) -> None:
        self.faults.plan = ["ok"] * gap + kinds

    @rule(dt=st.sampled_from([0.001, 0.05, 1.0, 6.0, 30.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.wall += dt
        self.b.tick(self.now, self.wall)
        self.b_outbox()
        self.guarded(self.dev.tick, self.now, self.wall)

    @rule()
    def crash_between_turns(self) -> None:
        self.crash("between turns")

    @rule()
    def peer_initiates(self) -> None:
        self.b_peer.send_initiation(self.now, self.wall)
        self.b_outbox()

    @rule()
    def gateway_initiates(self) -> None:
        self.guarded(self.peer.send_initiation, self.now, self.wall)

    @rule(gateway_first=st.booleans())
    def handshake(self, gateway_first: bool) -> None:
        """A whole handshake in one step (either side first), confirmed by data."""
        self.time_passes(6.0)
        if gateway_first:
            self.gateway_initiates()
            if self.to_b and self.to_b[-1][0] == MessageType.INITIATION:
                self.deliver_to_peer(0, True)
                self.deliver_to_gateway(0, True)
        else:
            self.peer_initiates()
            self.deliver_to_gateway(0, True)
            if self.to_b and self.to_b[-1][0] == MessageType.RESPONSE:
                self.deliver_to_peer(0, True)
        self.peer_sends(1)
        self.deliver_to_gateway(0, True)

    @rule(n=st.integers(1, 12), replay=st.integers(0, 1 << 16))
    def exchange(self, n: int, replay: int) -> None:
        """n packets each way, every one delivered, then one old datagram replayed."""
        self.gateway_sends(n)
        scratch = memoryview(bytearray(256))
        for data in self.to_b[-n:]:
            if data[0] == MessageType.TRANSPORT:
                self.b.receive_transport(memoryview(data), len(data), A_ADDR, scratch, self.now,
                                         self.wall)  # fmt: skip
        self.peer_sends(n)
        for i in range(n, 0, -1):
            self.deliver_to_gateway(len(self.to_a) - i, False)
        self.deliver_to_gateway(replay, False)

    @rule(n=st.integers(1, 12))
    def gateway_sends(self, n: int) -> None:
        self.guarded(self._gateway_sends, n)

    def _gateway_sends(self, n: int) -> None:
        """As OutboundPath.send_packets: one error never stops the batch."""
        out = memoryview(bytearray(256))
        for _ in range(n):
            self.seq += 1
            plain = memoryview(bytearray(ip_packet(self.seq) + bytes(64)))
            plain[12:16], plain[16:20] = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
            try:
                size = self.dev.send_packet(self.peer, plain, len(PACKET), out, self.now,
                                            self.wall)  # fmt: skip
            except Exception:
                STATS["send errors"] += 1
                continue
            if size > 0:
                self.wire_out(out[:size], B_ADDR)

    @rule(n=st.integers(1, 12))
    def peer_sends(self, n: int) -> None:
        out = memoryview(bytearray(256))
        for _ in range(n):
            self.seq += 1
            plain = memoryview(bytearray(ip_packet(self.seq) + bytes(64)))
            size = self.b.send_packet(self.b_peer, plain, len(PACKET), out, self.now, self.wall)
            if size > 0:
                self.to_a.append(bytes(out[:size]))
        self.b_outbox()

    @rule(pick=st.integers(0, 1 << 16), newest=st.booleans())
    def deliver_to_gateway(self, pick: int, newest: bool) -> None:
        """Deliver one of the peer's datagrams: the newest, or any old one (a replay)."""
        if not self.to_a:
            return
        data = self.to_a[-1] if newest else self.to_a[pick % len(self.to_a)]
        self.guarded(self._gateway_receives, data)

    def _gateway_receives(self, data: bytes) -> None:
        if data[0] == MessageType.TRANSPORT:
            out = memoryview(bytearray(256))
            try:
                res = self.dev.receive_transport(memoryview(data), len(data), B_ADDR, out,
                                                 self.now, self.wall)  # fmt: skip
            except Exception:
                STATS["receive errors"] += 1
                return
            if res >= 0:
                if data in self.accepted:
                    self.violations.append("a transport datagram was accepted twice")
                self.accepted.add(data)
                STATS["transport accepted"] += 1
            return
        self.handling = data
        self.dev.receive_handshake(data, B_ADDR, b"\x00" * 6, self.now, self.wall)
        self.worker.flush_outbox()

    @rule(pick=st.integers(0, 1 << 16))
    def replay_initiation(self, pick: int) -> None:
        old = [d for d in self.to_a if d[0] == MessageType.INITIATION]
        if old:
            self.guarded(self._gateway_receives, old[pick % len(old)])

    @rule(pick=st.integers(0, 1 << 16), newest=st.booleans())
    def deliver_to_peer(self, pick: int, newest: bool) -> None:
        if not self.to_b:
            return
        data = self.to_b[-1] if newest else self.to_b[pick % len(self.to_b)]
        if data[0] == MessageType.TRANSPORT:
            self.b.receive_transport(memoryview(data), len(data), A_ADDR,
                                     memoryview(bytearray(256)), self.now, self.wall)  # fmt: skip
        else:
            self.b.receive_handshake(data, A_ADDR, b"\x00" * 6, self.now, self.wall)
        self.b_outbox()

    def b_outbox(self) -> None:
        for _peer, data in self.b.outbox:
            self.to_a.append(bytes(data))
        self.b.outbox.clear()
        self.b.events.clear()

    @invariant()
    def nothing_sent_or_accepted_twice(self) -> None:
        assert not self.violations, self.violations


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keypair, "RESERVATION_BLOCK", BLOCK)
    import shardwg.shm.publisher as publisher

    if hasattr(publisher, "RESERVATION_BLOCK"):
        monkeypatch.setattr(publisher, "RESERVATION_BLOCK", BLOCK)


@pytest.mark.usefixtures("small_blocks")
def test_no_nonce_reused_no_datagram_accepted_twice_across_crashes() -> None:
    STATS.clear()
    runs = int(os.environ.get("SWG_NONCE_RUNS", "200"))
    GatewayCrashes.TestCase.settings = settings(
        max_examples=runs, stateful_step_count=60, deadline=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    GatewayCrashes.TestCase().runTest()
    print("stateful nonce test:", dict(sorted(STATS.items())))
    assert STATS["transport sent"] and STATS["transport accepted"] and STATS["responses sent"]
    assert sum(v for k, v in STATS.items() if k.startswith("crash")) > 0


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("gap", range(BLOCK + 2))
def test_failed_reservation_then_crash(gap: int) -> None:
    """The shapes that found the fail-open paths, replayed as fixed steps: a record write
    fails (at each offset from a reservation), traffic goes on, the worker crashes, the
    replacement sends; then the peer's initiation is replayed after a crash that struck
    just before the record that held its timestamp."""
    m = GatewayCrashes()
    m.setup()
    m.handshake(False)
    m.arm(["fail"], gap)
    m.gateway_sends(BLOCK * 3)
    m.crash_between_turns()
    m.gateway_sends(BLOCK * 3)
    m.arm(["crash-before"], 0)
    m.handshake(False)
    m.replay_initiation(len(m.to_a) - 1)
    m.nothing_sent_or_accepted_twice()
    m.teardown()
