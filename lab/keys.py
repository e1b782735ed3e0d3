"""WireGuard keys for lab peers.

Derived with `cryptography` rather than shardwg.config.keys on purpose: the lab is the oracle the
gateway is checked against, so it does not share the gateway's code for what it checks.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey


def genkey() -> str:
    """A WireGuard private key (clamped like `wg genkey`), base64."""
    k = bytearray(secrets.token_bytes(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return base64.b64encode(bytes(k)).decode()


def pubkey(private_b64: str) -> str:
    """The base64 public key of a base64 private key, like `wg pubkey`."""
    priv = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    return base64.b64encode(priv.public_key().public_bytes_raw()).decode()


def genpsk() -> str:
    """A preshared key, like `wg genpsk`."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def keypair() -> tuple[str, str]:
    """(private, public), base64."""
    priv = genkey()
    return priv, pubkey(priv)
