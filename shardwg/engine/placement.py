"""Placement policy: which worker should own each peer (pure: no shared memory, no clock).

Why deliberate: a hash of the key leaves workers idle by chance. By count: at start and
on every configuration change no worker owns more than one peer more than another (N
peers on N workers: one each), new peers go to the least loaded worker, and a removal
moves only as many peers as it takes to get back there. By load: while running, a
worker that stays above `ratio` x the mean for `intervals` consecutive samples gives
one peer to the lightest worker, and only a peer whose move lowers the busiest of the
two by a margin, so one hot peer alone on a worker is never bounced between workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from shardwg.io.tun_steering import FLOW_TURNS, PACKET_TURNS
from shardwg.proto.ownership import owner_of
from shardwg.shm.placement import Mode, SpreadWhy

HOT_RATIO = 1.3  # a worker above this many times the mean load is hot...
HOT_INTERVALS = 3  # ...once it stayed so for this many consecutive samples
MIN_HOT_RATE = 1_000_000.0  # bytes/s below which no worker counts as hot (idle noise)
GAIN = 0.9  # a load move must bring the busier of the two workers below this x hot load


@dataclass(frozen=True, slots=True)
class Move:
    public_key: bytes
    src: int
    dst: int
    ratio: float = 0.0  # hot worker's load over the mean (load moves)


def counts(owners: Mapping[bytes, int], workers: int) -> list[int]:
    out = [0] * workers
    for w in owners.values():
        if 0 <= w < workers:
            out[w] += 1
    return out


def initial(keys: Iterable[bytes], workers: int, mode: Mode) -> dict[bytes, int]:
    """Owners at start: round robin in configuration order (hash mode: owner_of)."""
    if mode == Mode.HASH:
        return {k: owner_of(k, workers) for k in keys}
    return {k: i % workers for i, k in enumerate(keys)}


def place_new(owners: Mapping[bytes, int], key: bytes, workers: int, mode: Mode) -> int:
    """The owner of a peer being added: the worker with fewest peers (lowest id on a tie)."""
    if mode == Mode.HASH:
        return owner_of(key, workers)
    c = counts(owners, workers)
    return min(range(workers), key=lambda w: (c[w], w))


def rebalance(
    owners: Mapping[bytes, int],
    workers: int,
    mode: Mode,
    rates: Mapping[bytes, float] | None = None,
) -> list[Move]:
    """The fewest moves that leave no worker with more than one peer more than another.

    Each move takes the quietest peer (by `rates`, then key) of a worker with the most
    peers to a worker with the fewest; every move shrinks the excess by one, and the
    moves stop as soon as the spread is at most one, so nothing moves needlessly.
    """
    if mode == Mode.HASH or workers < 2:
        return []
    cur = dict(owners)
    c = counts(cur, workers)
    moves: list[Move] = []
    rate = rates or {}
    while max(c) - min(c) > 1:
        src = max(range(workers), key=lambda w: (c[w], -w))
        dst = min(range(workers), key=lambda w: (c[w], w))
        key = min((k for k, w in cur.items() if w == src), key=lambda k: (rate.get(k, 0.0), k))
        cur[key] = dst
        c[src] -= 1
        c[dst] += 1
        moves.append(Move(key, src, dst))
    return moves


class LoadBalancer:
    """Hysteresis over per-interval load samples; at most one move per `step`."""

    def __init__(
        self,
        workers: int,
        ratio: float = HOT_RATIO,
        intervals: int = HOT_INTERVALS,
        min_rate: float = MIN_HOT_RATE,
    ) -> None:
        self.workers = workers
        self.ratio = ratio
        self.intervals = intervals
        self.min_rate = min_rate
        self.streak = [0] * workers

    def loads(self, owners: Mapping[bytes, int], rates: Mapping[bytes, float]) -> list[float]:
        out = [0.0] * self.workers
        for k, w in owners.items():
            if 0 <= w < self.workers:
                out[w] += max(0.0, rates.get(k, 0.0))
        return out

    def step(self, owners: Mapping[bytes, int], rates: Mapping[bytes, float]) -> Move | None:
        """One interval's sample (bytes/s per peer): the move to make now, if any."""
        n = self.workers
        load = self.loads(owners, rates)
        mean = sum(load) / n if n else 0.0
        for w in range(n):
            hot = mean > 0 and load[w] > self.ratio * mean and load[w] >= self.min_rate
            self.streak[w] = self.streak[w] + 1 if hot else 0
        ready = [w for w in range(n) if self.streak[w] >= self.intervals]
        if not ready or n < 2:
            return None
        src = max(ready, key=lambda w: (load[w], -w))
        dst = min(range(n), key=lambda w: (load[w], w))
        gap = load[src] - load[dst]
        best: tuple[float, bytes] | None = None
        for k, w in owners.items():
            if w != src:
                continue
            r = max(0.0, rates.get(k, 0.0))
            if r <= 0 or max(load[src] - r, load[dst] + r) > GAIN * load[src]:
                continue  # moving it would not relieve the hot worker enough
            score = abs(gap / 2 - r)
            if best is None or (score, k) < best:
                best = (score, k)
        if best is None:
            return None
        self.streak = [0] * n  # the next move needs a fresh run of hot samples
        return Move(best[1], src, dst, round(load[src] / mean, 3))


