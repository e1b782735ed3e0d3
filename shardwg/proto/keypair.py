"""One WireGuard session (a keypair) and the transport seal/open that uses it.

The worker's hot path calls `seal_into` directly (and opens in batches through
shardwg/datapath, on the same replay window) with preallocated buffers: no
ciphertext or plaintext object is allocated per packet (`cryptography` >= 47
encrypts and decrypts into caller buffers; 46 and older have no `encrypt_into`,
so `aead_self_test` runs before a gateway starts and refuses them). Both
functions return a length, or a negative `-1 - DropReason` code, and never raise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
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
_DROP_NOT_PUBLISHED = -1 - DropReason.NOT_PUBLISHED


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
        "sealer",
        "blocks",
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
        self.on_reserve: Callable[[Keypair], bool] | None = None
        # The batch kernel's key object (shardwg.datapath), made by the worker at the
        # session's first batch send and kept with it: no cipher set-up per packet.
        self.sealer: Any = None
        # Spread peers (proto/spread.py): this worker's counter blocks, or None when one
        # worker owns the peer and counts sequentially.
        self.blocks: Any = None

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
    if counter >= kp.send_reserved:
        if reserve_send(kp, counter) <= counter:
            return _DROP_NOT_PUBLISHED
        counter = kp.send_counter  # a spread peer's next block may start further on
        if counter >= REJECT_AFTER_MESSAGES:
            return _DROP_EXPIRED
    kp.send_counter = counter + 1
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


def reserve_send(kp: Keypair, counter: int) -> int:
    """Publish a reservation of the send counters from `counter` to `counter` +
    RESERVATION_BLOCK (excluded) and return the new limit, or, when it could not be
    published, the old limit (<= counter): nothing at or past it may then be sent.

    Fails closed: `send_reserved` holds the new limit only while `on_reserve` writes it
    and keeps it only if that succeeded (returned True), so no counter is ever used that
    a replacement worker would not skip. The one place that moves the limit; a batch
    sealer reserves for the last counter of its batch (RESERVATION_BLOCK >= a batch).
    """
    old = kp.send_reserved
    if kp.blocks is not None:
        # A spread peer (proto/spread.py): the next block of this worker's class, published
        # in the spread ledger (shared memory) before use; send_counter moves to its start.
        # The owner's slot copy is a courtesy (its restore goes through the ledger too).
        limit: int = kp.blocks.reserve(kp)
        if kp.on_reserve is not None:
            try:
                kp.on_reserve(kp)
            except Exception:
                pass
        return limit
    publish = kp.on_reserve
    if publish is None:
        return old
    kp.send_reserved = counter + RESERVATION_BLOCK  # what the publisher writes
    try:
        ok = publish(kp)
    except Exception:  # the publisher returns False on failure; be safe if it raises
        ok = False
    if not ok:
        kp.send_reserved = old
    return kp.send_reserved


class AeadSelfTestError(Exception):
    """The transport AEAD does not seal or open a known message correctly."""


@dataclass(frozen=True)
class _Vector:
    key: bytes
    remote_index: int
    counter: int
    plain: bytes
    datagram: bytes  # the whole transport message (tests recompute it with libsodium)


SELF_TEST = _Vector(
    key=bytes(range(32)),
    remote_index=0x11223344,
    counter=0x0102030405,
    plain=b"shardwg AEAD self-test",
    datagram=bytes.fromhex(
        "0400000044332211050403020100000042eb6ba2b7bcd4ec92584d6dec71c22a"
        "c0ff8a2294eb0aa6cd4cd25aa27c1aa5edb1eb2bb886b7228ad2b392fd720bbc"
    ),
)


def aead_self_test() -> None:
    """Seal and open SELF_TEST through `seal_into`/`open_into`, as the data path does, and
    refuse a tampered copy; raises AeadSelfTestError (with the floor) on any difference."""
    v = SELF_TEST
    need = "the data path needs cryptography >= 47 (ChaCha20Poly1305.encrypt_into/decrypt_into)"
    try:
        kp = Keypair(v.key, v.key, 1, v.remote_index, True, 0.0)
        kp.send_counter = v.counter
        plain = memoryview(bytearray(64))
        plain[: len(v.plain)] = v.plain
        out = memoryview(bytearray(128))
        n = seal_into(kp, plain, len(v.plain), 1420, out)
        if bytes(out[: max(n, 0)]) != v.datagram:
            raise AeadSelfTestError(f"sealing a known message gave a wrong datagram; {need}")
        back = memoryview(bytearray(64))
        got = open_into(kp, memoryview(v.datagram), len(v.datagram), back)
        if got < len(v.plain) or bytes(back[: len(v.plain)]) != v.plain:
            raise AeadSelfTestError(f"opening a known message failed ({got}); {need}")
        forged = bytearray(v.datagram)
        forged[-1] ^= 1
        forged[8:16] = (v.counter + 1).to_bytes(8, "little")
        if open_into(kp, memoryview(forged), len(forged), back) != _DROP_DECRYPT:
            raise AeadSelfTestError(f"a forged message was not refused; {need}")
    except AeadSelfTestError:
        raise
    except Exception as exc:  # e.g. AttributeError: no encrypt_into on cryptography <= 46
        raise AeadSelfTestError(f"{type(exc).__name__}: {exc}; {need}") from exc
