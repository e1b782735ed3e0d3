"""The placement table: which worker owns each peer, decided and written by the supervisor.

Why a table and not a hash: a hash of the public key piles peers onto one worker by
chance (2 peers on 2 workers share one half of the time). The supervisor places peers
deliberately and publishes the result here; every worker reads it at boot and when the
generation moves, and routes initiations and TUN packets by it.

Single writer (the supervisor), one seqlock over the whole payload, so a reader sees
one consistent placement. Entries are indexed by peer slot (shm/peerslot.py):
  0   "SWPL", u32 mode (0 hash, 1 count, 2 load), u32 generation, u32 entries,
      u64 moves_total, u32 history length, u32 pad
  32  HISTORY moves, newest first, each: f64 wall, f32 ratio (hot worker / mean, 0 for
      count moves), f32 latency (seconds to the new owner's adoption, -1 while in flight),
      u16 from, u16 to, u8 reason, 3 pad, public key[32]  (56 bytes)
  ... one u32 per peer slot: 0 = not placed, else bits 0-15 owner + 1, bits 16-23 how
      (1 = owned by one worker; 2 = spread: the owner runs handshakes and timers, every
      worker seals the peer's packets under its own counter blocks, proto/spread.py),
      bits 24-31 why a spread peer is spread (SpreadWhy; for show and metrics only).
The owner field in a peer's own record (peerslot) names the worker that writes that
record; during a move the two differ until the new owner adopts the slot.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

_MAGIC = b"SWPL"
_HEAD = struct.Struct("<4sIIIQII")
_MOVE = struct.Struct("<dffHHB3x32s")
HISTORY = 8
_ENTRIES_AT = _HEAD.size + HISTORY * _MOVE.size
HOW_OWNED = 1  # an entry's "how": one worker owns the peer
HOW_SPREAD = 2  # the owner owns it, and every worker seals its packets (proto/spread.py)


class Mode(IntEnum):
    HASH = 0  # owner_of(key): today's behaviour, never moved
    COUNT = 1  # balanced by count at start and on every configuration change
    LOAD = 2  # COUNT, and while running a hot worker's peer moves to a lighter one


class SpreadWhy(IntEnum):
    POLICY = 1  # shardwg run --spread on
    OVERRIDE = 2  # the peer's own `Spread = on` in the configuration
    TRAFFIC = 3  # --spread auto: its owner stayed saturated, and mostly by this peer
    FEWER = 4  # --spread auto (the default) with fewer peers than workers
    PACKETS = 5  # the peer's own `Spread = packets`: OVERRIDE, and one flow's packets too


# Why-s that also steer the peer's received datagrams by counter (bit 8 of its indices):
# only where we are told the other end spreads by the same blocks. The others spread our
# sealing only: against a sender that counts in sequence (wireguard-go, or a shardwg end
# not spreading this peer), counter steering would reorder every flow.
BOTH_WAYS = frozenset({SpreadWhy.POLICY, SpreadWhy.OVERRIDE, SpreadWhy.PACKETS})


class Reason(IntEnum):
    COUNT = 1  # a configuration change left the counts uneven
    LOAD = 2  # a worker stayed well above the mean


_WHYS = frozenset(int(w) for w in SpreadWhy)


def table_size(entries: int) -> int:
    """Payload bytes of a table with `entries` peer slots."""
    return _ENTRIES_AT + 4 * entries


@dataclass(slots=True)
class MoveRecord:
    public_key: bytes
    src: int
    dst: int
    reason: Reason
    wall: float
    ratio: float = 0.0
    latency: float = -1.0


@dataclass(slots=True)
class PlacementTable:
    mode: Mode
    owners: list[int]  # per peer slot: owning worker, -1 = not placed
    generation: int = 0
    moves_total: int = 0
    history: list[MoveRecord] = field(default_factory=list)
    spread: set[int] = field(default_factory=set)  # peer slots whose packets every worker seals
    spread_why: dict[int, SpreadWhy] = field(default_factory=dict)  # of those slots, why


def encode_table(t: PlacementTable, out: bytearray | memoryview) -> None:
    """Write `t` into out[:table_size(len(t.owners))]; ValueError on a bad field."""
    n = len(t.owners)
    if len(out) < table_size(n):
        raise ValueError(f"placement table of {n} entries needs {table_size(n)} bytes")
    hist = t.history[:HISTORY]
    _HEAD.pack_into(out, 0, _MAGIC, int(t.mode), t.generation & 0xFFFFFFFF, n, t.moves_total,
                    len(hist), 0)  # fmt: skip
    for i in range(HISTORY):
        off = _HEAD.size + i * _MOVE.size
        if i < len(hist):
            m = hist[i]
            if len(m.public_key) != 32:
                raise ValueError("move public key must be 32 bytes")
            _MOVE.pack_into(out, off, m.wall, m.ratio, m.latency, m.src, m.dst, int(m.reason),
                            m.public_key)  # fmt: skip
        else:
            out[off : off + _MOVE.size] = bytes(_MOVE.size)
    words = memoryview(out)[_ENTRIES_AT : _ENTRIES_AT + 4 * n].cast("I")
    for i, owner in enumerate(t.owners):
        if not -1 <= owner < 0xFFFF:
            raise ValueError(f"owner {owner} out of range")
        how = HOW_SPREAD if i in t.spread else HOW_OWNED
        why = int(t.spread_why.get(i, 0)) if how == HOW_SPREAD else 0
        words[i] = 0 if owner < 0 else (why << 24) | (how << 16) | (owner + 1)
    words.release()


def decode_table(data: bytes | bytearray | memoryview) -> PlacementTable | None:
    """None if never written; ValueError on a foreign or truncated block."""
    if len(data) < _ENTRIES_AT:
        raise ValueError("placement table truncated")
    magic, mode, gen, n, total, hlen, _ = _HEAD.unpack_from(data, 0)
    if magic == bytes(4):
        return None
    if magic != _MAGIC or len(data) < table_size(n) or hlen > HISTORY:
        raise ValueError("not a shardwg placement table")
    history = []
    for i in range(hlen):
        wall, ratio, latency, src, dst, reason, key = _MOVE.unpack_from(
            data, _HEAD.size + i * _MOVE.size
        )
        history.append(MoveRecord(key, src, dst, Reason(reason), wall, ratio, latency))
    owners = []
    spread = set()
    why: dict[int, SpreadWhy] = {}
    for i, (word,) in enumerate(
        struct.iter_unpack("<I", bytes(data[_ENTRIES_AT : _ENTRIES_AT + 4 * n]))
    ):
        owners.append((word & 0xFFFF) - 1 if word else -1)
        if word and (word >> 16) & 0xFF == HOW_SPREAD:
            spread.add(i)
            if word >> 24 in _WHYS:
                why[i] = SpreadWhy(word >> 24)
    return PlacementTable(Mode(mode), owners, gen, total, history, spread, why)
