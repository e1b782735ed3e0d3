"""Target `transport`: edited transport datagrams of a live session."""


from __future__ import annotations

from fuzz.targets.world import ADDR_A, ADDR_B, World, cached, check, fingerprint, ipv4, ipv6, mutate
from shardwg.proto.constants import (
    REPLAY_WINDOW,
    DropReason,
)


def transport_world() -> World:
    w = World(seed=21)
    w.establish()
    w.recording = False
    return w


# Why an edited transport datagram may be refused: all before or at authentication.
_TRANSPORT_DROPS = {
    -1 - r
    for r in (
        DropReason.TOO_SHORT,
        DropReason.BAD_TYPE,
        DropReason.BAD_SIZE,
        DropReason.UNKNOWN_INDEX,
        DropReason.KEY_EXPIRED,
        DropReason.DECRYPT_FAILED,
        DropReason.REPLAYED,
    )
}


def transport(data: bytes) -> None:
    """A genuine transport datagram, edited by the input; replays; late arrivals.

    data[0]: bits 0-1 pick the payload (0 keepalive, 1 IPv4, 2 IPv6, 3 IPv4), bit 2
    the direction (A->B or B->A), bit 3 a counter jump of data[2:4] (mod 9000) between
    an earlier datagram and this one; data[1] sizes the payload; data[4:] are `mutate`
    ops. Checks: an edited datagram is rejected without changing state and does not
    burn its counter (the genuine one is accepted afterwards); the genuine one is
    accepted and decrypts to the packet sent; every replay is rejected; the earlier
    datagram arriving late is accepted iff it is within REPLAY_WINDOW of the highest.
    """
    data = data[: 4 + 4 * 512]
    sel = data[0] if data else 0
    size = data[1] * 5 if len(data) > 1 else 0
    jump = int.from_bytes(data[2:4], "little") % 9000 if sel & 8 else 0
    w: World = cached("transport", transport_world)
    if sel & 4:
        frm, to, peer, src = w.b, w.a, w.peer_a, ADDR_B
        ips = ("10.0.0.2", "10.0.0.1", "fd00::2", "fd00::1")
    else:
        frm, to, peer, src = w.a, w.b, w.peer_b, ADDR_A
        ips = ("10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2")
    filler = bytes((i * 7 + size) & 0xFF for i in range(size))
    kind = sel & 3
    if kind == 0:
        pkt = b""
    elif kind == 2:
        pkt = ipv6(ips[2], ips[3], filler)
    else:
        pkt = ipv4(ips[0], ips[1], filler)
    kp = peer.current
    check(kp is not None, "transport world lost its session")
    assert kp is not None
    early = w.seal(frm, peer, pkt)
    kp.send_counter += jump
    genuine = w.seal(frm, peer, pkt)
    msg = mutate(genuine, data[4:])

    def expect_accept(d: bytes, what: str) -> None:
        got = w.deliver(to, d, src)
        check(got == len(pkt), f"{what}: genuine datagram gave {got!r}, not {len(pkt)}")
        if pkt:
            out = w.delivered.get(id(to), [])
            check(bool(out) and out[-1] == pkt, f"{what}: decrypted packet differs")
            out.clear()

    def expect_replayed(d: bytes, what: str) -> None:
        before = fingerprint(to)
        got = w.deliver(to, d, src)
        check(got == -1 - DropReason.REPLAYED, f"{what}: replay gave {got!r}")
        check(fingerprint(to) == before, f"{what}: replay changed state")

    if msg != genuine:
        before = fingerprint(to)
        res = w.deliver(to, msg, src)
        if isinstance(res, DropReason):  # retyped into a handshake message of that size
            check(msg[:4] != genuine[:4], f"transport took the handshake path: {res!r}")
        else:
            check(res in _TRANSPORT_DROPS, f"edited transport accepted ({res!r}): {msg.hex()}")
        check(fingerprint(to) == before, f"rejected transport changed state: {res!r}")
    expect_accept(genuine, "after edit" if msg != genuine else "unedited")
    expect_replayed(genuine, "genuine")
    gap = jump + 1
    if gap <= REPLAY_WINDOW:
        expect_accept(early, f"late by {gap}")
    else:
        got = w.deliver(to, early, src)
        check(got == -1 - DropReason.REPLAYED, f"late by {gap} > window gave {got!r}")
    expect_replayed(early, "early")
