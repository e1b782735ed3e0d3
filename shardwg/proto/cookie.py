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


class CookieChecker:
    """Responder side: checks mac1/mac2 and builds cookie replies.

    One per worker; a supervisor can share one secret among workers with
    `set_secret` so a cookie earned from one worker is honoured by all.
    """

    __slots__ = ("_mac1_key", "_cookie_key", "_random_bytes", "_secret", "_born")

    def __init__(self, local: LocalIdentity, random_bytes: Callable[[int], bytes]) -> None:
        self._mac1_key = local.mac1_key
        self._cookie_key = local.cookie_key
        self._random_bytes = random_bytes
        self._secret: bytes | None = None
        self._born = 0.0

    def check_mac1(self, msg: bytes | memoryview) -> bool:
        try:
            o1, o2 = _mac_offsets(len(msg))
        except ValueError:
            return False
        return hmac.compare_digest(crypto.mac(self._mac1_key, msg[:o1]), msg[o1:o2])

    def _fresh_secret(self, now: float) -> bytes | None:
        if self._secret is None or now - self._born >= COOKIE_REFRESH_TIME:
            return None
        return self._secret

    def check_mac2(self, msg: bytes | memoryview, source: bytes, now: float) -> bool:
        """True if mac2 was made with the cookie we would give `source` right now."""
        secret = self._fresh_secret(now)
        if secret is None:
            return False
        try:
            _o1, o2 = _mac_offsets(len(msg))
        except ValueError:
            return False
        cookie = crypto.mac(secret, source)
        return hmac.compare_digest(crypto.mac(cookie, msg[:o2]), msg[o2:])

    def current_secret(self, now: float) -> tuple[bytes, float]:
        """(secret, born), replacing the secret first if it is stale; for sharing it out."""
        secret = self._fresh_secret(now)
        if secret is None:
            secret = self._random_bytes(KEY_LEN)
            self.set_secret(secret, now)
        return secret, self._born

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
        if len(secret) != KEY_LEN:
            raise ValueError("cookie secret must be 32 bytes")
        self._secret = bytes(secret)
        self._born = born
