"""Which worker owns a peer: a documented, stable function of its public key.

owner = first 8 bytes of BLAKE2s-256(public key), read little-endian, modulo
the number of workers. Stable across restarts and machines, uniform for random
keys, and computable by any tool that knows the key and the worker count.
"""

from __future__ import annotations

import hashlib
from typing import Any


def owner_of(public_key: bytes, workers: int) -> int:
    if workers <= 0:
        raise ValueError("workers must be positive")
    digest = hashlib.blake2s(public_key).digest()
    return int.from_bytes(digest[:8], "little") % workers


class RemotePeer:
    """A peer owned by another worker: in our routing table only to hand its packets over."""

    __slots__ = ("public_key", "owner", "follower")

    def __init__(self, public_key: bytes, owner: int) -> None:
        self.public_key = public_key
        self.owner = owner
        # A spread peer (shm/follower.py): we seal its packets ourselves while `follower`
        # has a session; None: hand them all to the owner.
        self.follower: Any = None

    def __repr__(self) -> str:
        return f"RemotePeer({self.public_key[:4].hex()}…, owner={self.owner})"
