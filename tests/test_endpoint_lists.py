"""Each worker's list of recent peer endpoints (shm/endpoints.py): what every worker's
initiation filter admits under a flood, read without decoding any peer slot."""

from __future__ import annotations

import mmap
from types import SimpleNamespace

import pytest

from shardwg.io.udp import sockaddr_bytes
from shardwg.shm import endpoints, peerslot
from shardwg.shm.endpoints import MAX_ENTRIES, RecentPeers, decode, encode, merged, read_all
from shardwg.shm.layout import Layout


def _peer(i: int, wall: float) -> SimpleNamespace:
    return SimpleNamespace(endpoint=(f"192.0.2.{i % 250 + 1}", 1000 + i), last_handshake_wall=wall)


def test_encode_decode_and_merge_order() -> None:
    buf = bytearray(endpoints.LIST_SIZE)
    a = [(5.0, sockaddr_bytes(("192.0.2.1", 1))), (3.0, sockaddr_bytes(("2001:db8::1", 2, 0, 0)))]
    assert encode(a + [(1.0, b"bad")], buf) == 2
    assert decode(buf) == a
    b = [(4.0, sockaddr_bytes(("192.0.2.9", 9))), (2.0, sockaddr_bytes(("192.0.2.1", 1)))]
    assert merged([a, b]) == [a[0][1], b[0][1], a[1][1]]  # newest first, each once


def test_the_owner_lists_its_most_recent_peers_at_bounded_cost() -> None:
    recent = RecentPeers()
    peers = {bytes([i % 256, i // 256]) * 16: _peer(i, float(i)) for i in range(1000)}
    for key, p in peers.items():
        recent.touch(key, p)
    old = next(iter(peers))
    recent.touch(old, peers[old])  # handshook again: now the most recent
    got = recent.entries(sockaddr_bytes)
    assert len(got) == MAX_ENTRIES
    assert got[0][1] == sockaddr_bytes(peers[old].endpoint)
    recent.forget(old)
    assert recent.entries(sockaddr_bytes)[0][0] == 999.0


def test_filter_endpoints_come_from_the_lists_not_the_peer_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flooded worker decoded every peer slot once a second (20,000 here)."""
    decoded = []
    monkeypatch.setattr(peerslot, "decode_peer", lambda *a: decoded.append(a))
    lay = Layout(2, 20000)
    buf = mmap.mmap(-1, lay.total_size)
    scratch = bytearray(endpoints.LIST_SIZE)
    for w in range(2):
        r = RecentPeers()
        for i in range(300):
            r.touch(bytes([w, i % 256, i // 256]) * 8, _peer(w * 1000 + i, float(i * 2 + w)))
        r.publish(lay.endpoint_list(buf, w), scratch, sockaddr_bytes)
    got = read_all([lay.endpoint_list(buf, w) for w in range(2)])
    assert not decoded
    assert len(got) == len(set(got)) and len(got) >= MAX_ENTRIES
    assert got[0] == sockaddr_bytes(_peer(1299, 0).endpoint)  # worker 1's newest handshake
    buf.close()
