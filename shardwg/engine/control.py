"""Control messages from the supervisor to its workers (msgpack over a SEQPACKET socketpair).

Live configuration changes travel this way: every worker gets every change, the
owner of a peer applies it to the peer's protocol state, the others to their
routing table of remote peers. Message boundaries come from SOCK_SEQPACKET.
"""

from __future__ import annotations

from typing import Any

import msgspec


class PeerSpec(msgspec.Struct, frozen=True):
    """A peer as the supervisor hands it to workers (endpoint already resolved)."""

    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: list[str] = []
    endpoint: list[Any] | None = None  # a socket address tuple as a list, or None
    persistent_keepalive: int = 0

    def endpoint_tuple(self) -> tuple[Any, ...] | None:
        return tuple(self.endpoint) if self.endpoint is not None else None


class AddPeer(msgspec.Struct, tag="add"):
    peer: PeerSpec
    slot: int = -1  # the peer's shared-memory slot (the owner publishes there)


class UpdatePeer(msgspec.Struct, tag="update"):
    """Replace a peer's allowed IPs, preshared key, keepalive and (if `endpoint_changed`)
    endpoint; its sessions always survive."""

    peer: PeerSpec
    endpoint_changed: bool = False


class RemovePeer(msgspec.Struct, tag="remove"):
    public_key: bytes


class Stop(msgspec.Struct, tag="stop"):
    pass


class Placement(msgspec.Struct, tag="placement"):
    """The supervisor rewrote the placement table: re-read it (engine/adoption.py)."""


Control = AddPeer | UpdatePeer | RemovePeer | Stop | Placement

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Control)


def encode(msg: Control) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Control:
    """Raises msgspec.DecodeError / ValidationError on garbage."""
    return _decoder.decode(data)
