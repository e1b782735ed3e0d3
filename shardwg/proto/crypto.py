"""Every cryptographic primitive WireGuard needs, behind one small module.

Bindings were chosen by measurement on the target machine (a one-off comparison, not kept):
`cryptography`'s ChaCha20Poly1305 is ~4x faster than PyNaCl's for a 1420-byte
packet, so it carries transport data; PyNaCl's raw-bytes X25519 is ~2x faster
than building `cryptography` key objects per handshake, and PyNaCl is the only
binding here with XChaCha20-Poly1305 (cookie replies).
"""

from __future__ import annotations

import hashlib
import hmac as _hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _nacl
from nacl.exceptions import CryptoError

from shardwg.proto.constants import KEY_LEN

__all__ = [
    "AEAD",
    "AuthenticationError",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "generate_private_key",
    "hash_",
    "hmac",
    "kdf1",
    "kdf2",
    "kdf3",
    "low_order",
    "mac",
    "public_key",
    "xaead_decrypt",
    "xaead_encrypt",
]

ZERO_NONCE = bytes(12)
AEAD = ChaCha20Poly1305
"""The transport AEAD class; build one object per key and reuse it for every packet."""


class AuthenticationError(Exception):
    """A ciphertext failed authentication (remote garbage, not our bug)."""


def hash_(*parts: bytes) -> bytes:
    """HASH: BLAKE2s-256 over the concatenation of `parts`."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """MAC: keyed BLAKE2s with a 16-byte digest (not HMAC)."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256."""
    return _hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = hmac(key, data)
    return hmac(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac(key, data)
    t1 = hmac(prk, b"\x01")
    t2 = hmac(prk, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac(key, data)
    t1 = hmac(prk, b"\x01")
    t2 = hmac(prk, t1 + b"\x02")
    t3 = hmac(prk, t2 + b"\x03")
    return t1, t2, t3


def nonce_for(counter: int) -> bytes:
    """Transport/handshake nonce: 4 zero bytes then the counter as u64 little-endian."""
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 with the WireGuard nonce layout (handshake use; not the hot path)."""
    return ChaCha20Poly1305(key).encrypt(nonce_for(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce_for(counter), ciphertext, ad)
    except InvalidTag as exc:
        raise AuthenticationError("aead") from exc


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 (24-byte nonce), used only for cookie replies."""
    return bytes(_nacl.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key))


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return bytes(_nacl.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key))
    except CryptoError as exc:
        raise AuthenticationError("xaead") from exc


def clamp(private: bytes) -> bytes:
    """Clamp a Curve25519 scalar the way `wg genkey` does."""
    b = bytearray(private)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def generate_private_key(random_bytes: bytes) -> bytes:
    """A clamped X25519 private key from 32 caller-supplied random bytes (sans-IO)."""
    if len(random_bytes) != KEY_LEN:
        raise ValueError("need 32 random bytes")
    return clamp(random_bytes)


def public_key(private: bytes) -> bytes:
    return bytes(_nacl.crypto_scalarmult_base(private))


def dh(private: bytes, public: bytes) -> bytes:
    """X25519. Raises AuthenticationError on an all-zero result (low-order point)."""
    try:
        shared = bytes(_nacl.crypto_scalarmult(private, public))
    except (CryptoError, RuntimeError) as exc:
        raise AuthenticationError("low-order point") from exc
    if shared == bytes(KEY_LEN):
        raise AuthenticationError("low-order point")
    return shared


_ANY_SCALAR = bytes([0x40]) + bytes(30) + bytes([0x40])


def low_order(public: bytes) -> bool:
    """True if `public` is a low-order point: X25519 with it is zero for every (clamped)
    private key, so no handshake with its owner can ever be authenticated."""
    try:
        dh(_ANY_SCALAR, public)
    except AuthenticationError:
        return True
    return False
