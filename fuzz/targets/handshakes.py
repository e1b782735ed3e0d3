"""Targets `datagram` (any bytes as a UDP datagram, to both sides of a session and on to
the owning worker) and `mutated_handshake` (genuine handshake messages, edited)."""


from __future__ import annotations

import hashlib
import ipaddress

from fuzz.targets.world import (
    ADDR_A,
    ADDR_B,
    AUTHENTICATED_DROPS,
    MAX_UDP_PAYLOAD,
    REMOTE_OWNER,
    World,
    cached,
    check,
    check_outcome,
    fingerprint,
    fix_mac1,
    forget_world,
    ipv4,
    ipv6,
    is_drop,
    mutate,
    seeded,
    set_load,
)
from shardwg.proto import crypto
from shardwg.proto.constants import (
    INITIATION_SIZE,
    MAC_LEN,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
    DropReason,
)
from shardwg.proto.device import Device, ForeignInitiation


def datagram_world() -> World:
    """Established A<->B session; B also routes peer C, owned by worker REMOTE_OWNER.

    Device b3 (same gateway key, worker REMOTE_OWNER) owns C and gets every
    ForeignInitiation, as the owner would through the handoff ring. `seeds` holds
    genuine datagrams for the corpus: some already consumed (replays must be
    refused), some still in flight (a fresh initiation, data both ways, a packet
    with a spoofed inner source) that the world accepts once, as it would from the honest peer.
    """
    w = World(seed=1)
    w.establish()
    init, resp, keepalive = w.minted[:3]
    w.b.add_remote_peer(w.pub_c, ["10.0.0.3/32"], owner=REMOTE_OWNER)
    b3 = Device(w.key_b, seeded(7), worker_id=REMOTE_OWNER)
    b3.add_peer(w.pub_c, allowed_ips=["10.0.0.3/32"])
    c = Device(w.key_c, seeded(8), worker_id=2)
    peer_c = c.add_peer(w.pub_b, allowed_ips=["10.0.0.0/24"], endpoint=ADDR_B)
    peer_c.send_initiation(w.now, w.wall)
    init_c = w.take_outbox(c)[0]
    res = w.deliver(w.b, init_c, ("192.0.2.3", 51820))
    check(res == ForeignInitiation(REMOTE_OWNER), f"world setup: C's initiation gave {res!r}")
    check(w.deliver(b3, init_c, ("192.0.2.3", 51820), screened=True) is None, "world setup: b3")
    w.minted += [m for _p, m in b3.outbox]
    b3.outbox.clear()
    b3.events.clear()
    w.extra = [b3]
    w.seeds = {
        "initiation_replayed": init,
        "response_replayed": resp,
        "keepalive_replayed": keepalive,
        "initiation_from_remote_peer_replayed": init_c,
        "transport_ipv4_in_flight": w.seal(w.a, w.peer_b, ipv4("10.0.0.1", "10.0.0.2", b"s")),
        "transport_ipv6_in_flight": w.seal(w.b, w.peer_a, ipv6("fd00::2", "fd00::1", b"s6")),
        "transport_spoofed_source_in_flight": w.seal(
            w.a, w.peer_b, ipv4("10.9.9.9", "10.0.0.2", b"spoof")
        ),
    }
    w.advance(REKEY_TIMEOUT + 0.5)
    w.peer_b.send_initiation(w.now, w.wall)
    w.seeds["initiation_in_flight"] = w.take_outbox(w.a)[0]
    w.a.events.clear()
    w.honest_roundtrip()
    w.recording = False
    return w


def canonical(msg: bytes) -> bytes:
    """A handshake message without the fields anyone may rewrite (sender index, macs)."""
    if len(msg) in (INITIATION_SIZE, RESPONSE_SIZE) and msg[0] in (1, 2):
        return msg[:4] + bytes(4) + msg[8 : len(msg) - 2 * MAC_LEN]
    return msg


