"""The device's wake-up heap: a tick costs what is due, not what is configured, and every
timer still fires when it should (wireguard-go's timers, driven by a fake clock)."""

from __future__ import annotations

import os

import pytest
from pairs import Pair, ipv4_packet

from shardwg.proto import crypto
from shardwg.proto.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT
from shardwg.proto.device import Device
from shardwg.proto.peer import INF, Peer, PeerEvent


def _device_with(n: int, keepalive_every: int = 0) -> Device:
    dev = Device(crypto.generate_private_key(os.urandom(32)), os.urandom)
    for i in range(n):
        pub = crypto.public_key(crypto.generate_private_key(os.urandom(32)))
        ka = 25 if keepalive_every and i % keepalive_every == 0 else 0
        dev.add_peer(pub, endpoint=("192.0.2.1", 1000 + i), persistent_keepalive=ka)
    return dev


def test_an_idle_tick_looks_at_no_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """It walked every peer's deadlines every 50 ms (2,000 calls per tick here)."""
    dev = _device_with(2000)
    looked = 0
    real = Peer.next_deadline

    def counting(self: Peer) -> float:
        nonlocal looked
        looked += 1
        return real(self)

    monkeypatch.setattr(Peer, "next_deadline", counting)
    for k in range(20):
        dev.tick(100.0 + k * 0.05, 1e9)
    assert looked == 0
    assert dev.next_wakeup() == INF


def test_due_timers_fire_among_many_idle_peers() -> None:
    """Peers with a persistent keepalive initiate (no session yet) when it falls due; the
    others stay silent; a tick only pops what is due."""
    dev = _device_with(500, keepalive_every=50)  # 10 peers with PersistentKeepalive = 25
    now = 1000.0
    for p in dev.peers.values():
        if p.persistent_keepalive:
            p._sent_authenticated(now)  # as after the boot keepalive
    assert len(dev.timers) == 10 and dev.next_wakeup() == now + 25
    dev.tick(now + 24.9, 1e9)
    assert not dev.outbox
    dev.tick(now + 25.0, 1e9)
    senders = {p for p, _msg in dev.outbox}
    assert len(senders) == 10 and all(p.persistent_keepalive for p in senders)
    # each now waits on its handshake retransmission
    assert all(p.timer_at <= now + 25 + REKEY_TIMEOUT + 1 for p in senders)


def test_a_deadline_moved_later_fires_late_not_early() -> None:
    p = Pair(keepalive=0)
    p.send(p.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"x"))
    p.pump()
    peer = p.peer_a  # B's view of A: it received data, its keepalive is armed
    assert peer.keepalive_deadline == p.now + KEEPALIVE_TIMEOUT
    first = peer.timer_at
    assert first <= peer.keepalive_deadline
    p.advance(KEEPALIVE_TIMEOUT / 2)
    p.send(p.b, ipv4_packet("10.0.0.2", "10.0.0.1", b"reply"))  # data sent: no keepalive due
    p.b.outbox.clear()
    p.advance(KEEPALIVE_TIMEOUT / 2)  # the old wake-up is due and finds nothing to send
    p.b.tick(p.now, p.wall)
    assert not p.b.outbox
    assert peer.timer_at > p.now  # re-armed at the real next deadline
    assert peer.timer_at == peer.next_deadline()


def test_a_removed_peer_never_fires() -> None:
    dev = _device_with(3)
    peer = next(iter(dev.peers.values()))
    peer.send_initiation(10.0, 1e9)
    dev.outbox.clear()
    dev.remove_peer(peer.public_key)
    dev.events.clear()
    dev.tick(10.0 + REKEY_TIMEOUT + 1, 1e9)
    assert not dev.outbox and (peer, PeerEvent.INITIATION_SENT) not in dev.events
