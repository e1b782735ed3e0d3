"""Each worker's list of its peers' recent endpoints, for every worker's initiation filter.

Why: under a flood a worker's kernel filter lets through initiations from known peer
endpoints (io/initiation_filter.py holds up to 256 per socket). Every worker needs every
peer's endpoint, since an initiation lands on any worker. Reading them by decoding every
peer slot cost each flooded worker a decode per configured peer every second (10,000 peers:
10,000 decodes a second per worker). Instead each owner keeps the endpoints of its peers
with the most recent handshakes in one seqlocked list of its own (`EndpointList`, rewritten
only when one of them changed, at most once a second), and a reader copies N small lists.

Payload: u32 count, 4 bytes pad, then `count` entries of ENTRY_SIZE bytes: f64 last
handshake (Unix seconds), u8 address length (6: IPv4 + port, 18: IPv6 + port), the packed
address (ip || big-endian port, as udp.sockaddr_bytes makes it), padding.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from shardwg.shm.seqlock import SeqlockSlot

MAX_ENTRIES = 256  # as many as one filter program holds (io/initiation_filter.MAX_ENDPOINTS)
ENTRY_SIZE = 32
_HEAD = struct.Struct("<I4x")
_ENTRY = struct.Struct("<dB18s5x")
LIST_SIZE = _HEAD.size + MAX_ENTRIES * ENTRY_SIZE

assert _ENTRY.size == ENTRY_SIZE


def encode(entries: Iterable[tuple[float, bytes]], out: bytearray) -> int:
    """Write (last handshake, packed address) entries into out (LIST_SIZE bytes); the count."""
    n = 0
    for wall, addr in entries:
        if n == MAX_ENTRIES:
            break
        if len(addr) not in (6, 18):
            continue
        _ENTRY.pack_into(out, _HEAD.size + n * ENTRY_SIZE, wall, len(addr), addr)
        n += 1
    _HEAD.pack_into(out, 0, n)
    return n


def decode(data: bytes | bytearray | memoryview) -> list[tuple[float, bytes]]:
    """The entries of one list; a corrupt count yields what fits."""
    n = min(_HEAD.unpack_from(data, 0)[0], MAX_ENTRIES)
    out = []
    for i in range(n):
        wall, length, raw = _ENTRY.unpack_from(data, _HEAD.size + i * ENTRY_SIZE)
        if length in (6, 18):
            out.append((wall, bytes(raw[:length])))
    return out


def read_all(slots: Iterable[SeqlockSlot]) -> list[bytes]:
    """Every worker's list (one seqlocked copy each), merged: what the filter admits."""
    return merged(decode(slot.read(max_retries=1000)) for slot in slots)


def merged(lists: Iterable[list[tuple[float, bytes]]]) -> list[bytes]:
    """Every worker's entries, most recent handshake first, each address once."""
    found = sorted((e for entries in lists for e in entries), key=lambda e: -e[0])
    return list(dict.fromkeys(addr for _wall, addr in found))


class RecentPeers:
    """The owner's side: which peers handshook last, and its list when it changed.

    `touch` is called on a completed handshake or a new endpoint (not per packet); `due`
    says whether the list must be rewritten; `entries` walks from the most recent peer,
    cost MAX_ENTRIES at most, never the number of peers.
    """

    def __init__(self) -> None:
        self.order: OrderedDict[bytes, Any] = OrderedDict()  # key -> Peer, oldest first
        self.dirty = False

    def touch(self, key: bytes, peer: Any) -> None:
        self.order[key] = peer
        self.order.move_to_end(key)
        self.dirty = True

    def forget(self, key: bytes) -> None:
        if self.order.pop(key, None) is not None:
            self.dirty = True

    def entries(self, pack: Any) -> list[tuple[float, bytes]]:
        """(last handshake, pack(endpoint)) of the most recent peers with an endpoint."""
        out: list[tuple[float, bytes]] = []
        for peer in reversed(self.order.values()):
            if peer.endpoint is not None:
                out.append((peer.last_handshake_wall, pack(peer.endpoint)))
                if len(out) == MAX_ENTRIES:
                    break
        return out

    def publish(self, slot: SeqlockSlot, scratch: bytearray, pack: Any) -> None:
        encode(self.entries(pack), scratch)
        slot.write(scratch)
        self.dirty = False
