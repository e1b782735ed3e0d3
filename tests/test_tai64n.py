from __future__ import annotations

import pytest

from shardwg.proto import tai64n


def test_layout_matches_wireguard_go() -> None:
    # 1 s after the epoch, 0.5 s: 500_000_000 rounded down to a multiple of 2**24.
    ts = tai64n.timestamp(1.5)
    assert len(ts) == 12
    assert ts[:8] == (0x400000000000000A + 1).to_bytes(8, "big")
    nanos = int.from_bytes(ts[8:], "big")
    assert nanos == 500_000_000 & ~((1 << 24) - 1) == 0x1D000000


def test_known_value() -> None:
    assert tai64n.timestamp(0.0).hex() == "400000000000000a00000000"
    assert tai64n.timestamp(1700000000.0).hex() == "400000006553f10a00000000"


def test_nanoseconds_rounded_down_to_2_24() -> None:
    for frac in (0.0, 0.001, 0.0167, 0.0168, 0.5, 0.999999):
        nanos = int.from_bytes(tai64n.timestamp(1000.0 + frac)[8:], "big")
        assert nanos % (1 << 24) == 0
        assert nanos <= frac * 1e9 + 1e3
        assert frac * 1e9 - nanos < (1 << 24) + 1e3


def test_within_one_whitening_step_compares_equal() -> None:
    assert tai64n.timestamp(1000.001) == tai64n.timestamp(1000.010)


@pytest.mark.parametrize(
    ("earlier", "later"),
    [(1000.0, 1000.02), (1000.9, 1001.0), (999.99, 1000.0), (1.0, 2**33 + 0.5)],
)
def test_bytes_order_is_time_order(earlier: float, later: float) -> None:
    a, b = tai64n.timestamp(earlier), tai64n.timestamp(later)
    assert b > a
    assert tai64n.is_newer(b, a)
    assert not tai64n.is_newer(a, b)
    assert not tai64n.is_newer(a, a)
    assert tai64n.is_newer(a, tai64n.ZERO)


def test_round_trip() -> None:
    assert tai64n.to_unix(tai64n.timestamp(1700000000.75)) == pytest.approx(1700000000.75, abs=0.02)
