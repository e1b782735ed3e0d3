"""The per-peer record a worker publishes through its peer's seqlock slot.

Why: the owning worker is the only writer of a peer's state. Publishing it lets a
replacement worker resume the peer's sessions after a crash (no new handshake, no
reused nonce, no replay accepted twice) and lets `shardwg show`/UAPI read
endpoints, handshake times and byte counts from any process.

No key material lives here: this record is in the named region that `shardwg show`
maps whole. Each session's keys are in the workers' anonymous mapping
(shm/secrets.py), tagged with the session's local index; the publisher pairs them.

Nonce and replay safety across a crash, without a write per packet:
- `send_reserved`: the writer publishes it before using counters below it (e.g.
  in blocks of a few thousand); a replacement starts sending at it, so no
  counter is ever used twice under one key.
- `recv_floor`: every counter below it may already have been accepted; a
  replacement rejects them all (`restore_keypair`). The owner raises it to the
  counter + 1 before accepting each packet (not in blocks: a block ahead would make
  a replacement drop up to a block of fresh packets and stall a backed-off TCP
  sender), with one aligned 8-byte store outside the seqlock (atomic on x86-64; a
  reader takes either value, both safe), so the per-packet mark stays cheap.
`encode_counters` updates just those two words of one session in place. The rx and tx
byte counters are kept exact for readers the same way: the owner stores each word alone
whenever it counts.

Encoding (little-endian, 8-byte fields 8-aligned from the payload start, which
is 8-aligned in a seqlock slot), PEER_RECORD_SIZE bytes:
  0 magic "SWPR", u16 version, u16 flags (bit 0/1/2: current/previous/next present;
    bit 3: handed, the writer gave the slot to `owner` and writes it no more)
  8 u32 owner, u32 generation; 16 f64 last_handshake_wall; 24 u64 rx; 32 u64 tx
 40 public key[32]; 72 last TAI64N[12]; 84 endpoint (u8 family 0/4/6, u16 port,
    16-byte address, u32 scope id); pad to 112
112, 152, 192: three sessions of 40 bytes: f64 created, u64 send_reserved,
    u64 recv_floor, u32 local_index, u32 remote_index, u8 is_initiator, pad
An all-zero record is a free slot.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from shardwg.proto.constants import REJECT_AFTER_MESSAGES
from shardwg.proto.keypair import Keypair
from shardwg.proto.replay import ReplayWindow
from shardwg.shm.handoff import addr_fields, addr_from_fields

MAGIC = b"SWPR"
VERSION = 2  # 2: session keys moved out to shm/secrets.py
_HEAD_FMT = "4sHHIIdQQ32s12sBH16sI5x"
_KP_FMT = "dQQIIB7x"
_HEAD_SIZE = struct.calcsize("<" + _HEAD_FMT)
KEYPAIR_SIZE = struct.calcsize("<" + _KP_FMT)
KEYPAIR_OFFSETS = tuple(_HEAD_SIZE + i * KEYPAIR_SIZE for i in range(3))  # current/prev/next
TRAFFIC_OFFSET = 24  # u64 rx, u64 tx: the owner also stores them alone, at every count
KP_SEND_RESERVED = 8  # offset of send_reserved inside a session
KP_RECV_FLOOR = 16  # offset of recv_floor inside a session
PEER_RECORD_SIZE = (_HEAD_SIZE + 3 * KEYPAIR_SIZE + 63) // 64 * 64
_PAD = PEER_RECORD_SIZE - _HEAD_SIZE - 3 * KEYPAIR_SIZE
_RECORD = struct.Struct("<" + _HEAD_FMT + 3 * _KP_FMT + f"{_PAD}x")
_COUNTERS = struct.Struct("<QQ")
_ZERO = bytes(PEER_RECORD_SIZE)
_HAS = (1, 2, 4)
_HANDED = 8
_KP_FIELDS = 6
_HEAD_FIELDS = 14

assert struct.calcsize("<4sHHIId") == TRAFFIC_OFFSET
assert _HEAD_SIZE == 112 and KEYPAIR_SIZE == 40 and _RECORD.size == PEER_RECORD_SIZE <= 512


@dataclass(slots=True)
class KeypairRecord:
    """One published session, without its keys (shm/secrets.py holds them, by local index).
    `created` is CLOCK_MONOTONIC (system-wide, same in every process)."""

    local_index: int
    remote_index: int
    is_initiator: bool
    created: float
    send_reserved: int  # every send counter below this may already have been used
    recv_floor: int  # every receive counter below this may already have been accepted


@dataclass(slots=True)
class PeerRecord:
    """One peer as its owner publishes it. `generation` (u32) is bumped on every change."""

    public_key: bytes
    owner: int
    generation: int
    endpoint: tuple[Any, ...] | None = None
    last_handshake_wall: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_timestamp: bytes = bytes(12)
    current: KeypairRecord | None = None
    previous: KeypairRecord | None = None
    next: KeypairRecord | None = None
    # A placement move: the old owner's last write names the new owner in `owner` and
    # sets this; the new owner adopts the slot (restores it) and clears it.
    handed: bool = False


def _check_len(name: str, value: bytes, n: int) -> None:
    if len(value) != n:  # struct would silently pad or truncate
        raise ValueError(f"{name} must be {n} bytes, got {len(value)}")


def _kp_values(kp: KeypairRecord | None) -> tuple[Any, ...]:
    if kp is None:
        return (0.0, 0, 0, 0, 0, 0)
    return (
        kp.created,
        kp.send_reserved,
        kp.recv_floor,
        kp.local_index,
        kp.remote_index,
        1 if kp.is_initiator else 0,
    )


def encode_peer(rec: PeerRecord, out: bytearray | memoryview) -> None:
    """Write `rec` into out[:PEER_RECORD_SIZE] (e.g. inside `SeqlockSlot.write_fields`).

    ValueError (before anything is written) on a field that does not fit.
    """
    _check_len("public_key", rec.public_key, 32)
    _check_len("last_timestamp", rec.last_timestamp, 12)
    sessions = (rec.current, rec.previous, rec.next)
    flags = sum(bit for bit, kp in zip(_HAS, sessions, strict=True) if kp is not None)
    flags |= _HANDED if rec.handed else 0
    values = [
        MAGIC,
        VERSION,
        flags,
        rec.owner,
        rec.generation,
        rec.last_handshake_wall,
        rec.rx_bytes,
        rec.tx_bytes,
        rec.public_key,
        rec.last_timestamp,
        *addr_fields(rec.endpoint),
    ]
    for kp in sessions:
        values.extend(_kp_values(kp))
    try:
        packed = _RECORD.pack(*values)  # validate every field before touching `out`
    except struct.error as exc:
        raise ValueError(f"peer record field out of range: {exc}") from exc
    out[:PEER_RECORD_SIZE] = packed


def decode_peer(data: bytes | bytearray | memoryview) -> PeerRecord | None:
    """The record in data[:PEER_RECORD_SIZE]; None for a free (all-zero) slot.

    ValueError on a short buffer, bad magic/version/flags, or a bad field.
    """
    if len(data) < PEER_RECORD_SIZE:
        raise ValueError(f"peer record needs {PEER_RECORD_SIZE} bytes, got {len(data)}")
    if data[:PEER_RECORD_SIZE] == _ZERO:
        return None
    v = _RECORD.unpack_from(data, 0)
    magic, version, flags = v[0], v[1], v[2]
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a v{VERSION} peer record (magic {magic!r}, version {version})")
    if flags & ~15:
        raise ValueError(f"bad peer record flags {flags:#x}")
    sessions: list[KeypairRecord | None] = []
    for i, bit in enumerate(_HAS):
        f = v[_HEAD_FIELDS + i * _KP_FIELDS : _HEAD_FIELDS + (i + 1) * _KP_FIELDS]
        if not flags & bit:
            sessions.append(None)
            continue
        if f[5] > 1:
            raise ValueError(f"bad is_initiator byte {f[5]}")
        sessions.append(KeypairRecord(f[3], f[4], bool(f[5]), f[0], f[1], f[2]))
    return PeerRecord(
        public_key=v[8],
        owner=v[3],
        generation=v[4],
        endpoint=addr_from_fields(v[10], v[11], v[12], v[13]),
        last_handshake_wall=v[5],
        rx_bytes=v[6],
        tx_bytes=v[7],
        last_timestamp=v[9],
        current=sessions[0],
        previous=sessions[1],
        next=sessions[2],
        handed=bool(flags & _HANDED),
    )


def encode_counters(
    out: bytearray | memoryview, which: int, send_reserved: int, recv_floor: int
) -> None:
    """Update only session `which`'s (0 current, 1 previous, 2 next) two counter words.

    For the per-block publish inside `SeqlockSlot.write_fields`: 16 bytes, not a whole record.
    """
    _COUNTERS.pack_into(out, KEYPAIR_OFFSETS[which] + KP_SEND_RESERVED, send_reserved, recv_floor)


assert KP_RECV_FLOOR == KP_SEND_RESERVED + 8  # encode_counters writes both as one pair


def keypair_record(kp: Keypair, send_reserved: int, recv_floor: int) -> KeypairRecord:
    """What to publish for `kp` (its keys go to shm/secrets.py), with the caller's
    reservation and floor."""
    return KeypairRecord(
        kp.local_index,
        kp.remote_index,
        kp.is_initiator,
        kp.created,
        send_reserved,
        recv_floor,
    )


def floor_window(recv_floor: int) -> ReplayWindow:
    """A replay window that rejects every counter < recv_floor and accepts the rest.

    replay.py has no floor setter, so this goes through its public snapshot format:
    highest = recv_floor - 1 with every ring bit set but those of the counters after
    `highest` in its block. Counters at most the window behind `highest` hit a set
    bit, older ones are out of the window, and recv_floor and above are fresh.
    """
    if recv_floor <= 0:
        return ReplayWindow()  # a fresh window already accepts 0 and up
    highest = min(recv_floor, REJECT_AFTER_MESSAGES) - 1
    ring_bytes = ReplayWindow.SNAPSHOT_SIZE - 8
    ring = (1 << ring_bytes * 8) - 1
    # ...except the counters after `highest` in its own 64-counter block: the window only
    # clears a block when it moves past it, so those bits must start clear.
    above = highest & 63
    ring &= ~((((1 << 64) - 1) >> (above + 1) << (above + 1)) << ((highest >> 6) & 127) * 64)
    return ReplayWindow.restore(highest.to_bytes(8, "little") + ring.to_bytes(ring_bytes, "little"))


def restore_keypair(rec: KeypairRecord, send_key: bytes, recv_key: bytes) -> Keypair:
    """Rebuild a session in a replacement worker: sends from send_reserved, floor on receive."""
    kp = Keypair(
        send_key, recv_key, rec.local_index, rec.remote_index, rec.is_initiator, rec.created
    )
    kp.send_counter = rec.send_reserved
    kp.replay = floor_window(rec.recv_floor)
    # Counters from send_reserved on were never published: the first send publishes a block.
    kp.send_reserved = rec.send_reserved
    return kp
