from __future__ import annotations

import pytest

from shardwg.proto.ratelimiter import RateLimiter

V4 = bytes([198, 51, 100, 1])
V4B = bytes([198, 51, 100, 2])
V6 = bytes.fromhex("20010db8000000010000000000000001")
V6_SAME_64 = bytes.fromhex("20010db800000001ffffffffffffffff")
V6_OTHER_64 = bytes.fromhex("20010db8000000020000000000000001")


def test_burst_then_refused() -> None:
    rl = RateLimiter()
    assert [rl.allow(V4, 100.0) for _ in range(7)] == [True] * 5 + [False] * 2


def test_refill_at_packets_per_second() -> None:
    rl = RateLimiter()
    for _ in range(5):
        assert rl.allow(V4, 100.0)
    assert not rl.allow(V4, 100.049)
    assert rl.allow(V4, 100.05)  # one token per 1/20 s
    assert not rl.allow(V4, 100.05)
    # Sustained 20/s is allowed indefinitely, 21/s is not.
    t = 100.05
    for _ in range(200):
        t += 0.05
        assert rl.allow(V4, t)
    results = [rl.allow(V4, t + k / 21) for k in range(1, 200)]
    assert not all(results)


def test_refill_caps_at_burst() -> None:
    rl = RateLimiter()
    rl.allow(V4, 0.0)
    assert [rl.allow(V4, 1000.0) for _ in range(6)] == [True] * 5 + [False]


def test_sources_are_independent() -> None:
    rl = RateLimiter()
    for _ in range(5):
        rl.allow(V4, 1.0)
    assert not rl.allow(V4, 1.0)
    assert rl.allow(V4B, 1.0)
    assert len(rl) == 2


def test_ipv6_keyed_by_64() -> None:
    rl = RateLimiter(burst=2)
    assert rl.allow(V6, 1.0)
    assert rl.allow(V6_SAME_64, 1.0)
    assert not rl.allow(V6, 1.0)
    assert rl.allow(V6_OTHER_64, 1.0)
    assert len(rl) == 2


def test_gc_drops_idle_entries() -> None:
    rl = RateLimiter()
    rl.allow(V4, 10.0)
    rl.allow(V4B, 10.5)
    rl.gc(11.0)
    assert len(rl) == 2
    rl.gc(11.2)
    assert len(rl) == 1
    rl.gc(11.6)
    assert len(rl) == 0


def test_full_table_refuses_new_sources_until_gc() -> None:
    rl = RateLimiter(max_entries=3)
    for i in range(3):
        assert rl.allow(bytes([10, 0, 0, i]), 0.0)
    assert not rl.allow(bytes([10, 0, 0, 9]), 0.0)
    assert rl.allow(bytes([10, 0, 0, 1]), 0.0)  # known sources still served
    assert len(rl) == 3
    rl.gc(2.0)
    assert len(rl) == 0
    assert rl.allow(bytes([10, 0, 0, 9]), 2.0)


def test_custom_rate() -> None:
    rl = RateLimiter(packets_per_second=1, burst=3)
    assert [rl.allow(V4, 0.0) for _ in range(4)] == [True, True, True, False]
    assert not rl.allow(V4, 0.5)
    assert rl.allow(V4, 1.0)
    # Idle 1.2 s but the bucket needs 3 s to refill: gc must not hand out a fresh burst.
    rl.gc(2.2)
    assert len(rl) == 1
    assert [rl.allow(V4, 2.2) for _ in range(2)] == [True, False]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        RateLimiter().allow(b"\x01\x02\x03", 0.0)
    with pytest.raises(ValueError):
        RateLimiter(packets_per_second=0)
