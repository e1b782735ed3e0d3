"""Initiation admission: what share of cookie-less initiations the kernel lets through.

Why: under a flood of initiations with valid mac1 from spoofed sources, the only
useful thing a worker can do with them is answer a budgeted number with cookie
replies. Reading the rest in Python costs ~6 us each, and, worse, while the worker
reads them the socket's receive buffer overflows and the kernel drops the honest
peers' transport datagrams with them. So while under load the worker asks the kernel
(a socket filter, io/initiation_filter.py) to pass only a random share of the
initiations whose mac2 is all zero: about as many per second as the cookie budget
can answer. Initiations with a non-zero mac2 (the retry of a peer that got a cookie),
those from known peer endpoints and every other message always pass.

This object is the pure half: it counts the cookie-less initiations that reached the
worker, estimates how many were offered (counted / share), and picks the share, a
power of two so the filter changes rarely. The estimate also keeps a shedding worker
under load while the flood goes on even though its handshake queue no longer fills.
"""

from __future__ import annotations

import math

ZERO_MAC = bytes(16)
MAX_SHIFT = 12  # the smallest share is 1/4096: floods up to ~12M/s per worker stay budgeted
UPDATE_INTERVAL = 0.1  # seconds between estimates
# Per worker, while shedding: the offered rate that keeps it under load. A full handshake
# costs ~250 us of a core, so 2000/s is half a core of DH.
UNDER_LOAD_OFFERED_RATE = 2000.0
# Per worker: initiations that cost DH work and then failed (unknown static key, or one we
# know without its private key). Honest peers almost never fail; a spoofed flood always does.
# A worker fast enough to keep its queue short would otherwise spend a whole core on such a
# flood (~100 us each) without ever counting as under load.
UNDER_LOAD_FAILED_RATE = 500.0


class InitiationAdmission:
    """Per-worker estimate of offered cookie-less initiations and the share to admit."""

    __slots__ = ("target_rate", "shift", "counted", "failed", "offered_rate", "failed_rate",
                 "_since")  # fmt: skip

    def __init__(self, target_rate: float) -> None:
        self.target_rate = target_rate  # cookie-less initiations/s worth reading (cookie budget)
        self.shift = 0  # share admitted = 1 / 2**shift
        self.counted = 0  # cookie-less initiations read since the last update
        self.failed = 0  # initiations that failed after DH work since the last update
        self.offered_rate = 0.0  # the last estimate, per second, filtered ones included
        self.failed_rate = 0.0
        self._since: float | None = None

    @property
    def share(self) -> float:
        return 1.0 / (1 << self.shift)

    def update(self, now: float, under_load: bool) -> bool:
        """Every UPDATE_INTERVAL: re-estimate and pick the share. True when the share changed
        (the caller then re-programs the kernel filter)."""
        if self._since is None:
            self._since = now
            return False
        elapsed = now - self._since
        if elapsed < UPDATE_INTERVAL:
            return False
        self.offered_rate = self.counted * (1 << self.shift) / elapsed
        self.failed_rate = self.failed / elapsed
        self.counted = self.failed = 0
        self._since = now
        shift = 0
        loaded = under_load or self.flooded() or self.failing()
        if loaded and self.offered_rate > self.target_rate:
            shift = min(MAX_SHIFT, math.ceil(math.log2(self.offered_rate / self.target_rate)))
        if shift == self.shift:
            return False
        self.shift = shift
        return True

    def flooded(self) -> bool:
        """True while the worker sheds initiations and the offered rate says the flood goes
        on: then it stays under load although its handshake queue no longer fills. Only
        while shedding: under-load itself is entered, as in wireguard-go, by a deep queue,
        so an honest burst the worker keeps up with (a benchmark, a mass rekey) never is."""
        return self.shift > 0 and self.offered_rate >= UNDER_LOAD_OFFERED_RATE

    def failing(self) -> bool:
        """True while initiations fail after DH work faster than honest peers ever make them."""
        return self.failed_rate >= UNDER_LOAD_FAILED_RATE
