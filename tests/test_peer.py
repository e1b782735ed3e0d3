"""Timers and session life cycle of one peer, driven by a fake clock."""

from __future__ import annotations

from pairs import Pair, ipv4_packet

from shardwg.proto.constants import (
    KEEPALIVE_SIZE,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    ZERO_KEYS_AFTER,
    DropReason,
)
from shardwg.proto.peer import PeerEvent

A_TO_B = ipv4_packet("10.0.0.1", "10.0.0.2", b"ping")
B_TO_A = ipv4_packet("10.0.0.2", "10.0.0.1", b"pong")


def run_for(p: Pair, seconds: float, step: float = 0.05) -> None:
    end = p.now + seconds
    while p.now < end:
        p.advance(step)
        p.tick()


def established() -> Pair:
    p = Pair()
    p.send(p.a, A_TO_B)
    p.pump()
    assert p.peer_b.current is not None
    return p


def initiations(p: Pair, tag: str = "a->b") -> list[int]:
    return [i for i, (t, d) in enumerate(p.wire) if t == tag and d[0] == 1]


def test_rekey_after_time_when_sending() -> None:
    p = established()
    first = p.peer_b.current
    run_for(p, REKEY_AFTER_TIME - 1, step=1.0)
    p.send(p.a, A_TO_B)
    p.pump()
    assert p.peer_b.current is first  # not yet 120 s old
    run_for(p, 1.5, step=0.5)
    p.send(p.a, A_TO_B)
    p.pump()
    assert p.peer_b.current is not first
    assert p.peer_b.previous is first  # old session kept for in-flight packets


def test_reject_after_time() -> None:
    p = established()
    # B never sends; A idles past REJECT_AFTER_TIME, then data must not use the old session
    p.drop_filter = lambda tag, data: True  # the network goes away
    run_for(p, REJECT_AFTER_TIME + 1, step=1.0)
    assert p.peer_b.usable_session(p.now) is None
    assert p.send(p.a, A_TO_B) == 0  # staged, handshake needed
    # and an old transport datagram is refused by the receiver
    old = [d for t, d in p.wire if t == "a->b" and d[0] == 4][0]
    p.deliver(p.b, old, ("192.0.2.1", 51820))
    assert p.drops[-1] in (-1 - DropReason.KEY_EXPIRED, -1 - DropReason.REPLAYED)


def test_retries_every_five_seconds_with_jitter_and_give_up() -> None:
    p = Pair()
    p.drop_filter = lambda tag, data: True  # no answers ever
    start = p.now
    p.send(p.a, A_TO_B)
    p.pump()
    times: list[float] = [p.now]
    count = len(initiations(p))
    while p.now - start < 120:
        p.advance(0.01)
        p.tick()
        n = len(initiations(p))
        if n != count:
            times.append(p.now)
            count = n
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(5.0 <= g <= 5.0 + 0.334 + 0.02 for g in gaps), gaps
    assert len(set(round(g, 2) for g in gaps)) > 1  # jittered, not constant
    assert 85 <= times[-1] - start < 90  # nothing is sent after REKEY_ATTEMPT_TIME
    assert any(e == PeerEvent.HANDSHAKE_GAVE_UP for _, e in p.a.events)
    assert not p.peer_b.staged  # given up: queued packets dropped


def test_keepalive_after_ten_seconds_of_one_way_data() -> None:
    p = established()
    p.wire.clear()
    p.send(p.a, A_TO_B)
    p.pump()
    run_for(p, 9.5, step=0.5)
    assert not [d for t, d in p.wire if t == "b->a"]
    run_for(p, 1.0, step=0.1)
    keepalives = [d for t, d in p.wire if t == "b->a" and len(d) == KEEPALIVE_SIZE]
    assert len(keepalives) == 1


def test_no_keepalive_when_replying() -> None:
    p = established()
    p.wire.clear()
    p.send(p.a, A_TO_B)
    p.pump()
    p.send(p.b, B_TO_A)
    p.pump()
    run_for(p, 11, step=0.5)
    assert not [d for t, d in p.wire if t == "b->a" and len(d) == KEEPALIVE_SIZE]


def test_new_handshake_when_sent_data_gets_no_answer() -> None:
    p = established()
    p.drop_filter = lambda tag, data: tag == "b->a"
    before = len(initiations(p))
    p.send(p.a, A_TO_B)
    p.pump()
    run_for(p, 14.5, step=0.5)
    assert len(initiations(p)) == before
    run_for(p, 1.0, step=0.1)
    assert len(initiations(p)) == before + 1


def test_persistent_keepalive() -> None:
    p = Pair(keepalive=25)
    p.send(p.a, A_TO_B)
    p.pump()
    sent_at: list[float] = []
    seen = len(p.wire)
    for _ in range(int(100 / 0.05)):
        p.advance(0.05)
        p.tick()
        for tag, d in p.wire[seen:]:
            if tag == "a->b" and len(d) == KEEPALIVE_SIZE:
                sent_at.append(p.now)
        seen = len(p.wire)
    # any packet either way re-arms it; once both sides are quiet it fires every 25 s
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:], strict=False)]
    assert len(gaps) >= 2 and all(abs(g - 25) < 0.11 for g in gaps), sent_at


def test_initiator_sends_keepalive_for_key_confirmation() -> None:
    p = Pair()
    p.peer_b.send_initiation(p.now, p.wall)
    p.pump()
    # no data was waiting: the initiator confirmed with a keepalive, the responder promoted
    assert [d for t, d in p.wire if t == "a->b" and len(d) == KEEPALIVE_SIZE]
    assert p.peer_a.current is not None and p.peer_a.next is None


def test_stale_timestamp_and_flood_rejected() -> None:
    p = Pair()
    p.peer_b.send_initiation(p.now, p.wall)
    init = p.a.outbox[0][1]
    p.pump()
    p.advance(1.0)
    p.deliver(p.b, init, ("192.0.2.1", 51820))  # replay of an accepted initiation
    assert p.drops[-1] == -1 - DropReason.STALE_TIMESTAMP
    # two fresh initiations within 20 ms: the second is refused
    p.advance(10.0)
    p.peer_b.last_initiation_sent = -1e9
    p.peer_b.send_initiation(p.now, p.wall)
    p.pump()
    p.advance(0.005)
    p.peer_b.last_initiation_sent = -1e9
    p.wall += 1.0  # newer timestamp, but too soon after the last one
    p.peer_b.send_initiation(p.now, p.wall)
    p.pump()
    assert p.drops[-1] == -1 - DropReason.INITIATION_FLOOD


def test_keys_zeroed_after_three_reject_times() -> None:
    p = established()
    p.drop_filter = lambda tag, data: True
    run_for(p, ZERO_KEYS_AFTER + 1, step=2.0)
    assert p.peer_b.current is None and p.peer_b.previous is None
    assert p.peer_a.current is None
    assert not p.a.sessions and not p.b.sessions
