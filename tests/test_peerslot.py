"""Peer records: codec round trips, corruption, and resuming sessions from a record."""

from __future__ import annotations

import struct

import pytest

from shardwg.proto.constants import (
    DEFAULT_MTU,
    REJECT_AFTER_MESSAGES,
    REPLAY_WINDOW,
    TAG_LEN,
    TRANSPORT_HEADER_SIZE,
    DropReason,
)
from shardwg.proto.keypair import RESERVATION_BLOCK, Keypair, open_into, seal_into
from shardwg.shm.peerslot import (
    KEYPAIR_OFFSETS,
    KP_RECV_FLOOR,
    KP_SEND_RESERVED,
    PEER_RECORD_SIZE,
    KeypairRecord,
    PeerRecord,
    decode_peer,
    encode_counters,
    encode_peer,
    floor_window,
    keypair_record,
    restore_keypair,
)
from shardwg.shm.seqlock import SeqlockSlot

K1, K2 = bytes(range(32)), bytes(range(100, 132))


def _kp(n: int, initiator: bool) -> KeypairRecord:
    return KeypairRecord(
        local_index=0x01020300 + n,
        remote_index=0xA0B0C0D0 + n,
        is_initiator=initiator,
        created=12345.678 + n,
        send_reserved=4096 * n + 7,
        recv_floor=2**63 + n,
    )


def _full() -> PeerRecord:
    return PeerRecord(
        public_key=K1,
        owner=3,
        generation=0xFFFFFFFF,
        endpoint=("2001:db8::7", 51820, 0, 0),
        last_handshake_wall=1.7e9 + 0.25,
        rx_bytes=2**64 - 1,
        tx_bytes=12345,
        last_timestamp=bytes(range(12)),
        current=_kp(1, True),
        previous=_kp(2, False),
        next=_kp(3, True),
    )


def _roundtrip(rec: PeerRecord) -> PeerRecord | None:
    out = bytearray(PEER_RECORD_SIZE)
    encode_peer(rec, out)
    return decode_peer(out)


def test_record_size() -> None:
    assert PEER_RECORD_SIZE % 64 == 0 and PEER_RECORD_SIZE <= 512
    assert all(off % 8 == 0 for off in KEYPAIR_OFFSETS)
    assert KP_SEND_RESERVED % 8 == 0 and KP_RECV_FLOOR % 8 == 0  # single aligned stores


def test_counter_words_at_documented_offsets() -> None:
    out = bytearray(PEER_RECORD_SIZE)
    encode_peer(_full(), out)
    at = KEYPAIR_OFFSETS[2]
    assert struct.unpack_from("<QQ", out, at + KP_SEND_RESERVED) == (4096 * 3 + 7, 2**63 + 3)
    struct.pack_into("<Q", out, at + KP_RECV_FLOOR, 99)  # the in-place high-water store
    back = decode_peer(out)
    assert back is not None and back.next is not None and back.next.recv_floor == 99


def test_full_record_roundtrip() -> None:
    rec = _full()
    assert _roundtrip(rec) == rec


@pytest.mark.parametrize(
    "endpoint,sessions",
    [(None, (True, False, False)), (("192.0.2.9", 1), (False, False, True)), (None, ())],
)
def test_partial_record_roundtrip(endpoint: tuple[object, ...] | None, sessions: tuple) -> None:
    rec = PeerRecord(public_key=K2, owner=0, generation=1, endpoint=endpoint)
    for name, present in zip(("current", "previous", "next"), sessions, strict=False):
        if present:
            setattr(rec, name, _kp(5, False))
    back = _roundtrip(rec)
    assert back == rec
    assert back is not None and back.previous is None


def test_through_a_seqlock_slot() -> None:
    slot = SeqlockSlot(bytearray(8 + PEER_RECORD_SIZE), 0, PEER_RECORD_SIZE)
    assert decode_peer(slot.read()) is None  # free slot
    rec = _full()
    slot.write_fields(lambda view: encode_peer(rec, view))
    assert decode_peer(slot.read()) == rec
    slot.write_fields(lambda view: encode_counters(view, 0, 9000, 8000))
    back = decode_peer(slot.read())
    assert back is not None and back.current is not None and back.previous == rec.previous
    assert (back.current.send_reserved, back.current.recv_floor) == (9000, 8000)


def _corrupt(offset: int, value: bytes) -> bytearray:
    out = bytearray(PEER_RECORD_SIZE)
    encode_peer(_full(), out)
    out[offset : offset + len(value)] = value
    return out


@pytest.mark.parametrize(
    "offset,value",
    [
        (0, b"XXXX"),  # magic
        (4, struct.pack("<H", 99)),  # version
        (6, struct.pack("<H", 16)),  # unknown flag (bit 3 is "handed")
        (84, b"\x05"),  # endpoint family
        (KEYPAIR_OFFSETS[1] + 32, b"\x02"),  # is_initiator not a bool
    ],
)
def test_corrupt_record_raises(offset: int, value: bytes) -> None:
    with pytest.raises(ValueError):
        decode_peer(_corrupt(offset, value))


def test_short_buffer_and_zero_magic_with_data_raise() -> None:
    with pytest.raises(ValueError):
        decode_peer(bytes(PEER_RECORD_SIZE - 1))
    with pytest.raises(ValueError):
        decode_peer(_corrupt(0, bytes(8)))  # header wiped, keys left: not a free slot


