"""Control messages from the supervisor to its workers (msgpack frames over a stream pair).

Live configuration changes travel this way: every worker gets every change, the
owner of a peer applies it to the peer's protocol state, the others to their
routing table of remote peers. One change is one `Batch` per worker, whatever its
size. Frames are a 4-byte little-endian length and the message, on a SOCK_STREAM
socketpair: a message of any size arrives whole (a SEQPACKET datagram had to fit the
socket buffer and the worker's read). engine/control_link.py queues them on the
supervisor's side without ever blocking; `FrameReader` reassembles them in the worker.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from shardwg.config.model import PeerConfig


class PeerSpec(msgspec.Struct, frozen=True):
    """A peer as the supervisor hands it to workers (endpoint already resolved)."""

    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: list[str] = []
    endpoint: list[Any] | None = None  # a socket address tuple as a list, or None
    persistent_keepalive: int = 0

    def endpoint_tuple(self) -> tuple[Any, ...] | None:
        return tuple(self.endpoint) if self.endpoint is not None else None


def peer_spec(p: PeerConfig, endpoint: tuple[Any, ...] | None) -> PeerSpec:
    """A configured peer as workers get it; `endpoint` is its address as the caller resolved
    it (live configuration refuses a change that does not resolve, a booting worker waits)."""
    return PeerSpec(
        public_key=p.public_key,
        preshared_key=p.preshared_key,
        allowed_ips=list(p.allowed_ips),
        endpoint=list(endpoint) if endpoint is not None else None,
        persistent_keepalive=p.persistent_keepalive,
    )


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


class Batch(msgspec.Struct, tag="batch"):
    """One configuration change as a whole: removals first, then additions, then updates."""

    removed: list[bytes] = []
    added: list[AddPeer] = []
    updated: list[UpdatePeer] = []


Control = AddPeer | UpdatePeer | RemovePeer | Stop | Placement | Batch

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Control)


def encode(msg: Control) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Control:
    """Raises msgspec.DecodeError / ValidationError on garbage."""
    return _decoder.decode(data)


_LEN = struct.Struct("<I")
MAX_FRAME = 256 << 20  # far above any configuration (65,536 peers x 256 allowed IPs)


def frame_bytes(data: bytes) -> bytes:
    """An encoded message as one frame of the control stream."""
    return _LEN.pack(len(data)) + data


def frame(msg: Control) -> bytes:
    return frame_bytes(_encoder.encode(msg))


class FrameError(ValueError):
    """The stream is not a sequence of frames (a length beyond MAX_FRAME)."""


class FrameReader:
    """Reassembles frames from a byte stream read in pieces of any size."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add what was read; return the payloads completed by it, in order."""
        buf = self._buf
        buf += data
        out = []
        while len(buf) >= 4:
            n = _LEN.unpack_from(buf)[0]
            if n > MAX_FRAME:
                raise FrameError(f"control frame of {n} bytes")
            if len(buf) < 4 + n:
                break
            out.append(bytes(buf[4 : 4 + n]))
            del buf[: 4 + n]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
