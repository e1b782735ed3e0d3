"""ReplayWindow against wireguard-go's replay test table and a naive set-based model."""

from __future__ import annotations

import random

import pytest

from shardwg.proto.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW
from shardwg.proto.replay import ReplayWindow

W = REPLAY_WINDOW  # wireguard-go's windowSize
T_LIM = W + 1
LIMIT = REJECT_AFTER_MESSAGES

# wireguard-go replay/replay_test.go TestReplay, as data (their limit constant differs
# from REJECT_AFTER_MESSAGES but the table only depends on it being huge).
WG_TABLE: list[tuple[int, bool]] = [
    (0, True),
    (1, True),
    (1, False),
    (9, True),
    (8, True),
    (7, True),
    (7, False),
    (T_LIM, True),
    (T_LIM - 1, True),
    (T_LIM - 1, False),
    (T_LIM - 2, True),
    (2, True),
    (2, False),
    (T_LIM + 16, True),
    (3, False),
    (T_LIM + 16, False),
    (T_LIM * 4, True),
    (T_LIM * 4 - (T_LIM - 1), True),
    (10, False),
    (T_LIM * 4 - T_LIM, False),
    (T_LIM * 4 - (T_LIM + 1), False),
    (T_LIM * 4 - (T_LIM - 2), True),
    (T_LIM * 4 + 1 - T_LIM, False),
    (0, False),
    (LIMIT, False),
    (LIMIT - 1, True),
    (LIMIT, False),
    (LIMIT - 1, False),
    (LIMIT - 2, True),
    (LIMIT + 1, False),
    (LIMIT + 2, False),
    (LIMIT - 2, False),
    (LIMIT - 3, True),
    (0, False),
]


def _run(steps: list[tuple[int, bool]]) -> None:
    w = ReplayWindow()
    for i, (counter, expected) in enumerate(steps, 1):
        assert w.check(counter) == expected, f"check step {i}: {counter}"
        assert w.accept(counter) == expected, f"accept step {i}: {counter}"


def test_wireguard_go_table() -> None:
    _run(WG_TABLE)


# wireguard-go's "Bulk test" 1-6.
BULK: list[list[tuple[int, bool]]] = [
    [(i, True) for i in range(1, W + 1)] + [(0, True), (0, False)],
    [(i, True) for i in range(2, W + 2)] + [(1, True), (0, False)],
    [(i, True) for i in range(W + 1, 0, -1)],
    [(i, True) for i in range(W + 2, 1, -1)] + [(0, False)],
    [(i, True) for i in range(W, 0, -1)] + [(W + 1, True), (0, False)],
    [(i, True) for i in range(W, 0, -1)] + [(0, True), (W + 1, True)],
]


@pytest.mark.parametrize("steps", BULK, ids=[f"bulk{i}" for i in range(1, 7)])
def test_wireguard_go_bulk(steps: list[tuple[int, bool]]) -> None:
    _run(steps)


def test_zero_is_valid_once() -> None:
    w = ReplayWindow()
    assert w.accept(0)
    assert not w.accept(0)


def test_exact_window_edge() -> None:
    w = ReplayWindow()
    assert w.accept(100_000)
    assert not w.check(100_000 - W - 1)
    assert w.check(100_000 - W)
    assert w.accept(100_000 - W)
    assert not w.accept(100_000 - W)


def test_far_jump_forgets_everything_behind() -> None:
    w = ReplayWindow()
    for c in range(200):
        assert w.accept(c)
    big = 10**15
    assert w.accept(big)
    assert not w.accept(150)
    for c in (big - W, big - 1, big - 4096):
        assert w.accept(c)
    assert not w.accept(big - W - 1)


@pytest.mark.parametrize("gap", [8127, 8128, 8129, 8191, 8192, 8193, 16384])
def test_jumps_around_ring_size_clear_stale_slots(gap: int) -> None:
    w = ReplayWindow()
    for c in range(0, 9000):
        assert w.accept(c)
    top = 8999 + gap
    assert w.accept(top)
    for c in range(max(9000, top - W), top):
        assert w.accept(c), c  # never seen, so fresh even if its slot was used before
    for c in range(top - W, min(9000, top)):
        assert not w.accept(c), c  # seen before the jump and still inside the window