@pytest.mark.parametrize(
    "field,value",
    [("public_key", bytes(31)), ("last_timestamp", bytes(13)), ("owner", -1), ("rx_bytes", 2**64)],
)
def test_encode_rejects_bad_fields_without_writing(field: str, value: object) -> None:
    rec = _full()
    setattr(rec, field, value)
    out = bytearray(b"\xaa" * PEER_RECORD_SIZE)
    with pytest.raises(ValueError):
        encode_peer(rec, out)
    assert out == b"\xaa" * PEER_RECORD_SIZE


# ---------------------------------------------------------------- resuming sessions


@pytest.mark.parametrize(
    "floor", [1, 2, 5, REPLAY_WINDOW - 1, REPLAY_WINDOW, REPLAY_WINDOW + 1, 8192, 8193, 10**6]
)
def test_floor_window_rejects_below_accepts_from_floor(floor: int) -> None:
    w = floor_window(floor)
    assert w.highest == floor - 1
    assert not w.check(floor - 1) and not w.accept(floor - 1)
    assert not w.check(0) and not w.accept(0)
    assert not w.check(max(floor - REPLAY_WINDOW, 0))
    assert not w.check(max(floor - 8192, 0))
    assert w.check(floor) and w.check(floor + 1) and w.check(floor + 100_000)
    assert w.accept(floor + 10)  # a jump ahead: floor..floor+9 stay acceptable
    assert w.accept(floor) and w.accept(floor + 3) and not w.accept(floor + 3)
    assert not w.accept(floor - 1)
    below = [c for c in range(max(floor - 9000, 0), floor) if w.check(c)]
    assert below == []


def test_floor_window_edges() -> None:
    fresh = floor_window(0)
    assert fresh.accept(0) and not fresh.accept(0)
    closed = floor_window(REJECT_AFTER_MESSAGES)
    assert not closed.check(REJECT_AFTER_MESSAGES - 1) and not closed.check(2**63)


def _pair() -> tuple[Keypair, Keypair]:
    """Theirs and ours: one session seen from both ends (keys swapped)."""
    theirs = Keypair(K1, K2, 0x11, 0x22, True, 100.0)
    ours = Keypair(K2, K1, 0x22, 0x11, False, 100.0)
    return theirs, ours


def _seal(kp: Keypair, payload: bytes) -> tuple[bytearray, int]:
    plain = bytearray(payload + bytes(64))
    out = bytearray(TRANSPORT_HEADER_SIZE + len(plain) + TAG_LEN)
    n = seal_into(kp, memoryview(plain), len(payload), DEFAULT_MTU, memoryview(out))
    assert n > 0
    return out, n


def _open(kp: Keypair, msg: bytearray, n: int) -> int:
    out = bytearray(n)
    return open_into(kp, memoryview(msg), n, memoryview(out))


def test_keypair_record_captures_the_session() -> None:
    _, ours = _pair()
    rec = keypair_record(ours, 4096, 77)
    assert (rec.local_index, rec.remote_index, rec.is_initiator, rec.created) == (
        0x22,
        0x11,
        False,
        100.0,
    )
    assert (rec.send_reserved, rec.recv_floor) == (4096, 77)
    assert not hasattr(rec, "send_key") and not hasattr(rec, "recv_key")  # shm/secrets.py


def test_restored_keypair_resumes_nonces_and_replay_floor() -> None:
    theirs, ours = _pair()
    before = [_seal(theirs, f"pkt{i}".encode()) for i in range(6)]  # counters 0..5
    for msg, n in before[:4]:
        assert _open(ours, msg, n) > 0  # the dead worker accepted 0..3
    restored = restore_keypair(keypair_record(ours, send_reserved=4096, recv_floor=4), K2, K1)
    assert restored.send_counter == 4096
    assert restored.send_reserved == 4096  # the first send publishes a fresh block
    assert restored.replay.highest + 1 == 4  # what a republish reads back as the floor
    replayed = -1 - DropReason.REPLAYED
    for msg, n in before[:4]:
        assert _open(restored, msg, n) == replayed  # below the floor: rejected
    for msg, n in before[4:]:
        assert _open(restored, msg, n) > 0  # the floor itself and above: accepted
    assert _open(restored, *before[5]) == replayed
    sealed = memoryview(bytearray(128))
    refused = seal_into(restored, memoryview(bytearray(64)), 8, 1420, sealed)
    assert refused == -1 - DropReason.NOT_PUBLISHED  # nothing to publish a block with
    assert restored.send_counter == 4096 and restored.send_reserved == 4096
    published: list[int] = []

    def publish(kp: Keypair) -> bool:
        published.append(kp.send_reserved)
        return True

    restored.on_reserve = publish
    msg, n = _seal(restored, b"from the replacement")
    assert published == [4096 + RESERVATION_BLOCK]  # written before the nonce was used
    assert struct.unpack_from("<Q", msg, 8)[0] == 4096  # first nonce past the reservation
    out = bytearray(n)
    size = open_into(theirs, memoryview(msg), n, memoryview(out))
    assert size > 0 and bytes(out[:20]) == b"from the replacement"


def test_restored_keypair_rejects_tampering() -> None:
    theirs, ours = _pair()
    restored = restore_keypair(keypair_record(ours, 0, 0), K2, K1)
    msg, n = _seal(theirs, b"x" * 40)
    msg[20] ^= 1
    assert _open(restored, msg, n) == -1 - DropReason.DECRYPT_FAILED


def test_handed_flag_round_trips() -> None:
    rec = _full()
    rec.handed = True
    out = bytearray(PEER_RECORD_SIZE)
    encode_peer(rec, out)
    back = decode_peer(out)
    assert back is not None and back.handed and back.current is not None
    rec.handed = False
    encode_peer(rec, out)
    back = decode_peer(out)
    assert back is not None and not back.handed
