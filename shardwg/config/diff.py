"""Live reconfiguration as data: a UAPI set or a reloaded file becomes a new Config,
and two Configs become the list of changes the supervisor applies.

Pure functions (no processes, no sockets), so `wg set`, `wg syncconf` and SIGHUP
share one tested path: compute the new configuration, diff it, apply the diff.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import msgspec
from msgspec import UNSET

from shardwg.config.model import Config, Endpoint, PeerConfig
from shardwg.uapi import SetRequest


def _endpoint(text: str) -> Endpoint:
    """UAPI endpoints are IP literals: `1.2.3.4:51820` or `[fd00::1]:51820`."""
    host, _, port = text.rpartition(":")
    return Endpoint(host=host.strip("[]"), port=int(port))


def config_from_set(cfg: Config, req: SetRequest, own_public: bytes) -> Config:
    """Apply a UAPI set request to a configuration (wireguard-go's order and rules).

    Costs what the request changes, not request x configured peers (`wg syncconf` sends
    every peer, and a site peer may hold thousands of prefixes): peers are found by key, each
    allowed IP's holder in a map, a peer's own prefixes in a set.
    Raises ValueError for what cannot be applied (a bad endpoint, removing the key).
    """
    iface = cfg.interface
    if req.private_key is not UNSET:
        if req.private_key is None:
            raise ValueError("removing the private key is not supported")
        iface = msgspec.structs.replace(iface, private_key=req.private_key)
    if req.listen_port is not UNSET:
        iface = msgspec.structs.replace(iface, listen_port=req.listen_port or None)
    if req.fwmark is not UNSET:
        iface = msgspec.structs.replace(iface, fwmark=req.fwmark)
    peers: dict[bytes, PeerConfig] = {}
    if not req.replace_peers:
        peers = {p.public_key: p for p in cfg.peers}
    # The UAPI cannot say Spread (shardwg's own key): a peer `wg syncconf` re-adds keeps it.
    spread = {p.public_key: (p.spread, p.spread_packets) for p in cfg.peers if p.spread is not None}
    holder: dict[str, bytes] = {a: p.public_key for p in peers.values() for a in p.allowed_ips}
    # Prefixes taken from a peer by a later one, struck from its list once: when the request
    # changes that peer next, or at the end (not one list scan per prefix moved).
    taken: dict[bytes, set[str]] = {}
    for change in req.peers:
        key = change.public_key
        if key == own_public:
            continue  # wireguard-go ignores a peer with the device's own key
        p = peers.get(key)
        gone = taken.pop(key, ())
        if change.remove:
            if p is not None:
                del peers[key]
                _release(holder, p)
            continue
        if p is None:
            if change.update_only:
                continue
            setting, packets = spread.get(key, (None, False))
            p = PeerConfig(public_key=key, spread=setting, spread_packets=packets)
        if change.preshared_key is not UNSET:
            p = msgspec.structs.replace(p, preshared_key=change.preshared_key)
        if change.endpoint is not UNSET:
            p = msgspec.structs.replace(p, endpoint=_endpoint(change.endpoint))
        if change.persistent_keepalive is not UNSET:
            p = msgspec.structs.replace(p, persistent_keepalive=change.persistent_keepalive)
        if change.replace_allowed_ips:
            _release(holder, p)
            allowed: list[str] = []
        else:
            allowed = [a for a in p.allowed_ips if a not in gone]
        have = set(allowed)
        for prefix in change.allowed_ips_add:
            norm = str(ipaddress.ip_network(prefix, strict=False))
            if norm not in have:
                have.add(norm)
                allowed.append(norm)
            # An allowed IP belongs to one peer: adding it here takes it from its holder.
            was = holder.get(norm)
            if was is not None and was != key and was in peers:
                taken.setdefault(was, set()).add(norm)
            holder[norm] = key
        peers[key] = msgspec.structs.replace(p, allowed_ips=allowed)
    for key, gone in taken.items():
        if key in peers:
            other = peers[key]
            peers[key] = msgspec.structs.replace(
                other, allowed_ips=[a for a in other.allowed_ips if a not in gone]
            )
    return msgspec.structs.replace(cfg, interface=iface, peers=list(peers.values()))


def _release(holder: dict[str, bytes], p: PeerConfig) -> None:
    for a in p.allowed_ips:
        if holder.get(a) == p.public_key:
            del holder[a]


@dataclass
class ConfigDiff:
    private_key_changed: bool = False
    listen_port_changed: bool = False
    fwmark_changed: bool = False
    added: list[PeerConfig] = field(default_factory=list)
    removed: list[PeerConfig] = field(default_factory=list)
    updated: list[tuple[PeerConfig, PeerConfig]] = field(default_factory=list)  # (old, new)
    spread_changed: list[PeerConfig] = field(default_factory=list)  # placement's business only

    def empty(self) -> bool:
        return not (
            self.private_key_changed
            or self.listen_port_changed
            or self.fwmark_changed
            or self.added
            or self.removed
            or self.updated
            or self.spread_changed
        )


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    d = ConfigDiff(
        private_key_changed=old.interface.private_key != new.interface.private_key,
        listen_port_changed=(old.interface.listen_port or 0) != (new.interface.listen_port or 0),
        fwmark_changed=old.interface.fwmark != new.interface.fwmark,
    )
    before = {p.public_key: p for p in old.peers}
    after = {p.public_key: p for p in new.peers}
    d.removed = [p for k, p in before.items() if k not in after]
    d.added = [p for k, p in after.items() if k not in before]
    for k, p in after.items():
        o = before.get(k)
        if o is None or o == p:
            continue
        if (o.spread, o.spread_packets) != (p.spread, p.spread_packets):
            d.spread_changed.append(p)  # no worker message: the placement table says it
            if msgspec.structs.replace(o, spread=p.spread, spread_packets=p.spread_packets) == p:
                continue
        d.updated.append((o, p))
    return d


def prefixes_delta(old: PeerConfig | None, new: PeerConfig | None) -> tuple[list[str], list[str]]:
    """(routes to add, routes to remove) when a peer's allowed IPs change."""
    a = set(old.allowed_ips) if old else set()
    b = set(new.allowed_ips) if new else set()
    return sorted(b - a), sorted(a - b)