def source_of(digest: bytes) -> tuple[str, int]:
    """A source address chosen by the input: IPv4 or IPv6, any port."""
    port = int.from_bytes(digest[17:19], "big")
    if digest[0] & 1:
        return str(ipaddress.IPv6Address(digest[1:17])), port
    return str(ipaddress.IPv4Address(digest[1:5])), port


def datagram(data: bytes) -> None:
    """Any datagram from any source, to either side of an established session.

    Fed raw and, for handshake sizes, with mac1 recomputed (an attacker knows our
    public key), under load or not. Checks: documented result types only; a datagram
    rejected before it authenticated changes no peer state; nothing authenticates
    that no honest party sent (up to the sender index, which only mac1 covers); the
    honest session still carries packets both ways afterwards.
    """
    data = data[:MAX_UDP_PAYLOAD]
    w: World = cached("datagram", datagram_world)
    digest = hashlib.blake2s(data).digest()
    src = source_of(digest)
    load = bool(digest[0] & 2)
    accepted = False
    for dev in (w.a, w.b):
        variants = [data]
        if len(data) in (INITIATION_SIZE, RESPONSE_SIZE):
            fixed = fix_mac1(data, dev.local.mac1_key)
            if fixed != data:
                variants.append(fixed)
        for msg in variants:
            set_load(dev, load)
            before = fingerprint(dev), [fingerprint(x) for x in w.extra]
            res = w.deliver(dev, msg, src)
            check_outcome(res, "datagram")
            if isinstance(res, ForeignInitiation):  # the owner screens nothing again (ring)
                res = w.deliver(w.extra[0], msg, src, screened=True)
                check_outcome(res, "datagram handed off")
                check(not isinstance(res, bytes | ForeignInitiation), f"owner answered {res!r}")
            if is_drop(res) and res not in AUTHENTICATED_DROPS:
                if not accepted:
                    after = fingerprint(dev), [fingerprint(x) for x in w.extra]
                    check(before == after, f"rejected datagram changed state: {res!r}")
                continue
            accepted = True
            minted = {canonical(m) for m in w.minted}
            check(
                canonical(msg) in minted,
                f"accepted a datagram no honest party sent ({res!r}): {msg.hex()}",
            )
    for d in w.extra:  # b3's answers would go to C, which is not simulated
        d.outbox.clear()
        d.events.clear()
    w.honest_roundtrip()
    if accepted:
        forget_world("datagram")


# --------------------------------------------------------------------------- mutations


class HandshakeFixture:
    """One genuine handshake message, its receiver and what accepts it."""

    def __init__(
        self, world: World, receiver: Device, src: tuple[str, int], message: bytes
    ) -> None:
        self.world, self.receiver, self.src, self.message = world, receiver, src, message


_INIT, _RESP, _COOKIE = 0, 1, 2


def handshake_fixture(kind: int, load: bool) -> HandshakeFixture:
    """A genuine initiation (to B), response (to A) or cookie reply (to A), not yet delivered.

    Under load the receiver demands mac2, so the sender first earns a cookie the way
    a real peer would, and the message carries a valid mac2.
    """
    w = World(seed=11 + kind + 3 * load)
    if kind == _COOKIE:
        reply = _cookie_reply(w)
        w.minted.append(reply)
        return HandshakeFixture(w, w.a, ADDR_B, reply)
    if kind == _INIT:
        if load:
            check(w.deliver(w.a, _cookie_reply(w), ADDR_B) is None, "fixture: cookie not taken")
            w.advance(REKEY_TIMEOUT + 0.5)
        w.peer_b.send_initiation(w.now, w.wall)
        return HandshakeFixture(w, w.b, ADDR_A, w.take_outbox(w.a)[0])
    if load:
        set_load(w.a, True)
        w.peer_b.send_initiation(w.now, w.wall)
        check(w.deliver(w.b, w.take_outbox(w.a)[0], ADDR_A) is None, "fixture: init")
        reply = w.deliver(w.a, w.take_outbox(w.b)[0], ADDR_B)
        check(isinstance(reply, bytes), "fixture: no cookie reply to the response")
        assert isinstance(reply, bytes)
        check(w.deliver(w.b, reply, ADDR_A) is None, "fixture: B did not take the cookie")
        w.advance(REKEY_TIMEOUT + 0.5)
    w.peer_b.send_initiation(w.now, w.wall)
    check(w.deliver(w.b, w.take_outbox(w.a)[0], ADDR_A) is None, "fixture: init")
    w.b.events.clear()
    return HandshakeFixture(w, w.a, ADDR_B, w.take_outbox(w.b)[0])


