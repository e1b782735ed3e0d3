from __future__ import annotations

import itertools

import pytest

from shardwg.proto import crypto
from shardwg.proto.cookie import ROTATE_INTERVAL, CookieChecker, CookieGenerator
from shardwg.proto.noise import (
    LocalIdentity,
    PeerCrypto,
    consume_initiation,
    create_initiation,
    create_response,
)

SRC = bytes([192, 0, 2, 7]) + (51820).to_bytes(2, "big")
OTHER_SRC = bytes([192, 0, 2, 8]) + (51820).to_bytes(2, "big")
TS = bytes.fromhex("400000006553f10a1d000000")


class FakeRandom:
    """Deterministic, never-repeating random bytes."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def __call__(self, n: int) -> bytes:
        return crypto.hash_(next(self._n).to_bytes(8, "little"))[:n].ljust(n, b"\x00")


class Setup:
    def __init__(self) -> None:
        self.i = LocalIdentity.from_private(crypto.generate_private_key(b"\x01" * 32))
        self.r = LocalIdentity.from_private(crypto.generate_private_key(b"\x02" * 32))
        self.r_at_i = PeerCrypto.build(self.i, self.r.public, None)
        self.gen = CookieGenerator(self.r_at_i.mac1_key, self.r_at_i.cookie_key)
        self.checker = CookieChecker(self.r, FakeRandom())

    def initiation(self, now: float, index: int = 0xA1B2C3D4) -> bytearray:
        msg, _ = create_initiation(
            self.i, self.r_at_i, index, crypto.generate_private_key(b"\x03" * 32), TS
        )
        self.gen.add_macs(msg, now)
        return msg


def test_mac1_written_and_checked() -> None:
    s = Setup()
    msg = s.initiation(0.0)
    assert msg[116:132] == crypto.mac(s.r.mac1_key, bytes(msg[:116]))
    assert msg[132:] == bytes(16)  # no cookie yet
    assert s.checker.check_mac1(bytes(msg))
    assert s.checker.check_mac1(memoryview(msg))
    for off in (0, 50, 115, 116, 131):
        bad = bytearray(msg)
        bad[off] ^= 1
        assert not s.checker.check_mac1(bytes(bad))
    assert not s.checker.check_mac1(bytes(msg[:100]))


def test_mac1_for_other_responder_rejected() -> None:
    s = Setup()
    other = CookieChecker(s.i, FakeRandom())
    assert not other.check_mac1(bytes(s.initiation(0.0)))


def test_mac1_on_response() -> None:
    s = Setup()
    init, _ = create_initiation(s.i, s.r_at_i, 1, crypto.generate_private_key(b"\x03" * 32), TS)
    i_at_r = PeerCrypto.build(s.r, s.i.public, None)
    got = consume_initiation(s.r, bytes(init), lambda k: i_at_r)
    resp, _ = create_response(s.r, got, 2, crypto.generate_private_key(b"\x04" * 32))
    CookieGenerator(i_at_r.mac1_key, i_at_r.cookie_key).add_macs(resp, 0.0)
    assert CookieChecker(s.i, FakeRandom()).check_mac1(bytes(resp))
    assert not s.checker.check_mac1(bytes(resp))


def test_cookie_round_trip_gives_valid_mac2() -> None:
    s = Setup()
    first = s.initiation(10.0)
    assert not s.checker.check_mac2(bytes(first), SRC, 10.0)
    reply = s.checker.create_reply(bytes(first), SRC, 10.0)
    assert len(reply) == 64 and reply[:4] == b"\x03\x00\x00\x00"
    assert reply[4:8] == (0xA1B2C3D4).to_bytes(4, "little")
    assert s.gen.consume_reply(reply, 10.5)

    second = s.initiation(11.0)
    assert second[132:] != bytes(16)
    assert s.checker.check_mac1(bytes(second))
    assert s.checker.check_mac2(bytes(second), SRC, 11.0)
    assert s.checker.check_mac2(memoryview(second), SRC, 11.0)
    assert not s.checker.check_mac2(bytes(second), OTHER_SRC, 11.0)
    bad = bytearray(second)
    bad[20] ^= 1
    assert not s.checker.check_mac2(bytes(bad), SRC, 11.0)


def test_generator_cookie_expires_after_refresh_time() -> None:
    s = Setup()
    s.checker.set_secret(b"\x05" * 32, 0.0)
    assert s.gen.consume_reply(s.checker.create_reply(bytes(s.initiation(0.0)), SRC, 0.0), 1.0)
    assert s.initiation(120.9)[132:] != bytes(16)
    assert s.gen.has_fresh_cookie(120.9)
    assert s.initiation(121.0)[132:] == bytes(16)
    assert not s.gen.has_fresh_cookie(121.0)


def test_secret_rotation_invalidates_old_cookies() -> None:
    s = Setup()
    s.checker.set_secret(b"\x05" * 32, 0.0)
    assert s.gen.consume_reply(
        s.checker.create_reply(bytes(s.initiation(100.0)), SRC, 100.0), 100.0
    )
    assert s.checker.check_mac2(bytes(s.initiation(119.0)), SRC, 119.0)
    # The generator's cookie is still young, but the secret behind it is stale ...
    msg = s.initiation(125.0)
    assert msg[132:] != bytes(16)
    assert not s.checker.check_mac2(bytes(msg), SRC, 125.0)
    # ... and stays useless after the checker replaces the secret.
    new_reply = s.checker.create_reply(bytes(msg), SRC, 125.0)
    assert not s.checker.check_mac2(bytes(msg), SRC, 125.0)
    assert s.gen.consume_reply(new_reply, 125.0)
    assert s.checker.check_mac2(bytes(s.initiation(126.0)), SRC, 126.0)


def test_current_secret_rotates_lazily() -> None:
    s = Setup()
    a, born_a = s.checker.current_secret(5.0)
    assert born_a == 5.0 and len(a) == 32
    assert s.checker.current_secret(124.9) == (a, 5.0)
    b, born_b = s.checker.current_secret(125.0)
    assert b != a and born_b == 125.0


def test_shared_secret_between_checkers() -> None:
    s = Setup()
    other = CookieChecker(s.r, FakeRandom())
    secret, born = s.checker.current_secret(0.0)
    other.set_secret(secret, born)
    assert s.gen.consume_reply(s.checker.create_reply(bytes(s.initiation(0.0)), SRC, 0.0), 0.0)
    assert other.check_mac2(bytes(s.initiation(1.0)), SRC, 1.0)
    with pytest.raises(ValueError):
        other.set_secret(b"short", 0.0)


def test_reply_with_wrong_ad_rejected() -> None:
    s = Setup()
    first = s.initiation(0.0)
    reply = s.checker.create_reply(bytes(first), SRC, 0.0)
    s.initiation(0.5, index=7)  # a newer message: its mac1 is now the expected AD
    assert not s.gen.consume_reply(reply, 1.0)
    assert s.initiation(1.0)[132:] == bytes(16)


def test_reply_tampered_or_foreign_rejected() -> None:
    s = Setup()
    msg = s.initiation(0.0)
    reply = bytearray(s.checker.create_reply(bytes(msg), SRC, 0.0))
    reply[40] ^= 1
    assert not s.gen.consume_reply(bytes(reply), 0.0)
    # A cookie reply encrypted by someone else (wrong cookie key).
    foreign = CookieChecker(s.i, FakeRandom()).create_reply(bytes(msg), SRC, 0.0)
    assert not s.gen.consume_reply(foreign, 0.0)
    assert not s.gen.consume_reply(bytes(63), 0.0)


def test_reply_before_sending_anything_rejected() -> None:
    s = Setup()
    reply = s.checker.create_reply(bytes(s.initiation(0.0)), SRC, 0.0)
    fresh = CookieGenerator(s.r_at_i.mac1_key, s.r_at_i.cookie_key)
    assert not fresh.consume_reply(reply, 0.0)


def test_reply_nonce_comes_from_random_bytes() -> None:
    s = Setup()
    msg = bytes(s.initiation(0.0))
    assert (
        s.checker.create_reply(msg, SRC, 0.0)[8:32] != s.checker.create_reply(msg, SRC, 0.0)[8:32]
    )


def test_add_macs_rejects_other_sizes() -> None:
    s = Setup()
    with pytest.raises(ValueError):
        s.gen.add_macs(bytearray(100), 0.0)


def test_schedule_switches_at_the_published_instant_and_honours_the_previous_briefly() -> None:
    s = Setup()
    a, b = b"\x0a" * 32, b"\x0b" * 32
    s.checker.set_schedule(a, 0.0, b, ROTATE_INTERVAL)
    assert s.checker.current_secret(ROTATE_INTERVAL - 0.01) == (a, 0.0)
    assert s.checker.current_secret(ROTATE_INTERVAL) == (b, ROTATE_INTERVAL)
    # A cookie given under `a` just before the switch ...
    before = ROTATE_INTERVAL - 0.01
    assert s.gen.consume_reply(
        s.checker.create_reply(bytes(s.initiation(before)), SRC, before), before
    )
    # ... is honoured after it while `a` is younger than COOKIE_REFRESH_TIME, then refused.
    assert s.checker.check_mac2(bytes(s.initiation(ROTATE_INTERVAL + 1)), SRC, ROTATE_INTERVAL + 1)
    assert s.checker.check_mac2(bytes(s.initiation(119.99)), SRC, 119.99)
    assert not s.checker.check_mac2(bytes(s.initiation(120.0)), SRC, 120.0)
    # Nothing is accepted under a successor before its switch.
    late = Setup()
    late.checker.set_secret(b, ROTATE_INTERVAL)
    assert late.gen.consume_reply(
        late.checker.create_reply(bytes(late.initiation(ROTATE_INTERVAL)), SRC, ROTATE_INTERVAL),
        ROTATE_INTERVAL,
    )
    s.checker.set_schedule(a, 0.0, b, ROTATE_INTERVAL)
    early = ROTATE_INTERVAL - 1
    assert not s.checker.check_mac2(bytes(late.initiation(early)), SRC, early)
    assert s.checker.check_mac2(bytes(late.initiation(ROTATE_INTERVAL)), SRC, ROTATE_INTERVAL)
