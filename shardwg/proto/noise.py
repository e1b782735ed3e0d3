"""Noise IKpsk2 handshake (both roles) and WireGuard's framing of it.

The first half is a generic Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s core with the
prologue and payloads as parameters, so it can be checked against the published
Noise test vectors; WireGuard is that core with prologue = IDENTIFIER, the
initiation payload = a TAI64N timestamp and an empty response payload.
All handshake AEADs use nonce 0: every key is used exactly once.

Reading an initiation is split in two (`read_initiation_static`, then
`read_initiation_payload`) because the responder must look the initiator up by
its decrypted static key before it can mix in the static-static DH.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shardwg.proto import crypto
from shardwg.proto.constants import (
    CONSTRUCTION,
    IDENTIFIER,
    INITIATION_SIZE,
    KEY_LEN,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_LEN,
    RESPONSE_SIZE,
    TIMESTAMP_LEN,
    DropReason,
    MessageType,
)
from shardwg.proto.messages import INITIATION, RESPONSE

ZERO_KEY = bytes(KEY_LEN)
_ZERO_MAC = bytes(MAC_LEN)


class HandshakeError(Exception):
    """A handshake message was rejected; `reason` is what the caller counts."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.name}: {detail}" if detail else reason.name)
        self.reason = reason


# --------------------------------------------------------------------------- generic core


@dataclass(slots=True)
class SymmetricState:
    """Noise's (ck, h) pair. The cipher key is returned by the mix calls, not stored."""

    chaining_key: bytes
    hash: bytes

    @classmethod
    def initialize(cls, protocol_name: bytes, prologue: bytes) -> SymmetricState:
        if len(protocol_name) <= 32:
            h = protocol_name.ljust(32, b"\x00")
        else:
            h = crypto.hash_(protocol_name)
        return cls(h, crypto.hash_(h, prologue))

    def mix_hash(self, data: bytes) -> None:
        self.hash = crypto.hash_(self.hash, data)

    def mix_key(self, ikm: bytes) -> bytes:
        self.chaining_key, key = crypto.kdf2(self.chaining_key, ikm)
        return key

    def mix_dh(self, private: bytes, public: bytes) -> bytes:
        """mix_key(DH(private, public)); a low-order point is a decrypt-class failure."""
        try:
            shared = crypto.dh(private, public)
        except crypto.AuthenticationError as exc:
            raise HandshakeError(DropReason.HANDSHAKE_DECRYPT, "low-order point") from exc
        return self.mix_key(shared)

    def mix_key_and_hash(self, psk: bytes) -> bytes:
        self.chaining_key, tau, key = crypto.kdf3(self.chaining_key, psk)
        self.mix_hash(tau)
        return key

    def encrypt_and_hash(self, key: bytes, plaintext: bytes) -> bytes:
        ct = crypto.aead_encrypt(key, 0, plaintext, self.hash)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, key: bytes, ciphertext: bytes) -> bytes:
        try:
            pt = crypto.aead_decrypt(key, 0, ciphertext, self.hash)
        except crypto.AuthenticationError as exc:
            raise HandshakeError(DropReason.HANDSHAKE_DECRYPT, "aead") from exc
        self.mix_hash(ciphertext)
        return pt

    def mix_ephemeral(self, ephemeral_public: bytes) -> None:
        """The `e` token in a PSK handshake: hashed and also mixed into the chaining key."""
        self.mix_hash(ephemeral_public)
        self.chaining_key = crypto.kdf1(self.chaining_key, ephemeral_public)

    def split(self) -> tuple[bytes, bytes]:
        """(initiator->responder key, responder->initiator key)."""
        return crypto.kdf2(self.chaining_key, b"")


def ik_initial(
    prologue: bytes, responder_static: bytes, protocol_name: bytes = CONSTRUCTION
) -> SymmetricState:
    """State both sides start from: the responder's static key is a pre-message."""
    st = SymmetricState.initialize(protocol_name, prologue)
    st.mix_hash(responder_static)
    return st


def write_initiation(
    st: SymmetricState,
    ephemeral_private: bytes,
    local_static_public: bytes,
    remote_static: bytes,
    static_static: bytes,
    payload: bytes,
) -> tuple[bytes, bytes, bytes]:
    """Tokens e, es, s, ss + payload. Returns (ephemeral_public, enc_static, enc_payload)."""
    e_pub = crypto.public_key(ephemeral_private)
    st.mix_ephemeral(e_pub)
    key = st.mix_dh(ephemeral_private, remote_static)
    enc_static = st.encrypt_and_hash(key, local_static_public)
    key = st.mix_key(static_static)
    return e_pub, enc_static, st.encrypt_and_hash(key, payload)


