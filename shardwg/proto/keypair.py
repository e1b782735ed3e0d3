"""One WireGuard session (a keypair) and the transport seal/open that uses it.

The worker's hot path calls `seal_into` and `open_into` directly with
preallocated buffers: no ciphertext or plaintext object is allocated per packet
(`cryptography` >= 45 encrypts and decrypts into caller buffers). Both
functions return a length, or a negative `-1 - DropReason` code, and never raise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag

from shardwg.proto.constants import (
    PADDING_MULTIPLE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    TAG_LEN,
    TRANSPORT_HEADER_SIZE,
    DropReason,
)
from shardwg.proto.crypto import AEAD
from shardwg.proto.replay import ReplayWindow

NO_RESERVATION = 1 << 64
RESERVATION_BLOCK = 4096  # send counters published ahead of use (one shm write per block)
_HEADER = struct.Struct("<IIQ")
_COUNTER = struct.Struct("<Q")
_TRANSPORT = 4
_DROP_DECRYPT = -1 - DropReason.DECRYPT_FAILED
_DROP_REPLAYED = -1 - DropReason.REPLAYED
_DROP_EXPIRED = -1 - DropReason.KEY_EXPIRED
_DROP_TOO_BIG = -1 - DropReason.BAD_SIZE


class Keypair:
    """Keys, indices, counters and replay state of one session.

    `send_counter` is the next nonce to use. `created` is the monotonic time the
    session was derived. A worker that restarts rebuilds a Keypair from shared
    memory with `send_counter` set past the published high-water mark.
    """

    __slots__ = (
        "send_key",
        "recv_key",
        "send_aead",
        "recv_aead",
        "local_index",
        "remote_index",
        "is_initiator",
        "created",
        "send_counter",
        "replay",
        "nonce",
        "recv_nonce",
        "peer",
        "send_reserved",
        "recv_floor",
        "on_reserve",
    )

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        local_index: int,
        remote_index: int,
        is_initiator: bool,
        created: float,
    ) -> None:
        self.send_key = send_key
        self.recv_key = recv_key
        self.send_aead = AEAD(send_key)
        self.recv_aead = AEAD(recv_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.is_initiator = is_initiator
        self.created = created
        self.send_counter = 0
        self.replay = ReplayWindow()
        # Per-keypair scratch nonce: 4 zero bytes then the counter, rewritten in place.
        self.nonce = bytearray(12)
        self.recv_nonce = bytearray(12)
        # The Peer this session belongs to (typed loosely to keep keypair free of peer imports).
        self.peer: Any = None
        # Crash safety (see shm/peerslot). Send: counters are reserved in blocks, each
        # published before its first use, so a replacement starts past every nonce
        # used (the peer accepts the jump). Receive: `recv_floor` is a one-word view
        # into shared memory raised to counter + 1 before each packet is accepted, so
        # a replacement rejects exactly what was accepted (a block here would make it
        # drop up to a block of fresh packets and stall a backed-off TCP sender).
        # Without a publisher both stay inert at the cost of one compare.
        self.send_reserved = NO_RESERVATION
        self.recv_floor: memoryview | None = None
        self.on_reserve: Callable[[Keypair], None] | None = None

    def expired(self, now: float) -> bool:
        """True once the session may neither send nor receive."""
        return now - self.created >= REJECT_AFTER_TIME or self.send_counter >= REJECT_AFTER_MESSAGES

    def __repr__(self) -> str:  # never print keys
        return (
            f"Keypair(local={self.local_index:#010x}, remote={self.remote_index:#010x}, "
            f"initiator={self.is_initiator}, counter={self.send_counter})"
        )


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after zero padding to 16 bytes, never beyond the MTU."""
    if length == 0:
        return 0
    padded = (length + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)
    if padded > mtu:
        padded = length if length > mtu else mtu
    return padded


def seal_into(
    kp: Keypair, plain: memoryview, length: int, mtu: int, out: memoryview
) -> int:
    """Encrypt `plain[:length]` into `out` as a transport message; return its size.

    `plain` must have room for the padding after `length` (the padding bytes are
    zeroed in place). `out` must hold header + padded + tag. Returns
    `-1 - DropReason` if the keypair may not send any more.
    """
    counter = kp.send_counter
    if counter >= REJECT_AFTER_MESSAGES:
        return _DROP_EXPIRED
    kp.send_counter = counter + 1
    if counter >= kp.send_reserved:
        _reserve_send(kp, counter)
    padded = padded_length(length, mtu)
    if padded > length:
        plain[length:padded] = bytes(padded - length)
    total = TRANSPORT_HEADER_SIZE + padded + TAG_LEN
    if total > len(out):
        return _DROP_TOO_BIG
    _HEADER.pack_into(out, 0, _TRANSPORT, kp.remote_index, counter)
    nonce = kp.nonce
    _COUNTER.pack_into(nonce, 4, counter)
    kp.send_aead.encrypt_into(nonce, plain[:padded], None, out[TRANSPORT_HEADER_SIZE:total])
    return total


def open_into(kp: Keypair, msg: memoryview, length: int, out: memoryview) -> int:
    """Authenticate and decrypt a transport message of `length` bytes into `out`.

    Returns the padded plaintext length (0 for a keepalive) or `-1 - DropReason`.
    The replay window is consulted before decrypting and updated only after the
    packet authenticated, so forged counters cannot poison it.
    """
    counter = _COUNTER.unpack_from(msg, 8)[0]
    replay = kp.replay
    if not replay.check(counter):
        return _DROP_REPLAYED
    plain_len = length - TRANSPORT_HEADER_SIZE - TAG_LEN
    nonce = kp.recv_nonce
    _COUNTER.pack_into(nonce, 4, counter)
    try:
        kp.recv_aead.decrypt_into(
            nonce, msg[TRANSPORT_HEADER_SIZE:length], None, out[:plain_len]
        )
    except InvalidTag:
        return _DROP_DECRYPT
    floor = kp.recv_floor
    if floor is not None and counter >= floor[0]:
        floor[0] = counter + 1
    if not replay.accept(counter):
        return _DROP_REPLAYED
    return plain_len


def _reserve_send(kp: Keypair, counter: int) -> None:
    """Publish the next block of send counters before using the first of them."""
    kp.send_reserved = counter + RESERVATION_BLOCK
    if kp.on_reserve is not None:
        kp.on_reserve(kp)