def test_out_of_order_within_window() -> None:
    w = ReplayWindow()
    order = list(range(5000))
    random.Random(7).shuffle(order)
    for c in order:
        assert w.accept(c)
    for c in order:
        assert not w.accept(c)


def test_check_does_not_mark() -> None:
    w = ReplayWindow()
    for _ in range(3):
        assert w.check(5)
    assert w.highest == 0
    assert w.accept(5)
    assert not w.check(5)


def test_rejects_negative_and_limit() -> None:
    w = ReplayWindow()
    assert not w.accept(-1)
    assert not w.check(-1)
    assert not w.accept(LIMIT)
    assert w.accept(LIMIT - 1)


def test_reset() -> None:
    w = ReplayWindow()
    for c in (0, 1, 50_000):
        w.accept(c)
    w.reset()
    assert w.highest == 0
    assert w.accept(0) and w.accept(1)
    assert w.snapshot() == _fresh_with(0, 1)


def _fresh_with(*counters: int) -> bytes:
    w = ReplayWindow()
    for c in counters:
        w.accept(c)
    return w.snapshot()


class NaiveWindow:
    """The specification, spelled out: a set of everything seen and the highest counter."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.last = 0

    def accept(self, counter: int) -> bool:
        if counter >= LIMIT or counter < 0 or counter in self.seen:
            return False
        if counter <= self.last and self.last - counter > W:
            return False
        self.seen.add(counter)
        self.last = max(self.last, counter)
        return True


def _random_counters(rng: random.Random, n: int) -> list[int]:
    out: list[int] = []
    top = 0
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            top += 1
            c = top
        elif r < 0.55:
            c = top - rng.randrange(0, W + 70)  # around the window edge
        elif r < 0.65:
            c = top - rng.choice([W - 1, W, W + 1, 8191, 8192, 8193])
        elif r < 0.8:
            top += rng.randrange(2, 300)
            c = top
        elif r < 0.85:
            top += rng.choice([8127, 8128, 8129, 8191, 8192, 8193, 20_000])
            c = top
        elif r < 0.95:
            c = rng.choice(out) if out else 0  # a replay
        else:
            c = rng.choice([0, 1, LIMIT - 1, LIMIT, top + 1])
        out.append(c)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_matches_naive_model(seed: int) -> None:
    rng = random.Random(seed)
    w, model = ReplayWindow(), NaiveWindow()
    for i, c in enumerate(_random_counters(rng, 6000)):
        pre = w.check(c)
        got = w.accept(c)
        assert got == model.accept(c), f"seed {seed} step {i} counter {c}"
        assert pre == got
        if rng.random() < 0.01:  # occasionally round-trip through a snapshot mid-stream
            w = ReplayWindow.restore(w.snapshot())


def test_snapshot_round_trip() -> None:
    rng = random.Random(99)
    w = ReplayWindow()
    counters = _random_counters(rng, 3000)
    for c in counters:
        w.accept(c)
    snap = w.snapshot()
    assert len(snap) == ReplayWindow.SNAPSHOT_SIZE <= 1100
    twin = ReplayWindow.restore(memoryview(bytearray(snap)))
    assert twin.highest == w.highest
    assert twin.snapshot() == snap
    probe = list(range(max(0, w.highest - W - 50), w.highest + 50)) + counters[-500:]
    for c in probe:
        assert twin.check(c) == w.check(c)
    for c in probe:
        assert twin.accept(c) == w.accept(c)


def test_snapshot_layout_is_bit_per_slot() -> None:
    # 8194 wraps to slot 2; as in wireguard-go, moving on clears whole 64-counter blocks
    # after the old highest's (125): blocks 126, 127 and 0, which held counter 3
    snap = _fresh_with(3, 70, 8000, 8194)
    assert int.from_bytes(snap[:8], "little") == 8194
    bits = int.from_bytes(snap[8:], "little")
    assert bits == (1 << 70) | (1 << 8000) | (1 << 2)


def test_restore_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ReplayWindow.restore(b"\x00" * 10)
    bad = LIMIT.to_bytes(8, "little") + bytes(ReplayWindow.SNAPSHOT_SIZE - 8)
    with pytest.raises(ValueError):
        ReplayWindow.restore(bad)