def tun_routes(
    allowed: Mapping[bytes, Iterable[str]],
    owners: Mapping[bytes, int],
    spread_now: Mapping[bytes, SpreadWhy],
) -> dict[str, int]:
    """The routes of the TUN's steering program (io/tun_steering.py), which decides every
    packet's queue: each peer's allowed IPs (`allowed`, by peer; longest match decides, as
    for cryptokey routing) to its owner's queue (`owners`) while it is unspread, to the flow
    turns while it is spread (or has no owner), and to the packet turns while the table
    spreads it for its `Spread = packets` (both ways: the other end steers our blocks by
    counter, so each of our workers' shares reaches one worker there)."""
    out: dict[str, int] = {}
    for key, prefixes in allowed.items():
        why = spread_now.get(key)
        if why == SpreadWhy.PACKETS:
            route = PACKET_TURNS
        elif why is not None or owners.get(key, -1) < 0:
            route = FLOW_TURNS
        else:
            route = owners[key]
        for prefix in prefixes:
            out[prefix] = route
    return out


def spread_reasons(
    mode: Mode,
    keys: list[bytes],
    workers: int,
    policy: str,
    overrides: Mapping[bytes, bool],
    traffic: AbstractSet[bytes] = frozenset(),
    packets: AbstractSet[bytes] = frozenset(),
) -> dict[bytes, SpreadWhy]:
    """The peers every worker seals for (issue 12 item 2) and why, by `policy`:
    "off" none; "on" all; "auto" (the default) those in `traffic`: spread_by_traffic found
    their owner busy with them while a core sat idle (reason FEWER when there are fewer
    peers than workers, where a busy owner is enough, else TRAFFIC: a saturated one). A
    per-peer override (the configuration's `Spread`) wins over "auto" and "on"; hash
    placement (`--placement hash`, today's behaviour) and "off" never spread. What "auto"
    spreads is our sealing only (shm/placement.BOTH_WAYS). An override peer in `packets`
    (`Spread = packets`) is spread for that reason (PACKETS)."""
    if mode == Mode.HASH or workers < 2 or policy == "off":
        return {}
    by_traffic = SpreadWhy.FEWER if len(keys) < workers else SpreadWhy.TRAFFIC
    out: dict[bytes, SpreadWhy] = {}
    for k in keys:
        o = overrides.get(k)
        if o is not None:
            if o:
                out[k] = SpreadWhy.PACKETS if k in packets else SpreadWhy.OVERRIDE
        elif policy == "on":
            out[k] = SpreadWhy.POLICY
        elif policy == "auto" and k in traffic:
            out[k] = by_traffic
    return out


# Spread by measured traffic (`--spread auto`): a peer whose owner stays saturated, and
# saturated mostly by that peer, is spread, but only while a core sits idle for the other
# workers to seal on (measured: with none idle, spreading cost 9-15 % of a TCP flow's
# throughput and gained nothing); it goes back to one owner only once that owner would stay
# well below saturation with the peer's whole traffic back on it. With fewer peers than
# workers (idle workers by construction) a busy owner is enough.
SPREAD_HOT_CPU = 0.85  # the owner's CPU (cores) at or above this is saturated...
SPREAD_HOT_INTERVALS = 3  # ...once it stayed so for this many consecutive samples
SPREAD_BULK = 0.5  # ...and the peer carried at least this share of the owner's bytes
SPREAD_IDLE_CORES = 0.5  # ...and at least this much of our cores sat idle in the sample
SPREAD_COLD_CPU = 0.5  # unspread once the owner would carry it all below this...
SPREAD_COLD_INTERVALS = 5  # ...for this many consecutive samples
SPREAD_FEWER_HOT_CPU = 0.5  # the two thresholds with fewer peers than workers
SPREAD_FEWER_COLD_CPU = 0.3


