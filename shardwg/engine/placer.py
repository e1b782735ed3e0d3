"""The supervisor's side of placement: keeps the shared table, samples load, starts moves.

The supervisor is the table's only writer. At start it places every peer (by count, or
by hash with `--placement hash`); a configuration change places added peers and may
move a few to even the counts; with `--placement load` it samples each peer's traffic
from its slot once a second and lets `LoadBalancer` pick at most one move. A move is
only a new owner in the table plus a nudge to the workers: the old owner publishes the
peer's slot and hands it over, the new owner adopts it (engine/adoption.py), and the
move is complete when the slot's record names the new owner and is no longer `handed`.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shardwg.engine.placement import (
    SPREAD_HOT_INTERVALS,
    LoadBalancer,
    Move,
    TrafficSample,
    TrafficSpread,
    initial,
    place_new,
    rebalance,
    spread_by_traffic,
    spread_reasons,
)
from shardwg.observe.cpus import cgroup_cpu_quota, cpu_seconds, idle_seconds
from shardwg.shm import counters as C
from shardwg.shm.layout import Layout
from shardwg.shm.peerslot import decode_peer
from shardwg.shm.placement import (
    HISTORY,
    Mode,
    MoveRecord,
    PlacementTable,
    Reason,
    SpreadWhy,
    encode_table,
    table_size,
)
from shardwg.shm.seqlock import SLOT_HEADER

log = logging.getLogger("shardwg.engine.placement")
SAMPLE_INTERVAL = 1.0
_RXTX = struct.Struct("<QQ")
_RX_AT, _KEY_AT = 24, 40  # in a peer record (shm/peerslot.py): u64 rx, u64 tx; public key
# Rates span two samples: owners republish traffic counters about once a second, so a
# one-second window would now and then hold no publication at all and read as idle.
RATE_WINDOW = 2
MOVE_PATIENCE = 10.0  # seconds a move may stay unadopted before load moves go on without it


class Placer:
    def __init__(
        self,
        mode: Mode,
        workers: int,
        layout: Layout,
        buf: object,
        notify: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        cpu_of: Callable[[int], float] = cpu_seconds,
        idle_of: Callable[[], float] = idle_seconds,
        quota_of: Callable[[], float | None] = cgroup_cpu_quota,
    ) -> None:
        self.mode = mode
        self.workers = workers
        self.layout = layout
        self.buf = buf
        self.notify = notify
        self.clock = clock
        self.wall_clock = wall_clock
        self.cpu_of = cpu_of  # a worker's CPU seconds by pid (/proc)
        self.idle_of = idle_of  # idle CPU seconds of our cores so far (/proc/stat)
        self.quota_of = quota_of  # our cgroup's CPU quota in cores (None: none)
        self.slot_of: dict[bytes, int] = {}
        self.owners: dict[bytes, int] = {}
        self.table = PlacementTable(mode, [-1] * layout.peer_capacity)
        self.balancer = LoadBalancer(workers)
        self.in_flight: dict[bytes, tuple[float, MoveRecord]] = {}
        self._scratch = bytearray(table_size(layout.peer_capacity))
        # (time, bytes per peer, (pid, bytes, CPU seconds) per worker, idle CPU seconds)
        self._history: list[
            tuple[float, dict[bytes, int], list[tuple[int, int, float]], float]
        ] = []
        self._next_sample = 0.0
        self.rates: dict[bytes, float] = {}
        self.spread_policy = "off"  # "off", "auto" or "on" (engine/placement.spread_reasons)
        self.spread_overrides: dict[bytes, bool] = {}  # per-peer setting, wins over the policy
        self.spread_packets: frozenset[bytes] = frozenset()  # of those, `Spread = packets`
        self.spread_now: dict[bytes, SpreadWhy] = {}  # as last written to the table
        self.traffic = TrafficSpread()  # --spread auto: peers spread by measured traffic
        self.worker_rates: list[float] = []  # bytes/s per worker, sampled with `rates`...
        self.cpu: list[float] = []  # ...and cores per worker (only under --spread auto)
        self.idle = 0.0  # ...and our cores that sat idle (ditto)
        # told after every table write which peers are spread and why (io/tun_steering.py)
        self.on_spread: Callable[[Mapping[bytes, SpreadWhy]], object] | None = None

    # ------------------------------------------------------------------ the table
    def _write(self) -> None:
        """Publish the table up to the highest slot in use, not the whole capacity: sized
        for 65,536 peers (shm/layout.MAX_PEERS) a full table costs ~20 ms to write and as
        much for every worker to read."""
        t = self.table
        t.generation += 1
        t.owners = [-1] * (max(self.slot_of.values(), default=-1) + 1)
        for key, slot in self.slot_of.items():
            t.owners[slot] = self.owners.get(key, -1)
        self.spread_now = spread_reasons(self.mode, list(self.slot_of), self.workers,
                                         self.spread_policy, self.spread_overrides,
                                         self.traffic.spread, self.spread_packets)  # fmt: skip
        t.spread = {self.slot_of[k] for k in self.spread_now}
        t.spread_why = {self.slot_of[k]: why for k, why in self.spread_now.items()}
        self.announce()
        encode_table(t, self._scratch)
        size = table_size(len(t.owners))
        self.layout.placement_slot(self.buf).write(memoryview(self._scratch)[:size])

    def announce(self) -> None:
        """Tell `on_spread` the peers spread now (after every table write, and after a
        configuration change that may have moved their prefixes)."""
        if self.on_spread is not None:
            self.on_spread(dict(self.spread_now))

    def set_overrides(self, overrides: Mapping[bytes, bool], write: bool = True,
                      packets: Iterable[bytes] = ()) -> bool:  # fmt: skip
        """The configuration's per-peer `Spread` (on and packets: True, off: False, auto
        peers absent; `packets`: the peers set to packets). True if they changed; then
        (with `write`) the table is rewritten and the workers re-read it, so a reload
        re-marks a peer without a restart."""
        new, by_packet = dict(overrides), frozenset(packets)
        if new == self.spread_overrides and by_packet == self.spread_packets:
            return False
        self.spread_overrides, self.spread_packets = new, by_packet
        if any(new.values()) and (self.spread_policy == "off" or self.mode == Mode.HASH):
            log.warning("placement: Spread = on in the configuration has no effect with "
                        "--spread off or --placement hash")  # fmt: skip
        if write:
            self._write()
            self.notify()
        return True

    def owner(self, key: bytes) -> int:
        return self.owners.get(key, -1)

    def start(self, keys: Iterable[bytes], slot_of: Mapping[bytes, int]) -> None:
        """Place the configured peers (in configuration order) before any worker starts."""
        keys = list(keys)
        self.slot_of = dict(slot_of)
        self.owners = initial(keys, self.workers, self.mode)
        self._write()

    # ------------------------------------------------------------------ configuration
    def add(self, key: bytes, slot: int, write: bool = True) -> int:
        """Place a peer being added (call before the workers hear of it). Adding many:
        `write=False` for each, then `flush()` once (one table write per change)."""
        self.slot_of[key] = slot
        self.owners[key] = place_new(self.owners, key, self.workers, self.mode)
        if write:
            self._write()
        return self.owners[key]

    def flush(self) -> None:
        self._write()

    def remove(self, key: bytes, write: bool = True) -> None:
        self.slot_of.pop(key, None)
        self.owners.pop(key, None)
        self.in_flight.pop(key, None)
        if write:
            self._write()

    def rebalance(self) -> list[Move]:
        """After a configuration change: even the counts with the fewest moves."""
        moves = rebalance(self.owners, self.workers, self.mode, self.rates)
        for m in moves:
            self._begin(m, Reason.COUNT)
        if moves:
            self._write()
            self.notify()
        return moves

    # ------------------------------------------------------------------ moves
    def _begin(self, m: Move, reason: Reason) -> None:
        self.owners[m.public_key] = m.dst
        rec = MoveRecord(m.public_key, m.src, m.dst, reason, self.wall_clock(), m.ratio)
        self.table.history.insert(0, rec)
        del self.table.history[HISTORY:]
        self.table.moves_total += 1
        self.in_flight[m.public_key] = (self.clock(), rec)
        log.info("placement: peer %s… from worker %d to %d (%s%s)", m.public_key[:4].hex(),
                 m.src, m.dst, reason.name.lower(),
                 f", worker {m.src} at {m.ratio:.2f}x the mean" if m.ratio else "")  # fmt: skip

    def move(self, m: Move, reason: Reason) -> None:
        """Start one move now (load moves and tests)."""
        self._begin(m, reason)
        self._write()
        self.notify()

    def _check_in_flight(self, now: float) -> bool:
        changed = False
        for key, (began, rec) in list(self.in_flight.items()):
            slot = self.slot_of.get(key)
            if slot is None:
                self.in_flight.pop(key)
                continue
            try:
                pr = decode_peer(self.layout.peer_slot(self.buf, slot).read(max_retries=100))
            except Exception:
                continue
            if pr is not None and pr.owner == rec.dst and not pr.handed:
                rec.latency = round(now - began, 4)
                self.in_flight.pop(key)
                changed = True
                log.info("placement: peer %s… adopted by worker %d after %.3f s",
                         key[:4].hex(), rec.dst, rec.latency)  # fmt: skip
            elif now - began > MOVE_PATIENCE:
                self.in_flight.pop(key)  # e.g. a worker being replaced: it adopts at boot
                log.warning("placement: peer %s… not adopted by worker %d after %.0f s",
                            key[:4].hex(), rec.dst, MOVE_PATIENCE)  # fmt: skip
        return changed

    # ------------------------------------------------------------------ load
    def _sample(self, now: float, workers: bool = False) -> None:
        """Each peer's bytes/s (received + sent) over the last RATE_WINDOW samples; with
        `workers` also each worker's bytes/s and cores (its counters and /proc)."""
        # Two words and the key of each record, not a decode of all of it: the owner stores
        # rx/tx into those words at every count (outside the seqlock, one aligned store each),
        # and a decode per peer per second cost 0.06 cores at 10,000 peers.
        totals: dict[bytes, int] = {}
        buf: Any = self.buf
        base, stride = self.layout.peers_offset + SLOT_HEADER, self.layout.peer_stride
        for key, slot in self.slot_of.items():
            off = base + slot * stride
            if buf[off + _KEY_AT : off + _KEY_AT + 32] == key:
                rx, tx = _RXTX.unpack_from(buf, off + _RX_AT)
                totals[key] = rx + tx
        per_worker: list[tuple[int, int, float]] = []
        if workers:
            for s in C.read_all(buf, self.layout.counters_offset, self.workers):
                per_worker.append((s.pid, s.rx_bytes + s.tx_bytes, self.cpu_of(s.pid)))
        idle = self.idle_of() if workers else 0.0
        self._history.append((now, totals, per_worker, idle))
        del self._history[: -RATE_WINDOW - 1]
        then, old, before, idle0 = self._history[0]
        dt = now - then
        self.rates = {
            k: max(0, v - old[k]) / dt for k, v in totals.items() if k in old and dt > 0
        }
        self.worker_rates, self.cpu = [], []
        self.idle = max(0.0, idle - idle0) / dt if dt > 0 else 0.0
        if dt > 0 and per_worker and len(before) == len(per_worker):
            for (pid0, b0, c0), (pid, b, c) in zip(before, per_worker, strict=True):
                self.worker_rates.append(max(0, b - b0) / dt)
                # a replaced worker's CPU time starts again from zero
                self.cpu.append(max(0.0, c - c0) / dt if pid == pid0 and pid else 0.0)
        if workers:
            # under a CPU quota (a container's --cpus) the host's idle cores are no use
            # once the quota is spent: what is left of it is all another worker could get
            quota = self.quota_of()
            if quota is not None:
                self.idle = min(self.idle, max(0.0, quota - sum(self.cpu)))

    def _by_traffic(self) -> bool:
        """--spread auto: step spread_by_traffic over this interval; True if its set changed
        (then the table is rewritten and the workers nudged)."""
        eligible = {k for k in self.slot_of if k not in self.spread_overrides
                    and self.spread_now.get(k) != SpreadWhy.POLICY}  # fmt: skip
        sample = TrafficSample(self.owners, self.rates, self.worker_rates, self.cpu,
                               set(self.spread_now), self.idle,
                               len(self.slot_of) < self.workers)  # fmt: skip
        old, self.traffic = self.traffic, spread_by_traffic(self.traffic, sample, eligible)
        new = self.traffic.spread
        for key in new - old.spread:
            log.info("placement: peer %s… spread over every worker: worker %d at %.2f cores "
                     "for %d s, mostly its traffic, %.2f cores idle", key[:4].hex(),
                     self.owners.get(key, -1), self.traffic.load.get(key, 0.0),
                     SPREAD_HOT_INTERVALS, self.idle)  # fmt: skip
        for key in old.spread - new:
            log.info("placement: peer %s… back on worker %d alone (it would use %.2f cores)",
                     key[:4].hex(), self.owners.get(key, -1),
                     old.load.get(key, 0.0))  # fmt: skip
        return new != old.spread

    def traffic_spreading(self) -> bool:
        return self.spread_policy == "auto" and self.mode != Mode.HASH and self.workers > 1

    def tick(self, now: float) -> Move | None:
        """Once per supervisor turn: finish moves, and once a second sample load."""
        changed = self._check_in_flight(now) if self.in_flight else False
        move = None
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_INTERVAL
            by_traffic = self.traffic_spreading()
            if self.mode == Mode.LOAD or by_traffic:
                self._sample(now, workers=by_traffic)
            if by_traffic and self.cpu and self._by_traffic():
                self._write()
                self.notify()
                changed = False
            if self.mode == Mode.LOAD:
                if not self.in_flight and self.rates:
                    move = self.balancer.step(self.owners, self.rates)
                    if move is not None:
                        self._begin(move, Reason.LOAD)
                        self._write()
                        self.notify()
                        changed = False
        if changed:
            self._write()
        return move
