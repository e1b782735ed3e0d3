"""The inbound kernel's state: flat buffers Python maintains and both implementations use.

Both `open_batch` implementations (native `_native.open_batch`, reference
`open_ref.open_batch`) read and write exactly these bytes, so a differential test can compare
them after every batch, and the per-session replay windows are the `Keypair.replay` objects
themselves (views into `sessions`), so the publisher's recv_floor stays live.

sessions: SESSION_SIZE bytes per slot (little-endian):
   0 u32 local index   4 u32 peer id (1-based; 0 = free slot)   8 f64 created (monotonic)
  16 u32 touch (1 + the session's row in `touched` during a call, 0 between calls)
  20 u32 zero   24 u64 zero   32 replay window (proto/replay.py, 1032 bytes)   pad to 1088
index: a power-of-two table of (u32 local index, u32 slot + 1) pairs, open addressing with
  linear probing from hash(index) = (index * 0x9E3779B1 mod 2**32) >> (32 - log2 size);
  a zero slot field ends a probe.
allowed: the allowed-IPs trie flattened into sorted disjoint address ranges, each the peer id
  whose prefix is the longest match for the whole range (0: nobody we own):
  u32 n4, u32 n6, u32 v4 starts[n4], u32 v4 ids[n4], pad to 8,
  u64 v6 starts high[n6], u64 v6 starts low[n6], u32 v6 ids[n6]  (native byte order).
The cipher contexts (one per slot, made when the session is) live in `keys`, an object of the
chosen implementation with `set(slot, key)` and `clear(slot)`.
"""

from __future__ import annotations

import struct
from typing import Any

from shardwg.proto.constants import DROP_REASON_COUNT
from shardwg.proto.keypair import Keypair
from shardwg.proto.replay import WINDOW_SIZE, ReplayWindow

SESSION_SIZE = 1088
S_INDEX = 0
S_PEER = 4
S_CREATED = 8
S_TOUCH = 16
S_REPLAY = 32
HASH_MUL = 0x9E3779B1
_SESSION_HEAD = struct.Struct("<IId")
_PAIR = struct.Struct("<II")
_COUNTS = struct.Struct("<II")

assert S_REPLAY + WINDOW_SIZE <= SESSION_SIZE


def index_hash(index: int, bits: int) -> int:
    return ((index * HASH_MUL) & 0xFFFFFFFF) >> (32 - bits)


def build_index(entries: list[tuple[int, int]]) -> bytearray:
    """(local index, slot) pairs -> the probe table (at most half full, >= 16 entries)."""
    bits = 4
    while (1 << bits) < 2 * len(entries):
        bits += 1
    size = 1 << bits
    table = bytearray(size * 8)
    for index, slot in entries:
        h = index_hash(index, bits)
        while _PAIR.unpack_from(table, h * 8)[1]:
            h = (h + 1) & (size - 1)
        _PAIR.pack_into(table, h * 8, index, slot + 1)
    return table


def build_allowed(items: list[tuple[Any, int]], lookup4: Any, lookup6: Any) -> bytearray:
    """Flatten prefixes (ipaddress networks, each with a value) into the range table.

    lookup4/lookup6 map an address int to a peer id by longest-prefix match (the trie).
    """
    starts: dict[int, set[int]] = {4: {0}, 6: {0}}
    top = {4: 1 << 32, 6: 1 << 128}
    for net, _value in items:
        first = int(net.network_address)
        starts[net.version].add(first)
        end = first + net.num_addresses
        if end < top[net.version]:
            starts[net.version].add(end)
    ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for version, lookup in ((4, lookup4), (6, lookup6)):
        for start in sorted(starts[version]):
            pid = lookup(start)
            if not ranges[version] or ranges[version][-1][1] != pid:
                ranges[version].append((start, pid))
    r4, r6 = ranges[4], ranges[6]
    n4, n6 = len(r4), len(r6)
    v6_at = (8 + 8 * n4 + 7) // 8 * 8
    buf = bytearray(v6_at + 20 * n6)
    _COUNTS.pack_into(buf, 0, n4, n6)
    struct.pack_into(f"={n4}I{n4}I", buf, 8, *(s for s, _ in r4), *(p for _, p in r4))
    struct.pack_into(
        f"={n6}Q{n6}Q{n6}I", buf, v6_at,
        *(s >> 64 for s, _ in r6), *(s & (2**64 - 1) for s, _ in r6), *(p for _, p in r6),
    )  # fmt: skip
    return buf


