"""Handshake intake: the checks every handshake message passes before any peer state.

Order (as wireguard-go): mac1 always (cheap, no DH); under load, a missing or
stale mac2 earns a cookie reply instead of work, and sources are rate limited;
only then is an initiation decrypted far enough to learn which peer sent it.
"""

from __future__ import annotations

from collections.abc import Callable

from shardwg.proto.constants import (
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_QUEUE_SIZE,
    DropReason,
)
from shardwg.proto.cookie import CookieChecker
from shardwg.proto.noise import LocalIdentity
from shardwg.proto.ratelimiter import RateLimiter

RandomBytes = Callable[[int], bytes]
COOKIE_REPLIES_PER_SECOND = 3000.0  # per intake (worker): a flood cannot buy more of our CPU
# A deep backlog means "under load" only when draining it would take longer than this. A
# peer retransmits its initiation after 5 s, so a cookie reply (answered at the earliest on
# that retransmission) helps nobody while the queue drains within a second: after a restart
# a fleet of 1,000 peers initiating at once was 94 % cookie-replied (backlog >= 128, as in
# wireguard-go) and served only after 5.9 s, instead of within the 0.3 s their
# handshakes cost. A sustained flood still engages at once through the offered-rate
# estimate (proto/admission.py), and the queue stays bounded (HANDSHAKE_QUEUE_MAX).
UNDER_LOAD_DRAIN_TIME = 1.0
HANDSHAKE_COST = 1e-3  # seconds per handshake message until measured (conservative)
_COST_MIN, _COST_MAX = 2e-4, 1e-2  # four X25519 at least; a starved worker at most
# What the supervisor, which sees backlogs but not costs, treats as deep (~1,000).
UNDER_LOAD_BACKLOG = int(UNDER_LOAD_DRAIN_TIME / HANDSHAKE_COST)


class HandshakeIntake:
    """mac1/mac2 screening, cookie replies and per-source limits for one worker."""

    def __init__(self, local: LocalIdentity, random_bytes: RandomBytes) -> None:
        self.checker = CookieChecker(local, random_bytes)
        self.limiter = RateLimiter()
        # Raised by a deep backlog here, or from outside to the gateway-wide deadline
        # that the supervisor sets in shared memory when any worker is loaded.
        self.under_load_until = -1.0
        self.cookie_rate = COOKIE_REPLIES_PER_SECOND
        self._cookie_tokens = COOKIE_REPLIES_PER_SECOND
        self._cookie_time = 0.0
        self.handshake_cost = HANDSHAKE_COST  # EWMA of seconds per message, from `note_cost`

    def note_backlog(self, backlog: int, now: float) -> None:
        """Enter under-load mode for a second when the handshake backlog is deep: at least
        UNDER_LOAD_QUEUE_SIZE, and more than UNDER_LOAD_DRAIN_TIME of work."""
        if (
            backlog >= UNDER_LOAD_QUEUE_SIZE
            and backlog * self.handshake_cost >= UNDER_LOAD_DRAIN_TIME
        ):
            self.under_load_until = now + UNDER_LOAD_AFTER_TIME

    def note_cost(self, seconds: float, messages: int) -> None:
        """What `messages` handshake messages just cost in CPU seconds (preemption by other
        processes is not work: the 5 s retransmission leaves room for it)."""
        if messages > 0:
            per = min(max(seconds / messages, _COST_MIN), _COST_MAX)
            self.handshake_cost += (per - self.handshake_cost) * min(1.0, messages / 64)

    def under_load(self, now: float) -> bool:
        return now < self.under_load_until

    def screen(self, msg: bytes, source: bytes, now: float) -> DropReason | bytes | None:
        """None: go on. bytes: a cookie reply to send to the source (message dropped).

        `source` is the packed source address (ip bytes || 2-byte port).
        """
        if not self.checker.check_mac1(msg):
            return DropReason.BAD_MAC1
        if self.under_load(now):
            if not self.checker.check_mac2(msg, source, now):
                if not self._cookie_budget(now):
                    return DropReason.COOKIE_REQUIRED  # over budget: dropped without a reply
                return self.checker.create_reply(msg, source, now)
            if not self.limiter.allow(source[:-2], now):
                return DropReason.RATE_LIMITED
        return None

    def _cookie_budget(self, now: float) -> bool:
        """Token bucket on cookie replies: each costs an XChaCha20 seal and a send, and a
        spoofed flood never uses them; honest peers retry every 5 s and get one in time."""
        rate = self.cookie_rate
        tokens = min(rate, self._cookie_tokens + (now - self._cookie_time) * rate)
        self._cookie_time = now
        if tokens < 1.0:
            self._cookie_tokens = tokens
            return False
        self._cookie_tokens = tokens - 1.0
        return True
