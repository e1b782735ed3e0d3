"""UAPI: the configuration socket `wg` talks to (wireguard.com/xplatform).

This module holds the data model shared by `protocol` (sans-IO wire format) and `server`
(the Unix socket); import the functions and the server from those modules.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType

__all__ = ["DeviceView", "PeerChange", "PeerView", "SetRequest", "UapiError"]


class PeerView(msgspec.Struct):
    """One peer as `get=1` reports it; keys are raw 32-byte values."""

    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: str | None = None  # "1.2.3.4:51820" or "[fd00::1]:51820", an IP literal
    last_handshake_sec: int = 0  # wall-clock Unix time; 0 = never
    last_handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0
    allowed_ips: list[str] = msgspec.field(default_factory=list)


class DeviceView(msgspec.Struct):
    """The device as `get=1` reports it (None / 0 mean "not set" and are left out)."""

    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerView] = msgspec.field(default_factory=list)


class PeerChange(msgspec.Struct):
    """One `public_key=` block of a set; UNSET leaves a value alone. `remove` drops the peer
    (nothing else is then set); `update_only`: do not create it if missing;
    `replace_allowed_ips`: clear its list before adding `allowed_ips_add`; preshared_key
    None (sent as zeros) removes the preshared key."""

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None | UnsetType = UNSET
    endpoint: str | UnsetType = UNSET
    persistent_keepalive: int | UnsetType = UNSET
    replace_allowed_ips: bool = False
    allowed_ips_add: list[str] = msgspec.field(default_factory=list)


class SetRequest(msgspec.Struct):
    """A whole `set=1`. Apply device fields, then replace_peers, then `peers` in order.
    private_key None (sent as zeros) removes the key. Like wireguard-go, backends ignore a
    peer whose key is the device's own public key."""

    private_key: bytes | None | UnsetType = UNSET
    listen_port: int | UnsetType = UNSET
    fwmark: int | UnsetType = UNSET
    replace_peers: bool = False
    peers: list[PeerChange] = msgspec.field(default_factory=list)


class UapiError(Exception):
    """A request `wg` must be told about; `errno` is positive, like Python's OSError."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
