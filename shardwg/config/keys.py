"""Key helpers with the exact text formats of `wg genkey`, `wg pubkey` and `wg genpsk`.

Keys travel as standard base64 of 32 bytes (44 characters ending in "="). The
functions return the bare key; `print()` it to reproduce wg's output (key plus
newline). Decoding is as strict as wg's `key_from_base64`: exact length and
non-canonical trailing bits are rejected, so a key we accept, wg accepts.
"""

from __future__ import annotations

import base64
import binascii
import os

from shardwg.proto import crypto
from shardwg.proto.constants import KEY_LEN

__all__ = [
    "KEY_B64_LEN",
    "decode_key",
    "encode_key",
    "generate_preshared_key",
    "generate_private_key",
    "public_key_from_private",
]

KEY_B64_LEN = 44


def encode_key(raw: bytes) -> str:
    """Base64 text of a 32-byte key (no newline)."""
    if len(raw) != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def decode_key(b64: str) -> bytes:
    """32 raw bytes from base64 text; surrounding whitespace (a trailing newline) is allowed."""
    text = b64.strip()
    if len(text) != KEY_B64_LEN or not text.endswith("=") or text.endswith("=="):
        raise ValueError(
            f"key is not the correct length or format: expected {KEY_B64_LEN} base64 "
            f"characters ending in one '=', got {len(text)} characters"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("key is not the correct length or format: invalid base64") from exc
    if len(raw) != KEY_LEN:
        raise ValueError(f"key is not the correct length or format: {len(raw)} bytes, not 32")
    if base64.b64encode(raw).decode("ascii") != text:
        # Same rule as wg: the unused low bits of the last character must be zero.
        raise ValueError("key is not the correct length or format: non-canonical base64")
    return raw


def generate_private_key() -> str:
    """A new clamped Curve25519 private key, like `wg genkey`."""
    return encode_key(crypto.generate_private_key(os.urandom(KEY_LEN)))


def public_key_from_private(b64: str) -> str:
    """The public key of a base64 private key, like `wg pubkey`; ValueError on bad input."""
    try:
        private = decode_key(b64)
    except ValueError as exc:
        raise ValueError(f"invalid private key: {exc}") from None
    return encode_key(crypto.public_key(private))


def generate_preshared_key() -> str:
    """A new 32-byte random preshared key, like `wg genpsk` (no clamping)."""
    return encode_key(os.urandom(KEY_LEN))
