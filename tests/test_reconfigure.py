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