def read_initiation_static(
    st: SymmetricState, local_private: bytes, ephemeral: bytes, enc_static: bytes
) -> bytes:
    """Tokens e, es, s on the responder: returns the initiator's static public key."""
    st.mix_ephemeral(ephemeral)
    key = st.mix_dh(local_private, ephemeral)
    return st.decrypt_and_hash(key, enc_static)


def read_initiation_payload(st: SymmetricState, static_static: bytes, enc_payload: bytes) -> bytes:
    """Token ss + payload on the responder, once the initiator is known."""
    key = st.mix_key(static_static)
    return st.decrypt_and_hash(key, enc_payload)


def write_response(
    st: SymmetricState,
    ephemeral_private: bytes,
    remote_ephemeral: bytes,
    remote_static: bytes,
    psk: bytes,
    payload: bytes,
) -> tuple[bytes, bytes]:
    """Tokens e, ee, se, psk + payload. Returns (ephemeral_public, enc_payload)."""
    e_pub = crypto.public_key(ephemeral_private)
    st.mix_ephemeral(e_pub)
    st.mix_dh(ephemeral_private, remote_ephemeral)
    st.mix_dh(ephemeral_private, remote_static)
    key = st.mix_key_and_hash(psk)
    return e_pub, st.encrypt_and_hash(key, payload)


def read_response(
    st: SymmetricState,
    ephemeral_private: bytes,
    local_private: bytes,
    remote_ephemeral: bytes,
    psk: bytes,
    enc_payload: bytes,
) -> bytes:
    """Tokens e, ee, se, psk + payload on the initiator."""
    st.mix_ephemeral(remote_ephemeral)
    st.mix_dh(ephemeral_private, remote_ephemeral)
    st.mix_dh(local_private, remote_ephemeral)
    key = st.mix_key_and_hash(psk)
    return st.decrypt_and_hash(key, enc_payload)


# --------------------------------------------------------------------------- WireGuard


@dataclass(slots=True)
class LocalIdentity:
    """Our static key pair and the MAC/cookie keys derived from it (computed once)."""

    private: bytes
    public: bytes
    mac1_key: bytes  # checks mac1 of messages sent to us
    cookie_key: bytes  # encrypts cookie replies we send

    @classmethod
    def from_private(cls, private: bytes) -> LocalIdentity:
        if len(private) != KEY_LEN:
            raise ValueError("private key must be 32 bytes")
        public = crypto.public_key(private)
        return cls(
            private, public, crypto.hash_(LABEL_MAC1, public), crypto.hash_(LABEL_COOKIE, public)
        )


@dataclass(slots=True)
class PeerCrypto:
    """Per-peer handshake constants, precomputed when the peer is configured."""

    remote_static: bytes
    preshared: bytes
    static_static: bytes  # DH(S_local, S_remote)
    mac1_key: bytes  # mac1 on messages we send to this peer
    cookie_key: bytes  # decrypts cookie replies from this peer

    @property
    def usable(self) -> bool:
        """False for a low-order public key: no handshake can be authenticated with it."""
        return self.static_static != ZERO_KEY

    @classmethod
    def build(
        cls, local: LocalIdentity, remote_static: bytes, preshared: bytes | None
    ) -> PeerCrypto:
        if len(remote_static) != KEY_LEN:
            raise HandshakeError(DropReason.UNKNOWN_PEER, "public key must be 32 bytes")
        psk = ZERO_KEY if preshared is None else preshared
        if len(psk) != KEY_LEN:
            raise ValueError("preshared key must be 32 bytes")
        try:
            ss = crypto.dh(local.private, remote_static)
        except crypto.AuthenticationError:
            # A low-order point: accepted like wireguard-go and the kernel do, but `usable`
            # stays False, so no initiation is sent to or accepted from it (anyone can
            # compute a zero shared secret).
            ss = ZERO_KEY
        return cls(
            remote_static,
            psk,
            ss,
            crypto.hash_(LABEL_MAC1, remote_static),
            crypto.hash_(LABEL_COOKIE, remote_static),
        )