@dataclass(frozen=True, slots=True)
class TrafficSample:
    """One placement interval, all rates over the same window."""

    owners: Mapping[bytes, int]
    rates: Mapping[bytes, float]  # bytes/s per peer as its owner counts them (its slot)
    worker_rates: Sequence[float]  # bytes/s per worker, every peer's it carried
    cpu: Sequence[float]  # cores per worker (1.0: one core busy)
    spread: AbstractSet[bytes]  # every peer spread now, whatever the reason
    idle: float = math.inf  # cores of ours that sat idle (observe/cpus.idle_seconds)
    fewer: bool = False  # fewer peers than workers


@dataclass(frozen=True, slots=True)
class TrafficSpread:
    """What spread_by_traffic carries from one interval to the next."""

    spread: frozenset[bytes] = frozenset()  # the peers traffic spreads
    streak: Mapping[bytes, int] = field(default_factory=dict)  # hot (unspread) / cold (spread)
    load: Mapping[bytes, float] = field(default_factory=dict)  # owner cores, for show


def one_owner_load(key: bytes, s: TrafficSample) -> float | None:
    """Cores the peer's owner would use carrying the peer alone: its CPU now plus each other
    worker's CPU times the share of that worker's bytes that are this peer's. A worker's bytes
    of spread peers it does not own (their slots count the owner's share only) are split
    between those peers by their owners' counts. None without a sample."""
    o = s.owners.get(key, -1)
    if not 0 <= o < len(s.cpu) or key not in s.rates:
        return None
    load = s.cpu[o]
    for w, (cpu, total) in enumerate(zip(s.cpu, s.worker_rates, strict=True)):
        if w == o or total <= 0:
            continue
        own = sum(r for k, r in s.rates.items() if s.owners.get(k) == w)
        others = sum(s.rates.get(k, 0.0) for k in s.spread if s.owners.get(k, -1) != w)
        if others <= 0:
            continue
        mine = max(0.0, total - own) * s.rates[key] / others
        load += cpu * min(1.0, mine / total)
    return load


def spread_by_traffic(
    state: TrafficSpread, s: TrafficSample, eligible: AbstractSet[bytes]
) -> TrafficSpread:
    """The next state after one interval (pure). Only `eligible` peers (auto, no override,
    not spread by policy) are decided; a peer is spread after SPREAD_HOT_INTERVALS samples in
    a row in which its owner used >= SPREAD_HOT_CPU cores, it carried >= SPREAD_BULK of
    the owner's bytes and >= SPREAD_IDLE_CORES of ours sat idle, and unspread after
    SPREAD_COLD_INTERVALS samples in a row in which its owner would carry it all below
    SPREAD_COLD_CPU: the gap between the two keeps a peer near the limit from flapping, and
    idle cores are not asked again (spreading uses them). With fewer peers than workers the
    SPREAD_FEWER_* thresholds apply."""
    hot_cpu, cold_cpu = ((SPREAD_FEWER_HOT_CPU, SPREAD_FEWER_COLD_CPU) if s.fewer
                         else (SPREAD_HOT_CPU, SPREAD_COLD_CPU))  # fmt: skip
    spread: set[bytes] = set()
    streak: dict[bytes, int] = {}
    load: dict[bytes, float] = {}
    for key in eligible:
        o = s.owners.get(key, -1)
        rate = s.rates.get(key)
        if key in state.spread:
            est = one_owner_load(key, s)
            cold = est is not None and est < cold_cpu
            n = state.streak.get(key, 0) + 1 if cold else 0
            if n < SPREAD_COLD_INTERVALS:
                spread.add(key)
                if n:
                    streak[key] = n
            if est is not None:
                load[key] = round(est, 3)
        elif 0 <= o < len(s.cpu) and rate is not None:
            hot = (s.cpu[o] >= hot_cpu and rate >= MIN_HOT_RATE and s.idle >= SPREAD_IDLE_CORES
                   and rate >= SPREAD_BULK * s.worker_rates[o])  # fmt: skip
            n = state.streak.get(key, 0) + 1 if hot else 0
            if n >= SPREAD_HOT_INTERVALS:
                spread.add(key)
                n = 0
            if hot:
                load[key] = round(s.cpu[o], 3)
            if n:
                streak[key] = n
    return TrafficSpread(frozenset(spread), streak, load)