def _cookie_reply(w: World) -> bytes:
    """B, under load, answers A's initiation with a cookie reply (not yet delivered)."""
    set_load(w.b, True)
    w.peer_b.send_initiation(w.now, w.wall)
    reply = w.deliver(w.b, w.take_outbox(w.a)[0], ADDR_A)
    check(isinstance(reply, bytes), "fixture: no cookie reply")
    assert isinstance(reply, bytes)
    return reply


def should_accept(fx: HandshakeFixture, kind: int, load: bool, msg: bytes) -> bool:
    """Whether a genuine peer would accept this edit of the genuine message.

    Initiation/response: only mac1 covers the sender index, and anyone can compute
    mac1; mac2 is checked only under load. Cookie reply: the receiver index is not
    authenticated, so any index naming the same pending handshake or session works.
    """
    orig = fx.message
    if len(msg) != len(orig) or msg[:4] != orig[:4]:
        return False
    if msg == orig:
        return True
    if kind == _COOKIE:
        if msg[8:] != orig[8:]:
            return False
        index = int.from_bytes(msg[4:8], "little")
        table = fx.receiver.table
        owner = table.pending.get(index)
        if owner is None and index in table.sessions:
            owner = table.sessions[index].peer
        return owner is fx.world.peer_b
    if load:
        return False  # mac2 covers everything before it
    o1 = len(orig) - 2 * MAC_LEN
    if msg[8:o1] != orig[8:o1]:
        return False
    return msg[o1 : o1 + MAC_LEN] == crypto.mac(fx.receiver.local.mac1_key, msg[:o1])


def mutated_handshake(data: bytes) -> None:
    """A genuine initiation, response or cookie reply, edited by the input.

    data[0]: bits 0-1 pick the message (0 initiation, 1 response, 2 cookie reply,
    3 initiation), bit 2 puts the receiver under load (mac2 required), bit 3
    recomputes mac1 after the edits (an attacker knows the public key); the rest are
    `mutate` ops. An edit is accepted only when a genuine peer would (`should_accept`),
    otherwise it gets a counted DropReason (or a cookie reply under load) and leaves
    the receiver's state untouched.
    """
    sel = data[0] if data else 0
    kind = (sel & 3) % 3
    load = bool(sel & 4) and kind != _COOKIE
    fix = bool(sel & 8) and kind != _COOKIE
    key = ("handshake", kind, load)
    fx: HandshakeFixture = cached(key, lambda: handshake_fixture(kind, load))
    msg = mutate(fx.message, data[1:])
    if fix and len(msg) == len(fx.message):
        msg = fix_mac1(msg, fx.receiver.local.mac1_key)
    expect = should_accept(fx, kind, load, msg)
    before = fingerprint(fx.receiver)
    res = fx.world.deliver(fx.receiver, msg, fx.src)
    check_outcome(res, "mutated handshake")
    if expect:
        check(res is None, f"genuine-equivalent message rejected with {res!r}: {msg.hex()}")
        forget_world(key)
        return
    check(is_drop(res), f"edited message accepted ({res!r}): {msg.hex()}")
    if isinstance(res, bytes):
        check(load and kind != _COOKIE, "cookie reply without load")
    elif isinstance(res, int) and not isinstance(res, DropReason):
        check(len(msg) != len(fx.message) or msg[:4] != fx.message[:4], "classify drop")
    check(fingerprint(fx.receiver) == before, f"rejected edit changed state: {res!r}")