class OpenState:
    """The buffers for one worker's sessions, kept in step with its Device's index table
    and allowed IPs by `sync` (cheap when nothing changed: two integer compares)."""

    def __init__(self, keys: Any, capacity: int = 16) -> None:
        self.keys = keys
        self.sessions = bytearray(SESSION_SIZE * capacity)
        self.index = build_index([])
        self.allowed = build_allowed([], lambda a: 0, lambda a: 0)
        self.kps: list[Keypair | None] = [None] * capacity
        self._slot_of: dict[int, int] = {}  # id(keypair) -> slot
        self._peer_ids: dict[int, int] = {}  # id(peer) -> peer id
        self._peers: list[Any] = [None]  # peer id -> peer (keeps ids unique while held)
        self._table_gen = -1
        self._allowed_gen = -1
        self._followed_gen = -1

    @property
    def capacity(self) -> int:
        return len(self.kps)

    def sync(self, device: Any) -> None:
        """Bring the buffers in step with the device: its own sessions and the spread
        sessions it follows (another worker's peer, opened here with our own replay window
        and its floor in our ledger cell: shm/follower.py), and the allowed IPs of both."""
        table, allowed = device.table, device.allowed
        fgen = device.followed_generation
        if table.generation != self._table_gen or fgen != self._followed_gen:
            followed = device.followed
            self._sync_sessions({**table.sessions, **followed} if followed else table.sessions)
            self._table_gen = table.generation
        if allowed.generation != self._allowed_gen or fgen != self._followed_gen:
            self._sync_allowed(device)
            self._allowed_gen = allowed.generation
        self._followed_gen = fgen

    def peer_id(self, peer: Any) -> int:
        pid = self._peer_ids.get(id(peer))
        if pid is None:
            pid = self._peer_ids[id(peer)] = len(self._peers)
            self._peers.append(peer)
        return pid

    # -- sessions -----------------------------------------------------------------------
    def _sync_sessions(self, live: dict[int, Keypair]) -> None:
        for slot, kp in enumerate(self.kps):
            if kp is not None and live.get(kp.local_index) is not kp:
                self._free(slot, kp)
        for kp in live.values():
            if id(kp) not in self._slot_of:
                self._bind(kp)
        self.index = build_index(
            [(kp.local_index, s) for s, kp in enumerate(self.kps) if kp is not None]
        )

    def _bind(self, kp: Keypair) -> None:
        try:
            slot = self.kps.index(None)
        except ValueError:
            slot = len(self.kps)
            self._grow(2 * slot)
        off = slot * SESSION_SIZE
        self.sessions[off : off + SESSION_SIZE] = bytes(SESSION_SIZE)
        _SESSION_HEAD.pack_into(
            self.sessions, off, kp.local_index, self.peer_id(kp.peer), kp.created
        )
        kp.replay.move_to(self.sessions, off + S_REPLAY)
        self.keys.set(slot, kp.recv_key)
        self.kps[slot] = kp
        self._slot_of[id(kp)] = slot

    def _free(self, slot: int, kp: Keypair) -> None:
        kp.replay.move_to(bytearray(WINDOW_SIZE), 0)  # a released session keeps its own copy
        off = slot * SESSION_SIZE
        self.sessions[off : off + SESSION_SIZE] = bytes(SESSION_SIZE)
        self.keys.clear(slot)
        self.kps[slot] = None
        del self._slot_of[id(kp)]

    def _grow(self, capacity: int) -> None:
        grown = bytearray(SESSION_SIZE * capacity)
        grown[: len(self.sessions)] = self.sessions
        self.sessions = grown
        for slot, kp in enumerate(self.kps):
            if kp is not None:
                kp.replay = ReplayWindow(grown, slot * SESSION_SIZE + S_REPLAY)
        self.kps.extend([None] * (capacity - len(self.kps)))

    # -- allowed IPs --------------------------------------------------------------------
    def _sync_allowed(self, device: Any) -> None:
        owned = {id(p) for p in device.peers.values()}
        owned.update(id(kp.peer) for kp in device.followed.values())  # their sources too
        held = owned | {id(kp.peer) for kp in self.kps if kp is not None}
        for key, pid in list(self._peer_ids.items()):
            if key not in held:  # a removed peer: forget it (its id is never reused)
                del self._peer_ids[key]
                self._peers[pid] = None

        def pid_of(value: Any) -> int:
            return self.peer_id(value) if value is not None and id(value) in owned else 0

        trie = device.allowed
        self.allowed = build_allowed(
            list(trie.items()),
            lambda a: pid_of(trie.lookup_v4(a)),
            lambda a: pid_of(trie.lookup_v6(a)),
        )


# -- the call's output buffers (shared by both implementations) -----------------------------
# counters: u64 words, added to (the caller folds and clears them)
C_RX_PACKETS = 0  # datagrams seen (GRO batches counted per datagram)
C_RX_BYTES = 1
C_TRANSPORT = 2  # of them classified as transport
C_MERGED = 3  # packets that went into a super-packet
C_DROPS = 4  # then one word per DropReason
COUNTERS_LEN = C_DROPS + DROP_REASON_COUNT
TOUCH_WORDS = 5  # touched: u64 slot, last message (its source roams the peer), rx bytes,
T_SLOT, T_MSG, T_BYTES, T_DATA, T_ACCEPTED = range(TOUCH_WORDS)  # data packets, accepted
SPAN_WORDS = 2  # spans: u32 offset into `out`, u32 length (10-byte vnet header + packet)
HS_WORDS = 3  # handshakes: u32 message, u32 offset in it, u32 length


def batch_arrays(data_size: int) -> dict[str, bytearray]:
    """Output buffers large enough for any batch of `data_size` received bytes."""
    most = data_size // 32 + 1  # no datagram we keep is shorter than a keepalive
    return {
        "dec": bytearray(data_size + 4096),
        "out": bytearray(data_size + 4096),
        "spans": bytearray(most * SPAN_WORDS * 4),
        "touched": bytearray(most * TOUCH_WORDS * 8),  # a session has one row per call
        "handshakes": bytearray((data_size // 64 + 1) * HS_WORDS * 4),
        "counters": bytearray(COUNTERS_LEN * 8),
    }
