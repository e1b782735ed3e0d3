"""Target `cookie`: cookie replies and mac2 checks."""


from __future__ import annotations

import hashlib

from fuzz.targets.world import check, mutate, seeded
from shardwg.proto import crypto
from shardwg.proto.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
)
from shardwg.proto.cookie import CookieChecker, CookieGenerator
from shardwg.proto.noise import LocalIdentity


def fit(data: bytes, size: int) -> bytes:
    return (data * (size // max(1, len(data)) + 1))[:size] if data else bytes(size)


COOKIE_LOCAL = LocalIdentity.from_private(crypto.generate_private_key(bytes(range(32))))


def cookie(data: bytes) -> None:
    """mac1/mac2 checks and cookie replies on arbitrary bytes: only bool results.

    Any size and content, bytes or memoryview, with and without a cookie secret or a
    sent mac1. Then the round trip on a message built from the input: our mac1
    verifies, the cookie reply decrypts for the sender only with an unedited reply,
    and the resulting mac2 verifies for that source and no other.
    """
    local = COOKIE_LOCAL
    now = 50.0
    digest = hashlib.blake2s(data).digest()
    source = digest[:18] if digest[0] & 1 else digest[:6]
    other = bytes([source[0] ^ 1]) + source[1:]
    checker = CookieChecker(local, seeded(digest[1]))
    gen = CookieGenerator(local.mac1_key, local.cookie_key)
    blobs: list[bytes | memoryview] = [data, memoryview(data)]
    blobs += [fit(data, n) for n in (COOKIE_REPLY_SIZE, RESPONSE_SIZE, INITIATION_SIZE)]
    for blob in blobs:
        check(gen.consume_reply(bytes(blob), now) is False, "cookie accepted with nothing sent")
        check(type(checker.check_mac1(blob)) is bool, "check_mac1 not bool")
        check(checker.check_mac2(blob, source, now) is False, "mac2 valid without a secret")
    size = INITIATION_SIZE if digest[2] & 1 else RESPONSE_SIZE
    buf = bytearray(fit(data, size))
    gen.add_macs(buf, now)
    msg = bytes(buf)
    check(checker.check_mac1(msg) is True, "our own mac1 does not verify")
    check(checker.check_mac2(msg, source, now) is False, "mac2 valid without a cookie")
    for blob in blobs:
        res = gen.consume_reply(bytes(blob), now)
        check(type(res) is bool, "consume_reply not bool")
        check(not res or len(blob) == COOKIE_REPLY_SIZE, "cookie taken from a wrong size")
        check(type(checker.check_mac2(blob, source, now)) is bool, "check_mac2 not bool")
    reply = checker.create_reply(msg, source, now)
    check(len(reply) == COOKIE_REPLY_SIZE and reply[4:8] == msg[4:8], "bad reply")
    edited = mutate(reply, data[:16])
    if edited != reply:
        check(gen.consume_reply(edited, now) is False or edited[8:] == reply[8:], "forged")
    check(gen.consume_reply(reply, now) is True, "genuine cookie reply refused")
    gen.add_macs(buf, now)
    msg = bytes(buf)
    check(checker.check_mac2(msg, source, now) is True, "mac2 from our cookie fails")
    check(checker.check_mac2(msg, other, now) is False, "cookie valid for another source")
    check(checker.check_mac2(msg, source, now + 121.0) is False, "stale cookie secret valid")
