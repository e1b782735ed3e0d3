"""mac1/mac2 and cookie replies: the DoS defence in front of the handshake.

mac1 proves the sender knows our public key and is checked before any DH.
mac2 proves the sender can receive at its source address: under load a
responder answers initiations lacking it with a cookie reply instead of doing
the handshake. The cookie is MAC(secret, source), so the responder keeps no
per-source state; the secret is random and replaced every COOKIE_REFRESH_TIME.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from shardwg.proto import crypto
from shardwg.proto.constants import (
    COOKIE_NONCE_LEN,
    COOKIE_REFRESH_TIME,
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    KEY_LEN,
    MAC_LEN,
    RESPONSE_SIZE,
    MessageType,
)
from shardwg.proto.messages import COOKIE_REPLY, U32
from shardwg.proto.noise import LocalIdentity

_ZERO_MAC = bytes(MAC_LEN)
_SENDER_OFFSET = 4  # initiation and response both carry the sender index here


def _mac_offsets(size: int) -> tuple[int, int]:
    """(mac1 offset, mac2 offset): the macs are always the last 32 bytes."""
    if size not in (INITIATION_SIZE, RESPONSE_SIZE):
        raise ValueError(f"not a handshake message size: {size}")
    return size - 2 * MAC_LEN, size - MAC_LEN


class CookieGenerator:
    """Sender side, one per peer: writes our macs and remembers the peer's cookie."""

    __slots__ = ("_mac1_key", "_cookie_key", "_cookie", "_cookie_time", "_last_mac1")

    def __init__(self, mac1_key: bytes, cookie_key: bytes) -> None:
        self._mac1_key = mac1_key
        self._cookie_key = cookie_key
        self._cookie: bytes | None = None
        self._cookie_time = 0.0
        self._last_mac1: bytes | None = None

    def has_fresh_cookie(self, now: float) -> bool:
        return self._cookie is not None and now - self._cookie_time < COOKIE_REFRESH_TIME

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill mac1 and mac2 of a 148-byte initiation or 92-byte response in place."""
        o1, o2 = _mac_offsets(len(msg))
        with memoryview(msg) as view:
            mac1 = crypto.mac(self._mac1_key, view[:o1])
            view[o1:o2] = mac1
            self._last_mac1 = mac1
            if self._cookie is not None and self.has_fresh_cookie(now):
                view[o2:] = crypto.mac(self._cookie, view[:o2])
            else:
                view[o2:] = _ZERO_MAC

    def consume_reply(self, msg: bytes, now: float) -> bool:
        """Store the cookie from a 64-byte reply; False if it is not for our last message."""
        if len(msg) != COOKIE_REPLY_SIZE or self._last_mac1 is None:
            return False
        _t, _receiver, nonce, enc_cookie = COOKIE_REPLY.unpack(msg)
        try:
            cookie = crypto.xaead_decrypt(self._cookie_key, nonce, enc_cookie, self._last_mac1)
        except crypto.AuthenticationError:
            return False
        self._cookie = cookie
        self._cookie_time = now
        return True


# A shared secret is replaced this long before it expires, so the one it replaces is still
# honoured for a while: a cookie given out just before a switch works just after it.
ROTATE_MARGIN = 10.0
ROTATE_INTERVAL = COOKIE_REFRESH_TIME - ROTATE_MARGIN


class CookieChecker:
    """Responder side: checks mac1/mac2 and builds cookie replies.

    One per worker. Alone it mints a secret when it has none fresh. Behind a
    supervisor, `set_schedule` hands every worker the same current secret and its
    successor with the instant of the switch, so all workers switch together and a
    cookie earned from one worker is honoured by all. mac2 is accepted under every
    known secret that is born and younger than COOKIE_REFRESH_TIME (the active one,
    and the one it replaced, for ROTATE_MARGIN seconds).
    """

    __slots__ = ("_mac1_key", "_cookie_key", "_random_bytes", "_secrets")

    def __init__(self, local: LocalIdentity, random_bytes: Callable[[int], bytes]) -> None:
        self._mac1_key = local.mac1_key
        self._cookie_key = local.cookie_key
        self._random_bytes = random_bytes
        self._secrets: list[tuple[float, bytes]] = []  # (born, secret), oldest first, <= 3

    def check_mac1(self, msg: bytes | memoryview) -> bool:
        try:
            o1, o2 = _mac_offsets(len(msg))
        except ValueError:
            return False
        return hmac.compare_digest(crypto.mac(self._mac1_key, msg[:o1]), msg[o1:o2])

    def _active(self, now: float) -> tuple[float, bytes] | None:
        """The newest secret already born, if still fresh."""
        for born, secret in reversed(self._secrets):
            if born <= now:
                return (born, secret) if now - born < COOKIE_REFRESH_TIME else None
        return None

    def check_mac2(self, msg: bytes | memoryview, source: bytes, now: float) -> bool:
        """True if mac2 was made with a cookie we gave `source` under a live secret."""
        try:
            _o1, o2 = _mac_offsets(len(msg))
        except ValueError:
            return False
        for born, secret in reversed(self._secrets):
            if born <= now and now - born < COOKIE_REFRESH_TIME:
                cookie = crypto.mac(secret, source)
                if hmac.compare_digest(crypto.mac(cookie, msg[:o2]), msg[o2:]):
                    return True
        return False

    def current_secret(self, now: float) -> tuple[bytes, float]:
        """(secret, born) cookies are made with now; a fresh one is minted if none is live."""
        active = self._active(now)
        if active is None:
            self.set_secret(self._random_bytes(KEY_LEN), now)
            active = self._secrets[-1]
        return active[1], active[0]

    def create_reply(self, msg: bytes | memoryview, source: bytes, now: float) -> bytes:
        """A 64-byte cookie reply to the sender of handshake message `msg`."""
        o1, o2 = _mac_offsets(len(msg))
        secret, _born = self.current_secret(now)
        cookie = crypto.mac(secret, source)
        nonce = self._random_bytes(COOKIE_NONCE_LEN)
        if len(nonce) != COOKIE_NONCE_LEN:
            raise ValueError("random_bytes returned the wrong length")
        sender = U32.unpack_from(msg, _SENDER_OFFSET)[0]
        enc = crypto.xaead_encrypt(self._cookie_key, nonce, cookie, bytes(msg[o1:o2]))
        return COOKIE_REPLY.pack(MessageType.COOKIE_REPLY, sender, nonce, enc)

    def set_secret(self, secret: bytes, born: float) -> None:
        """Learn `secret`, in use from `born` on (older secrets stay honoured while fresh)."""
        if len(secret) != KEY_LEN:
            raise ValueError("cookie secret must be 32 bytes")
        entry = (born, bytes(secret))
        if entry not in self._secrets:
            self._secrets.append(entry)
            self._secrets.sort(key=lambda e: e[0])
            del self._secrets[:-3]  # previous, current, next

    def set_schedule(self, current: bytes, born: float, following: bytes, switch: float) -> None:
        """The supervisor's shared secrets: `current` from `born`, `following` from `switch`."""
        self.set_secret(current, born)
        self.set_secret(following, switch)
