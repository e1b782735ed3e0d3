"""wg-quick style config text, written once for both wireguard-go peers and shardwg gateways.

Peers are plain dicts (public_key, preshared_key, allowed_ips, endpoint, persistent_keepalive;
spread for shardwg only)
so callers can build them inline; missing or falsy fields are left out, as wg itself would.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

REDACTED = "(redacted)"
_SECRET_LINE = re.compile(r"^(\s*(?:PrivateKey|PresharedKey)\s*=\s*)\S.*$", re.M | re.I)


def peer_section(p: dict[str, Any]) -> str:
    """One [Peer] section."""
    lines = ["[Peer]", f"PublicKey = {p['public_key']}"]
    if p.get("preshared_key"):
        lines.append(f"PresharedKey = {p['preshared_key']}")
    if p.get("allowed_ips"):
        lines.append(f"AllowedIPs = {', '.join(p['allowed_ips'])}")
    if p.get("endpoint"):
        lines.append(f"Endpoint = {p['endpoint']}")
    if p.get("persistent_keepalive"):
        lines.append(f"PersistentKeepalive = {int(p['persistent_keepalive'])}")
    if p.get("spread"):  # shardwg's own key (wireguard-go would refuse it)
        lines.append(f"Spread = {p['spread']}")
    return "\n".join(lines)


def interface_section(
    private_key: str,
    listen_port: int | None,
    addresses: list[str] | None = None,
    mtu: int | None = None,
    extra: str = "",
) -> str:
    """One [Interface] section; Address and MTU are wg-quick keys that `wg setconf` rejects."""
    lines = ["[Interface]", f"PrivateKey = {private_key}"]
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    if addresses:
        lines.append(f"Address = {', '.join(addresses)}")
    if mtu is not None:
        lines.append(f"MTU = {mtu}")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def config_text(interface: str, peers: list[dict[str, Any]]) -> str:
    """A whole config: the interface section, then the peers, blank lines between."""
    return "\n\n".join([interface, *(peer_section(p) for p in peers)]) + "\n"


def redact(text: str) -> str:
    """The config with private and preshared keys replaced, safe to print or log."""
    return _SECRET_LINE.sub(lambda m: m.group(1) + REDACTED, text)


def write_secret(path: str | os.PathLike[str], text: str) -> Path:
    """Write a file that holds keys: mode 0600 from creation, never world-readable for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(path)
