"""One peer's tunnel: handshake state, current/previous/next sessions, timers, staged packets.

Sans-IO: every method takes `now` (monotonic seconds) and, where a TAI64N
timestamp or a handshake time is produced, `wall` (Unix seconds). What the peer
wants sent is appended to `outbox` (datagrams for `endpoint`); what happened is
appended to `events`. The I/O layer drains both after each call.

Timers follow wireguard-go's `timers.go`, kept as deadlines (`math.inf` = not
armed) that the data path sets with plain attribute writes and `tick` fires.
The hot path calls only `sent_data` and `received`, once per batch and peer.

Which peers to tick: the device keeps a heap of (time, peer) wake-ups shared by
all its peers (`timers`), so a tick costs what is due, not what is configured.
`timer_at` is the peer's earliest wake-up in that heap; a deadline set earlier
than it pushes a new one (`arm`), a deadline moved later pushes nothing: the
old wake-up fires early, finds nothing due and re-arms at the real deadline.
On the packet path that is one float comparison, and a push at most once per
timer period (a busy peer's deadlines only ever move later).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from shardwg.proto import cookie as cookie_mod
from shardwg.proto import noise, tai64n
from shardwg.proto.constants import (
    DEFAULT_MTU,
    HANDSHAKE_INITIATION_RATE,
    KEEPALIVE_TIMEOUT,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    TAG_LEN,
    TRANSPORT_HEADER_SIZE,
    ZERO_KEYS_AFTER,
    DropReason,
)
from shardwg.proto.indextable import IndexTable
from shardwg.proto.keypair import Keypair, padded_length, seal_into

INF = math.inf
RandomBytes = Callable[[int], bytes]


class PeerEvent(IntEnum):
    """What a peer reports to the I/O layer (for logs, shared memory and counters)."""

    INITIATION_SENT = 1
    RESPONSE_SENT = 2
    # A new current session exists (initiator: response consumed; responder: confirmed).
    HANDSHAKE_COMPLETE = 3
    SESSION_DERIVED = 4
    KEYS_ZEROED = 5
    HANDSHAKE_GAVE_UP = 6
    KEEPALIVE_SENT = 7
    STAGED_DROPPED = 8


class Peer:
    """Per-peer protocol state. Owned and mutated by exactly one worker."""

    def __init__(
        self,
        local: noise.LocalIdentity,
        crypto: noise.PeerCrypto,
        table: IndexTable,
        random_bytes: RandomBytes,
        *,
        endpoint: Any = None,
        persistent_keepalive: int = 0,
        mtu: int = DEFAULT_MTU,
        outbox: list[tuple[Peer, bytes]] | None = None,
        events: list[tuple[Peer, PeerEvent]] | None = None,
        timers: list[tuple[float, int, Peer]] | None = None,
    ) -> None:
        self.local = local
        self.crypto = crypto
        self.public_key = crypto.remote_static
        self.cookie = cookie_mod.CookieGenerator(crypto.mac1_key, crypto.cookie_key)
        self.table = table
        self.random_bytes = random_bytes
        self._rng = random.Random(int.from_bytes(random_bytes(8), "little"))
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive
        self.mtu = mtu

        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None

        self.handshake: noise.InitiationState | None = None
        self.last_initiation_sent = -INF
        self.handshake_attempts = 0
        self.handshake_started = -INF  # when the current series of attempts began
        self.last_timestamp = bytes(12)  # newest TAI64N accepted from this peer
        self.last_initiation_consumed = -INF
        self.last_handshake_wall = 0.0  # Unix time of the last completed handshake, 0 = never

        # Timer deadlines (monotonic); INF = not armed.
        self.retransmit_deadline = INF
        self.keepalive_deadline = INF
        self.new_handshake_deadline = INF
        self.zero_deadline = INF
        # Spread over every worker (proto/spread.py): with spread steering on, its sessions'
        # indices carry SPREAD_INDEX_BIT so their datagrams are steered by counter.
        self.spread = False
        self.persistent_deadline = INF
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.last_data_sent = -INF
        self.last_data_received = -INF

        self.staged: deque[bytes] = deque()
        self.rx_bytes = 0
        self.tx_bytes = 0
        # [rx, tx] words of the peer's shared-memory record (set by the publisher): every
        # count is stored there at once, so any reader (UAPI, show, /metrics) is exact.
        self.traffic: memoryview | None = None
        # Shared with the device: (peer, datagram for peer.endpoint) and (peer, event).
        self.outbox: list[tuple[Peer, bytes]] = [] if outbox is None else outbox
        self.events: list[tuple[Peer, PeerEvent]] = [] if events is None else events
        # The device's wake-up heap of (time, id, peer), and our earliest entry in it.
        self.timers: list[tuple[float, int, Peer]] = [] if timers is None else timers
        self.timer_at = INF

    # ------------------------------------------------------------------ helpers
    def arm(self, deadline: float) -> None:
        """A deadline was set: make sure the device wakes us by then."""
        if deadline < self.timer_at:
            self.timer_at = deadline
            heapq.heappush(self.timers, (deadline, id(self), self))

    def _jitter(self) -> float:
        """Timer jitter needs no secret randomness: a PRNG seeded once from the injected
        source (the data path re-arms a timer after every receive, so this stays cheap)."""
        return self._rng.random() * REKEY_TIMEOUT_JITTER_MAX

    def _sent_authenticated(self, now: float) -> None:
        """timersAnyAuthenticatedPacketSent + Traversal."""
        self.keepalive_deadline = INF
        if self.persistent_keepalive:
            d = self.persistent_deadline = now + self.persistent_keepalive
            if d < self.timer_at:
                self.arm(d)

    def usable_session(self, now: float) -> Keypair | None:
        """The session to send data on, or None if a handshake is needed first."""
        kp = self.current
        if kp is None or kp.expired(now):
            return None
        return kp

    # ------------------------------------------------------------------ handshake: initiator
    def send_initiation(self, now: float, wall: float, is_retry: bool = False) -> bool:
        """Create and queue an initiation unless one went out less than REKEY_TIMEOUT ago."""
        if now - self.last_initiation_sent < REKEY_TIMEOUT:
            return False
        if self.endpoint is None or not self.crypto.usable:
            return False
        if not is_retry:
            self.handshake_attempts = 0
            self.handshake_started = now
        if self.handshake is not None:
            self.table.release(self.handshake.local_index)
        index = self.table.new_pending(self)
        eph = self.random_bytes(32)
        msg, state = noise.create_initiation(
            self.local, self.crypto, index, eph, tai64n.timestamp(wall)
        )
        self.cookie.add_macs(msg, now)
        self.handshake = state
        self.last_initiation_sent = now
        self.outbox.append((self, bytes(msg)))
        self.events.append((self, PeerEvent.INITIATION_SENT))
        self._sent_authenticated(now)
        self.retransmit_deadline = d = now + REKEY_TIMEOUT + self._jitter()
        self.arm(d)
        return True

    def receive_response(self, msg: bytes, now: float, wall: float) -> DropReason | None:
        """Consume a response to our pending initiation (mac1 already checked)."""
        state = self.handshake
        if state is None:
            return DropReason.UNEXPECTED_RESPONSE
        try:
            keys = noise.consume_response(self.local, self.crypto, state, msg)
        except noise.HandshakeError as exc:
            return exc.reason
        self.handshake = None
        kp = Keypair(keys.send_key, keys.recv_key, keys.local_index, keys.remote_index, True, now)
        kp.peer = self
        self.table.bind(kp)
        # Initiator: the new session becomes current at once.
        old_next, old_prev = self.next, self.previous
        if old_next is not None:
            self.next = None
            self.previous = old_next
            if self.current is not None:
                self.table.release(self.current.local_index)
        else:
            self.previous = self.current
        if old_prev is not None:
            self.table.release(old_prev.local_index)
        self.current = kp
        self._session_derived(now)
        self._handshake_complete(now, wall)
        self.new_handshake_deadline = INF  # any authenticated packet received
        if self.persistent_keepalive:
            self.persistent_deadline = now + self.persistent_keepalive
            self.arm(self.persistent_deadline)
        # Key confirmation: the responder waits for our first transport packet.
        if not self.flush_staged(now, wall):
            self.send_keepalive(now, wall)
        return None

    def receive_cookie_reply(self, msg: bytes, now: float) -> DropReason | None:
        if not self.cookie.consume_reply(msg, now):
            return DropReason.BAD_COOKIE_REPLY
        return None

    # ------------------------------------------------------------------ handshake: responder
    def receive_initiation(
        self, received: noise.ReceivedInitiation, now: float, wall: float
    ) -> DropReason | None:
        """Answer an initiation from this peer: replay and flood checks, then a response."""
        if received.timestamp <= self.last_timestamp:
            return DropReason.STALE_TIMESTAMP
        if now - self.last_initiation_consumed < HANDSHAKE_INITIATION_RATE:
            return DropReason.INITIATION_FLOOD
        self.last_timestamp = received.timestamp
        self.last_initiation_consumed = now
        index = self.table.new_pending(self)
        eph = self.random_bytes(32)
        msg, keys = noise.create_response(self.local, received, index, eph)
        self.cookie.add_macs(msg, now)
        kp = Keypair(keys.send_key, keys.recv_key, keys.local_index, keys.remote_index, False, now)
        kp.peer = self
        self.table.bind(kp)
        # Responder: the session waits in `next` until the initiator's first packet confirms it.
        if self.next is not None:
            self.table.release(self.next.local_index)
        if self.previous is not None:
            self.table.release(self.previous.local_index)
        self.previous = None
        self.next = kp
        self.outbox.append((self, bytes(msg)))
        self.events.append((self, PeerEvent.RESPONSE_SENT))
        self._session_derived(now)
        self._sent_authenticated(now)
        return None

    def confirm(self, kp: Keypair, now: float, wall: float) -> None:
        """First packet received on `next`: it becomes current (ReceivedWithKeypair)."""
        if kp is not self.next:
            return
        if self.previous is not None:
            self.table.release(self.previous.local_index)
        self.previous = self.current
        self.current = kp
        self.next = None
        self._handshake_complete(now, wall)
        self.flush_staged(now, wall)

    def _session_derived(self, now: float) -> None:
        self.zero_deadline = now + ZERO_KEYS_AFTER
        self.arm(self.zero_deadline)
        self.events.append((self, PeerEvent.SESSION_DERIVED))

    def _handshake_complete(self, now: float, wall: float) -> None:
        self.retransmit_deadline = INF
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake_wall = wall
        self.events.append((self, PeerEvent.HANDSHAKE_COMPLETE))

    # ------------------------------------------------------------------ data path hooks
    def sent_data(self, now: float, nbytes: int) -> None:
        """After data packets of `nbytes` in all were sealed for this peer (keep it cheap)."""
        self.tx_bytes += nbytes
        t = self.traffic
        if t is not None:
            t[1] = self.tx_bytes
        self.last_data_sent = now
        self.keepalive_deadline = INF
        if self.new_handshake_deadline == INF:
            d = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            self.new_handshake_deadline = d
            if d < self.timer_at:
                self.arm(d)
        if self.persistent_keepalive:
            d = self.persistent_deadline = now + self.persistent_keepalive
            if d < self.timer_at:
                self.arm(d)

    def received(self, now: float, nbytes: int, data: int) -> None:
        """After authenticated transport packets from this peer: one packet (data: whether it
        carried data) or a batch's (data: how many carried data), `nbytes` in all."""
        self.rx_bytes += nbytes
        t = self.traffic
        if t is not None:
            t[0] = self.rx_bytes
        self.new_handshake_deadline = INF
        if data:
            self.last_data_received = now
            if self.keepalive_deadline == INF:
                d = self.keepalive_deadline = now + KEEPALIVE_TIMEOUT
                if d < self.timer_at:
                    self.arm(d)
                if data > 1:  # the later packets found the timer armed
                    self.need_another_keepalive = True
            else:
                self.need_another_keepalive = True
        if self.persistent_keepalive:
            d = self.persistent_deadline = now + self.persistent_keepalive
            if d < self.timer_at:
                self.arm(d)

    def keep_key_fresh_sending(self, kp: Keypair, now: float, wall: float) -> None:
        """Initiator: data sent on a session older than REKEY_AFTER_TIME starts a rekey.

        The caller checks the cheap age condition per packet and calls this only then.
        """
        if (
            kp.is_initiator
            and kp is self.current
            and (now - kp.created >= REKEY_AFTER_TIME or kp.send_counter >= REKEY_AFTER_MESSAGES)
        ):
            self.send_initiation(now, wall)

    def keep_key_fresh_receiving(self, kp: Keypair, now: float, wall: float) -> None:
        """Initiator: data received on a session about to expire starts one last-minute rekey."""
        if (
            kp.is_initiator
            and kp is self.current
            and not self.sent_last_minute_handshake
            and now - kp.created >= REKEY_ON_RECEIVE_AGE
        ):
            self.sent_last_minute_handshake = True
            self.send_initiation(now, wall)

    def send(self, packet: bytes, now: float, wall: float) -> None:
        """Slow-path send of one IP packet (tests, staged flushes); the worker has its own."""
        kp = self.usable_session(now)
        if kp is None:
            self.stage(packet, now, wall)
            return
        self._seal_and_queue(kp, packet, now)
        self.keep_key_fresh_sending(kp, now, wall)

    def stage(self, packet: bytes, now: float, wall: float) -> None:
        """Hold a packet until a session exists (oldest dropped), and start a handshake."""
        if len(self.staged) >= MAX_STAGED_PACKETS:
            self.staged.popleft()
            self.events.append((self, PeerEvent.STAGED_DROPPED))
        self.staged.append(packet)
        if self.usable_session(now) is None:
            self.send_initiation(now, wall)

    def flush_staged(self, now: float, wall: float) -> bool:
        """Seal every staged packet on the current session; True if any was sent."""
        if not self.staged:
            return False
        kp = self.usable_session(now)
        if kp is None:
            self.send_initiation(now, wall)
            return False
        sent = False
        while self.staged:
            pkt = self.staged.popleft()
            if self._seal_and_queue(kp, pkt, now):
                sent = True
        return sent

    def send_keepalive(self, now: float, wall: float) -> None:
        kp = self.usable_session(now)
        if kp is None:
            self.send_initiation(now, wall)
            return
        if self._seal_and_queue(kp, b"", now):
            self.events.append((self, PeerEvent.KEEPALIVE_SENT))

    def _seal_and_queue(self, kp: Keypair, pkt: bytes, now: float) -> bool:
        """Slow-path seal (staged packets, keepalives): allocates its own buffers."""
        n = len(pkt)
        padded = padded_length(n, max(self.mtu, n))
        plain = bytearray(padded)
        plain[:n] = pkt
        out = bytearray(TRANSPORT_HEADER_SIZE + padded + TAG_LEN)
        size = seal_into(kp, memoryview(plain), n, max(self.mtu, n), memoryview(out))
        if size < 0:
            return False
        self.outbox.append((self, bytes(out[:size])))
        if n:
            self.sent_data(now, size)
        else:
            self.tx_bytes += size
            if self.traffic is not None:
                self.traffic[1] = self.tx_bytes
            self._sent_authenticated(now)
        return True

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float:
        return min(
            self.retransmit_deadline,
            self.keepalive_deadline,
            self.new_handshake_deadline,
            self.zero_deadline,
            self.persistent_deadline,
        )

    def tick(self, now: float, wall: float) -> None:
        """Fire every due timer and the keep-key-fresh checks."""
        if now >= self.retransmit_deadline:
            self.retransmit_deadline = INF
            if (
                now - self.handshake_started >= REKEY_ATTEMPT_TIME
                or self.handshake_attempts >= MAX_TIMER_HANDSHAKES
            ):
                self._give_up(now)
            else:
                self.handshake_attempts += 1
                self.last_initiation_sent = -INF
                self.send_initiation(now, wall, is_retry=True)
        if now >= self.keepalive_deadline:
            self.keepalive_deadline = INF
            self.send_keepalive(now, wall)
            if self.need_another_keepalive:
                self.need_another_keepalive = False
                self.keepalive_deadline = now + KEEPALIVE_TIMEOUT
                self.arm(self.keepalive_deadline)
        if now >= self.new_handshake_deadline:
            self.new_handshake_deadline = INF
            self.send_initiation(now, wall)
        if now >= self.zero_deadline:
            self.zero_deadline = INF
            self.zero_keys()
        if now >= self.persistent_deadline:
            self.persistent_deadline = INF
            if self.persistent_keepalive:
                self.send_keepalive(now, wall)

    def _give_up(self, now: float) -> None:
        """timersRetransmitHandshake past REKEY_ATTEMPT_TIME: stop trying, drop what waits."""
        self.keepalive_deadline = INF
        if self.handshake is not None:
            self.table.release(self.handshake.local_index)
            self.handshake = None
        if self.staged:
            self.staged.clear()
            self.events.append((self, PeerEvent.STAGED_DROPPED))
        if self.zero_deadline == INF:
            self.zero_deadline = now + ZERO_KEYS_AFTER
            self.arm(self.zero_deadline)
        self.events.append((self, PeerEvent.HANDSHAKE_GAVE_UP))

    def zero_keys(self) -> None:
        """Forget every session and handshake (3 x REJECT_AFTER_TIME of silence, or removal)."""
        for kp in (self.current, self.previous, self.next):
            if kp is not None:
                self.table.release(kp.local_index)
        self.current = self.previous = self.next = None
        if self.handshake is not None:
            self.table.release(self.handshake.local_index)
            self.handshake = None
        self.events.append((self, PeerEvent.KEYS_ZEROED))

    def __repr__(self) -> str:
        return f"Peer({self.public_key[:4].hex()}…, endpoint={self.endpoint!r})"