@dataclass(slots=True)
class InitiationState:
    """What an initiator keeps between sending an initiation and reading the response."""

    local_index: int
    ephemeral_private: bytes
    chaining_key: bytes
    hash: bytes


@dataclass(slots=True)
class SessionKeys:
    send_key: bytes
    recv_key: bytes
    local_index: int
    remote_index: int
    is_initiator: bool


@dataclass(slots=True)
class ReceivedInitiation:
    """An authenticated initiation; the peer state decides on timestamp freshness."""

    peer: PeerCrypto
    remote_index: int
    remote_ephemeral: bytes
    timestamp: bytes
    chaining_key: bytes
    hash: bytes


def create_initiation(
    local: LocalIdentity,
    peer: PeerCrypto,
    local_index: int,
    ephemeral_private: bytes,
    timestamp: bytes,
) -> tuple[bytearray, InitiationState]:
    """A 148-byte initiation with mac1/mac2 zero (the CookieGenerator fills them)."""
    if not peer.usable:
        raise HandshakeError(DropReason.UNKNOWN_PEER, "low-order public key")
    if len(timestamp) != TIMESTAMP_LEN:
        raise ValueError("timestamp must be 12 bytes")
    st = ik_initial(IDENTIFIER, peer.remote_static)
    e_pub, enc_static, enc_ts = write_initiation(
        st, ephemeral_private, local.public, peer.remote_static, peer.static_static, timestamp
    )
    msg = INITIATION.pack(
        MessageType.INITIATION, local_index, e_pub, enc_static, enc_ts, _ZERO_MAC, _ZERO_MAC
    )
    return bytearray(msg), InitiationState(local_index, ephemeral_private, st.chaining_key, st.hash)


def consume_initiation(
    local: LocalIdentity, msg: bytes, find_peer: Callable[[bytes], PeerCrypto | None]
) -> ReceivedInitiation:
    """Authenticate an initiation (mac1 already checked) and identify its sender."""
    if len(msg) != INITIATION_SIZE:
        raise HandshakeError(DropReason.BAD_SIZE, "initiation size")
    _t, sender, e_pub, enc_static, enc_ts, _m1, _m2 = INITIATION.unpack(msg)
    st = ik_initial(IDENTIFIER, local.public)
    remote_static = read_initiation_static(st, local.private, e_pub, enc_static)
    peer = find_peer(remote_static)
    if peer is None or not peer.usable:
        raise HandshakeError(DropReason.UNKNOWN_PEER)
    ts = read_initiation_payload(st, peer.static_static, enc_ts)
    return ReceivedInitiation(peer, sender, e_pub, ts, st.chaining_key, st.hash)


def create_response(
    local: LocalIdentity,
    received: ReceivedInitiation,
    local_index: int,
    ephemeral_private: bytes,
) -> tuple[bytearray, SessionKeys]:
    """A 92-byte response with mac1/mac2 zero, and the responder's session keys."""
    st = SymmetricState(received.chaining_key, received.hash)
    peer = received.peer
    e_pub, enc_empty = write_response(
        st, ephemeral_private, received.remote_ephemeral, peer.remote_static, peer.preshared, b""
    )
    msg = RESPONSE.pack(
        MessageType.RESPONSE,
        local_index,
        received.remote_index,
        e_pub,
        enc_empty,
        _ZERO_MAC,
        _ZERO_MAC,
    )
    recv_key, send_key = st.split()
    return bytearray(msg), SessionKeys(
        send_key, recv_key, local_index, received.remote_index, is_initiator=False
    )


def consume_response(
    local: LocalIdentity, peer: PeerCrypto, state: InitiationState, msg: bytes
) -> SessionKeys:
    """Finish the handshake as initiator (index matched and mac1 checked by the caller)."""
    if len(msg) != RESPONSE_SIZE:
        raise HandshakeError(DropReason.BAD_SIZE, "response size")
    _t, sender, receiver, e_pub, enc_empty, _m1, _m2 = RESPONSE.unpack(msg)
    if receiver != state.local_index:
        raise HandshakeError(DropReason.UNKNOWN_INDEX, "response to another initiation")
    st = SymmetricState(state.chaining_key, state.hash)
    read_response(st, state.ephemeral_private, local.private, e_pub, peer.preshared, enc_empty)
    send_key, recv_key = st.split()
    return SessionKeys(send_key, recv_key, state.local_index, sender, is_initiator=True)
