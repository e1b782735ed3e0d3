"""UAPI set requests and reloaded files as configuration diffs (pure)."""

from __future__ import annotations

import pytest
from msgspec import UNSET

from shardwg.config.diff import config_from_set, diff_configs, prefixes_delta
from shardwg.config.model import Config, Endpoint, InterfaceConfig, PeerConfig
from shardwg.uapi import PeerChange, SetRequest

OWN = b"\x01" * 32
A, B, C = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32


def cfg(*peers: PeerConfig) -> Config:
    return Config(interface=InterfaceConfig(private_key=b"\x02" * 32), peers=list(peers))


def test_add_update_remove_peers() -> None:
    base = cfg(PeerConfig(public_key=A, allowed_ips=["10.0.0.2/32"]))
    req = SetRequest(peers=[
        PeerChange(public_key=B, allowed_ips_add=["10.0.0.3/32"], endpoint="192.0.2.1:51820",
                   persistent_keepalive=25),
        PeerChange(public_key=A, remove=True),
    ])  # fmt: skip
    new = config_from_set(base, req, OWN)
    assert [p.public_key for p in new.peers] == [B]
    b = new.peers[0]
    assert b.endpoint == Endpoint("192.0.2.1", 51820) and b.persistent_keepalive == 25
    d = diff_configs(base, new)
    assert [p.public_key for p in d.added] == [B] and [p.public_key for p in d.removed] == [A]
    assert not d.updated and not d.private_key_changed


def test_allowed_ip_moves_between_peers() -> None:
    base = cfg(PeerConfig(public_key=A, allowed_ips=["10.0.0.0/24", "10.0.1.0/24"]),
               PeerConfig(public_key=B, allowed_ips=["10.0.2.0/24"]))  # fmt: skip
    req = SetRequest(peers=[PeerChange(public_key=B, allowed_ips_add=["10.0.1.7/24"])])
    new = config_from_set(base, req, OWN)
    assert new.peers[0].allowed_ips == ["10.0.0.0/24"]
    assert new.peers[1].allowed_ips == ["10.0.2.0/24", "10.0.1.0/24"]
    d = diff_configs(base, new)
    assert len(d.updated) == 2
    assert prefixes_delta(base.peers[0], new.peers[0]) == ([], ["10.0.1.0/24"])


def test_replace_allowed_ips_update_only_and_own_key() -> None:
    base = cfg(PeerConfig(public_key=A, allowed_ips=["10.0.0.2/32"]))
    req = SetRequest(peers=[
        PeerChange(public_key=A, replace_allowed_ips=True, allowed_ips_add=["10.9.0.0/16"]),
        PeerChange(public_key=C, update_only=True, allowed_ips_add=["10.8.0.0/16"]),
        PeerChange(public_key=OWN, allowed_ips_add=["0.0.0.0/0"]),
    ])  # fmt: skip
    new = config_from_set(base, req, OWN)
    assert [p.public_key for p in new.peers] == [A]
    assert new.peers[0].allowed_ips == ["10.9.0.0/16"]


def test_replace_peers_psk_and_interface_fields() -> None:
    base = cfg(PeerConfig(public_key=A, preshared_key=b"\x05" * 32))
    req = SetRequest(private_key=b"\x03" * 32, listen_port=51999, fwmark=7, replace_peers=True,
                     peers=[PeerChange(public_key=B, preshared_key=None)])  # fmt: skip
    new = config_from_set(base, req, OWN)
    assert new.interface.private_key == b"\x03" * 32
    assert new.interface.listen_port == 51999 and new.interface.fwmark == 7
    assert [p.public_key for p in new.peers] == [B] and new.peers[0].preshared_key is None
    d = diff_configs(base, new)
    assert d.private_key_changed and d.listen_port_changed and d.fwmark_changed


def test_unset_fields_leave_peer_alone_and_empty_diff() -> None:
    base = cfg(PeerConfig(public_key=A, allowed_ips=["10.0.0.2/32"], persistent_keepalive=5))
    req = SetRequest(peers=[PeerChange(public_key=A, preshared_key=UNSET)])
    new = config_from_set(base, req, OWN)
    assert new == base
    assert diff_configs(base, new).empty()


def test_removing_private_key_refused() -> None:
    with pytest.raises(ValueError):
        config_from_set(cfg(), SetRequest(private_key=None), OWN)


def _host(i: int, net: int = 10) -> str:
    return f"{net}.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32"


def test_a_big_hub_change_is_applied_exactly() -> None:
    """A hub of 10,000 one-prefix peers and a site peer of 10,000 prefixes: one request adds
    to the site (repeats included), moves half the hub's and half the site's prefixes to a
    new peer, gives one back and removes a peer. Checks the result, prefix by prefix (a
    per-prefix list scan made this quadratic: config/diff.py keeps sets and maps)."""
    keys = [i.to_bytes(4, "big") * 8 for i in range(1, 10_001)]
    site, thief = b"\x51" * 32, b"\x52" * 32
    site_old = [_host(i, 172) for i in range(10_000)]
    site_new = [_host(i, 192) for i in range(5_000)]
    base = cfg(*(PeerConfig(public_key=k, allowed_ips=[_host(i)]) for i, k in enumerate(keys)),
               PeerConfig(public_key=site, allowed_ips=list(site_old)))  # fmt: skip
    req = SetRequest(peers=[
        PeerChange(public_key=site, allowed_ips_add=site_old[::-1] + site_new + site_new[:10]),
        PeerChange(public_key=thief,
                   allowed_ips_add=[_host(i) for i in range(5_000)] + site_old[:5_000]),
        PeerChange(public_key=keys[10], allowed_ips_add=[_host(10)]),  # takes its own back
        PeerChange(public_key=keys[-1], remove=True),
    ])  # fmt: skip
    new = config_from_set(base, req, OWN)
    got = {p.public_key: p.allowed_ips for p in new.peers}
    assert list(got) == keys[:-1] + [site, thief]
    for i, k in enumerate(keys[:-1]):
        assert got[k] == ([] if i < 5_000 and i != 10 else [_host(i)]), i
    assert got[site] == site_old[5_000:] + site_new
    assert got[thief] == [_host(i) for i in range(5_000) if i != 10] + site_old[:5_000]
    d = diff_configs(base, new)
    assert [p.public_key for p in d.added] == [thief]
    assert [p.public_key for p in d.removed] == [keys[-1]]
    assert [old.public_key for old, _ in d.updated] == keys[:5_000][:10] + keys[11:5_000] + [site]
