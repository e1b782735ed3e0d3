"""Per-source token bucket for handshake initiations while under load.

Even with valid mac2 (the source address is real), one source must not be able
to keep our workers busy with DH operations. IPv6 sources are keyed by /64
since one host usually owns a whole /64. Time is kept in integer nanoseconds
so refills are exact (no float drift at 1/20 s steps), as wireguard-go does.
The table is bounded: when full, unknown sources are refused until `gc`.
"""

from __future__ import annotations

from shardwg.proto.constants import RATELIMIT_BURST, RATELIMIT_PACKETS_PER_SECOND

GC_IDLE_TIME = 1.0
_NS = 1_000_000_000


class _Bucket:
    __slots__ = ("tokens", "last")

    def __init__(self, tokens: int, last: int) -> None:
        self.tokens = tokens  # nanoseconds of credit; one packet costs `cost`
        self.last = last


class RateLimiter:
    """Token bucket per IPv4 /32 or IPv6 /64, `packets_per_second` with `burst`."""

    __slots__ = ("_cost", "_max", "_max_entries", "_idle_ns", "_table")

    def __init__(
        self,
        packets_per_second: float = RATELIMIT_PACKETS_PER_SECOND,
        burst: int = RATELIMIT_BURST,
        max_entries: int = 65536,
    ) -> None:
        if packets_per_second <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("rate, burst and max_entries must be positive")
        self._cost = round(_NS / packets_per_second)
        self._max = self._cost * burst
        self._max_entries = max_entries
        # An entry idle this long has a full bucket, so forgetting it changes nothing.
        self._idle_ns = max(round(GC_IDLE_TIME * _NS), self._max)
        self._table: dict[bytes, _Bucket] = {}

    @staticmethod
    def _key(source_ip: bytes) -> bytes:
        n = len(source_ip)
        if n == 4:
            return bytes(source_ip)
        if n == 16:
            return bytes(source_ip[:8])
        raise ValueError(f"source address must be 4 or 16 bytes, not {n}")

    def allow(self, source_ip: bytes, now: float) -> bool:
        """Spend one token for `source_ip`; False if it has none (or the table is full)."""
        key = self._key(source_ip)
        t = round(now * _NS)
        b = self._table.get(key)
        if b is None:
            if len(self._table) >= self._max_entries:
                return False
            self._table[key] = _Bucket(self._max - self._cost, t)
            return True
        if t > b.last:
            b.tokens = min(self._max, b.tokens + t - b.last)
            b.last = t
        if b.tokens >= self._cost:
            b.tokens -= self._cost
            return True
        return False

    def gc(self, now: float) -> None:
        """Forget sources idle for more than a second (call about once a second)."""
        cutoff = round(now * _NS) - self._idle_ns
        stale = [k for k, b in self._table.items() if b.last < cutoff]
        for k in stale:
            del self._table[k]

    def __len__(self) -> int:
        return len(self._table)
