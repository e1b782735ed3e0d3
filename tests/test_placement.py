"""Placement policy and the supervisor's table, in memory (no root).

By count: balanced (spread <= 1) after every change of random add/remove sequences, with
the fewest moves. By load: a hot worker gives exactly one peer per interval once it stayed
hot for the hysteresis, never a peer alone on its worker, and never on a flapping load.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwg.engine.placement import (
    HOT_INTERVALS,
    LoadBalancer,
    Move,
    counts,
    initial,
    place_new,
    rebalance,
)
from shardwg.engine.placer import Placer
from shardwg.proto.ownership import owner_of
from shardwg.shm.layout import Layout
from shardwg.shm.peerslot import PEER_RECORD_SIZE, PeerRecord, encode_peer
from shardwg.shm.placement import Mode, Reason, decode_table

HOT = 50_000_000.0


def _key(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def _min_moves(c: list[int]) -> int:
    """Fewest single-peer moves to a spread <= 1: the fullest workers keep the ceiling."""
    total, n = sum(c), len(c)
    lo, extra = divmod(total, n)
    targets = [lo + 1] * extra + [lo] * (n - extra)
    pairs = zip(sorted(c, reverse=True), targets, strict=True)
    return sum(max(0, have - want) for have, want in pairs)


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8, 16])
def test_n_peers_on_n_workers_one_each(workers: int) -> None:
    keys = [_key(i) for i in range(workers)]
    owners = initial(keys, workers, Mode.COUNT)
    assert sorted(owners.values()) == list(range(workers))


def test_hash_mode_is_owner_of() -> None:
    keys = [_key(i) for i in range(20)]
    assert initial(keys, 3, Mode.HASH) == {k: owner_of(k, 3) for k in keys}
    assert rebalance({k: 0 for k in keys}, 3, Mode.HASH) == []


@settings(max_examples=300, deadline=None)
@given(
    workers=st.integers(1, 8),
    start=st.integers(0, 20),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 10**6)), max_size=40),
)
def test_balanced_by_count_after_every_change(workers: int, start: int, ops: list) -> None:
    owners = initial([_key(i) for i in range(start)], workers, Mode.COUNT)
    next_id = start
    for add, pick in ops:
        if add or not owners:
            k = _key(next_id)
            next_id += 1
            owners[k] = place_new(owners, k, workers, Mode.COUNT)
        else:
            del owners[sorted(owners)[pick % len(owners)]]
        before = counts(owners, workers)
        moves = rebalance(owners, workers, Mode.COUNT)
        assert len(moves) == _min_moves(before)  # moves at most what is needed
        for m in moves:
            assert owners[m.public_key] == m.src
            owners[m.public_key] = m.dst
        c = counts(owners, workers)
        assert max(c) - min(c) <= 1, c


def test_random_trials_balanced_every_time() -> None:
    """The figure for the report: trials of random add/remove sequences, all balanced."""
    rng = random.Random(12)
    trials = 2000
    balanced = 0
    for _ in range(trials):
        workers = rng.randint(2, 16)
        owners = initial([_key(i) for i in range(rng.randint(0, 40))], workers, Mode.COUNT)
        nid = 1000
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.5 or not owners:
                nid += 1
                owners[_key(nid)] = place_new(owners, _key(nid), workers, Mode.COUNT)
            else:
                del owners[rng.choice(sorted(owners))]
            for m in rebalance(owners, workers, Mode.COUNT):
                owners[m.public_key] = m.dst
        c = counts(owners, workers)
        balanced += max(c) - min(c) <= 1
    print(f"balanced by count: {balanced}/{trials} trials")
    assert balanced == trials


def test_hash_mode_piles_up_by_chance() -> None:
    """Why: 2 peers on 2 workers share one worker about half the time by hash."""
    shared = sum(
        owner_of(_key(2 * i), 2) == owner_of(_key(2 * i + 1), 2) for i in range(1000)
    )
    assert 400 < shared < 600


def _three_peers() -> tuple[dict[bytes, int], dict[bytes, float]]:
    a, b, c = _key(1), _key(2), _key(3)
    return {a: 0, b: 0, c: 1}, {a: HOT, b: HOT, c: 0.0}


def test_hot_worker_moves_one_peer_after_the_hysteresis() -> None:
    owners, rates = _three_peers()
    lb = LoadBalancer(2)
    for _ in range(HOT_INTERVALS - 1):
        assert lb.step(owners, rates) is None
    move = lb.step(owners, rates)
    assert move is not None and move.src == 0 and move.dst == 1
    assert move.public_key in (_key(1), _key(2)) and move.ratio == pytest.approx(2.0)
    owners[move.public_key] = move.dst
    for _ in range(10):  # balanced now: nothing more moves
        assert lb.step(owners, rates) is None


def test_exactly_one_move_per_interval_while_hot() -> None:
    """A worker holding many hot peers gives one per interval, never two at once, and the
    hysteresis starts afresh after each move: moves at samples 3, 6, 9, 12."""
    keys = [_key(i) for i in range(8)]
    owners = {k: 0 for k in keys} | {_key(100): 1, _key(101): 2, _key(102): 3}
    rates = {k: HOT for k in keys}
    lb = LoadBalancer(4)
    moved_at = []
    for sample in range(1, 13):
        before = dict(owners)
        m = lb.step(owners, rates)
        if m is not None:
            moved_at.append(sample)
            owners[m.public_key] = m.dst
        assert sum(owners[k] != before[k] for k in owners) <= 1
    assert moved_at == [3, 6, 9, 12]
    assert sorted(lb.loads(owners, rates)) == [HOT, HOT, 2 * HOT, 4 * HOT]


def test_a_peer_alone_on_its_worker_never_moves() -> None:
    """Moving the only (hot) peer would only make another worker hot: no flapping."""
    owners = {_key(1): 0, _key(2): 1}
    rates = {_key(1): HOT, _key(2): 0.0}
    lb = LoadBalancer(2)
    assert all(lb.step(owners, rates) is None for _ in range(20))


def test_flapping_load_never_moves() -> None:
    """Hot for fewer than HOT_INTERVALS samples in a row, then cool: no move, ever."""
    owners, rates = _three_peers()
    cool = {k: 0.0 for k in rates}
    lb = LoadBalancer(2)
    for _ in range(10):
        for _ in range(HOT_INTERVALS - 1):
            assert lb.step(owners, rates) is None
        assert lb.step(owners, cool) is None


def test_idle_noise_is_not_hot() -> None:
    owners, _ = _three_peers()
    rates = {_key(1): 1000.0, _key(2): 1000.0, _key(3): 0.0}  # bytes/s of keepalives
    lb = LoadBalancer(2)
    assert all(lb.step(owners, rates) is None for _ in range(10))


# ---------------------------------------------------------------------- the table
def _placer(workers: int, capacity: int = 16) -> tuple[Placer, Layout, bytearray]:
    lay = Layout(workers, capacity)
    buf = bytearray(lay.total_size)
    nudges: list[int] = []
    t = [100.0]
    p = Placer(Mode.LOAD, workers, lay, buf, lambda: nudges.append(1), clock=lambda: t[0],
               wall_clock=lambda: 1.7e9 + t[0])  # fmt: skip
    p.nudges = nudges  # type: ignore[attr-defined]
    p.t = t  # type: ignore[attr-defined]
    return p, lay, buf


def _table(lay: Layout, buf: bytearray):  # type: ignore[no-untyped-def]
    t = decode_table(lay.placement_slot(buf).read())
    assert t is not None
    return t


def test_placer_publishes_the_table() -> None:
    p, lay, buf = _placer(4)
    keys = [_key(i) for i in range(4)]
    p.start(keys, {k: i for i, k in enumerate(keys)})
    t = _table(lay, buf)
    assert t.mode == Mode.LOAD and sorted(t.owners[:4]) == [0, 1, 2, 3]
    assert len(t.owners) == 4  # up to the highest slot in use: a slot beyond is not placed
    gen = t.generation
    assert p.add(_key(9), 7) in range(4)
    p.remove(keys[0])
    t = _table(lay, buf)
    assert t.generation > gen and t.owners[0] == -1 and t.owners[7] >= 0


def _publish(lay: Layout, buf: bytearray, slot: int, key: bytes, owner: int, nbytes: int,
             handed: bool = False) -> None:  # fmt: skip
    out = bytearray(PEER_RECORD_SIZE)
    encode_peer(PeerRecord(key, owner, 1, rx_bytes=nbytes, handed=handed), out)
    lay.peer_slot(buf, slot).write(out)


def test_placer_moves_a_hot_peer_and_records_why() -> None:
    p, lay, buf = _placer(2)
    keys = [_key(i) for i in range(3)]
    slots = {k: i for i, k in enumerate(keys)}
    p.start(keys, slots)
    owners = dict(p.owners)  # round robin: keys 0 and 2 on worker 0
    total = {k: 0 for k in keys}
    moved = None
    samples = 0
    while samples < 8:
        samples += 1
        for k in keys:
            if owners[k] == 0:
                total[k] += int(HOT)
            _publish(lay, buf, slots[k], k, owners[k], total[k])
        moved = p.tick(p.t[0]) or moved  # type: ignore[attr-defined]
        p.t[0] += 1.0  # type: ignore[attr-defined]
        if moved:
            break
    assert moved is not None and moved.src == 0 and moved.dst == 1
    assert samples == HOT_INTERVALS + 1  # the first sample only sets the baseline
    t = _table(lay, buf)
    assert t.moves_total == 1 and t.history[0].reason == Reason.LOAD
    assert t.history[0].latency == -1 and t.owners[slots[moved.public_key]] == 1
    # the old owner hands the slot over, then the new one adopts it: the move is complete
    _publish(lay, buf, slots[moved.public_key], moved.public_key, 1, 0, handed=True)
    p.tick(p.t[0])  # type: ignore[attr-defined]
    assert _table(lay, buf).history[0].latency == -1
    p.t[0] += 0.25  # type: ignore[attr-defined]
    _publish(lay, buf, slots[moved.public_key], moved.public_key, 1, 0)
    p.tick(p.t[0])  # type: ignore[attr-defined]
    t = _table(lay, buf)
    assert not p.in_flight and t.history[0].latency == pytest.approx(1.25, abs=0.01)


def test_placer_rebalance_after_removal_moves_only_what_is_needed() -> None:
    p, lay, buf = _placer(2)
    keys = [_key(i) for i in range(4)]
    p.start(keys, {k: i for i, k in enumerate(keys)})
    p.remove(keys[1])
    p.remove(keys[3])  # both of worker 1's peers gone: 2 vs 0
    moves = p.rebalance()
    assert len(moves) == 1 and moves[0].dst == 1
    t = _table(lay, buf)
    assert t.moves_total == 1 and t.history[0].reason == Reason.COUNT
    assert sorted(o for o in t.owners if o >= 0) == [0, 1]
    assert p.nudges  # type: ignore[attr-defined]
    assert math.isclose(t.history[0].wall, 1.7e9 + 100.0)


def test_show_and_metrics_render_the_moves() -> None:
    from shardwg.observe import exposition
    from shardwg.observe.show import render
    from shardwg.observe.status import GatewayStatus, placement_status

    p, lay, buf = _placer(2)
    keys = [_key(i) for i in range(3)]
    p.start(keys, {k: i for i, k in enumerate(keys)})
    p.move(Move(keys[0], 0, 1, 2.5), Reason.LOAD)
    pl = placement_status(_table(lay, buf))
    assert pl is not None and pl.mode == "load" and pl.moves == 1
    st = GatewayStatus("wg9", 1, 2, 1, 1.0, True, False, [], [], {}, pl)
    text = render(st)
    assert "placement: load (1 move)" in text
    assert "worker 0 -> 1" in text and "load: worker 0 at 2.50x the mean; in flight" in text
    page = exposition.render(st)
    assert 'shardwg_placement_moves_total{interface="wg9",mode="load"} 1.0' in page
    assert 'reason="load",src="0"' in page


@pytest.mark.parametrize("mode", [Mode.HASH, Mode.COUNT])
def test_hash_and_count_modes_never_move_on_load(mode: Mode) -> None:
    lay = Layout(2, 16)
    buf = bytearray(lay.total_size)
    t = [0.0]
    p = Placer(mode, 2, lay, buf, clock=lambda: t[0])
    keys = [_key(i) for i in range(4)]
    slots = {k: i for i, k in enumerate(keys)}
    p.start(keys, slots)
    if mode == Mode.HASH:
        assert p.owners == {k: owner_of(k, 2) for k in keys}
    for second in range(10):
        for k in keys:
            _publish(lay, buf, slots[k], k, p.owners[k], int(HOT) * second * (k == keys[0]))
        assert p.tick(t[0]) is None
        t[0] += 1.0
    assert _table(lay, buf).moves_total == 0


def test_cli_placement_option() -> None:
    from shardwg.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "-c", "x.conf"]).placement == "load"
    assert parser.parse_args(["run", "-c", "x.conf", "--placement", "hash"]).placement == "hash"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "-c", "x.conf", "--placement", "random"])
