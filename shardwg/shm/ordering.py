"""Where more than one worker is sound: CPUs that keep stores and loads in order.

Why: the seqlock (seqlock.py), the handoff rings (ring.py), the per-worker counters
(counters.py) and the recv_floor word (peerslot.py) pass data between processes
with plain loads and stores and no barrier, because CPython cannot emit one. They
are correct under x86-64's total store order: stores become visible in program
order and loads are not reordered with other loads. On weakly ordered CPUs (arm64,
POWER, RISC-V) a consumer could see a ring's new head or a slot's even sequence
before the payload behind it: a corrupt packet or session handed across workers.

Decision: refuse more than one worker on any other architecture, with a message
that says so, rather than run unsound. One worker is sound everywhere: nothing on
the hot path crosses processes (no handoff mesh), and a replacement worker is
forked after its predecessor died, so every store it made is visible. What still
crosses processes with one worker is read-only observation (`shardwg show`,
/metrics and the supervisor reading counters and peer slots) and the cookie secret
and under-load flag a worker reads from the supervisor; on a weakly ordered CPU a
torn read there costs a wrong figure on screen or one refused cookie, never a
reused nonce or an accepted replay.
"""

from __future__ import annotations

import platform

ORDERED_MACHINES = frozenset({"x86_64", "amd64"})  # platform.machine() spellings of x86-64


def machine() -> str:
    return platform.machine().lower() or "unknown"


def multi_worker_ok() -> bool:
    """True if this CPU keeps the store and load order the lock-free structures rely on."""
    return machine() in ORDERED_MACHINES


def check_workers(workers: int) -> None:
    """ValueError with the reason if `workers` cannot run soundly on this CPU."""
    if workers > 1 and not multi_worker_ok():
        raise ValueError(
            f"{workers} workers need x86-64: the shared-memory seqlocks, rings and counters "
            f"rely on its store ordering and this CPU is {machine()}; "
            "run with --workers 1 (docs/architecture.md, 'Memory ordering')"
        )
