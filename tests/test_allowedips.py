"""AllowedIPs against a naive longest-prefix model, both families, edge lengths."""

from __future__ import annotations

import random
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

import pytest

from shardwg.proto import allowedips as mod
from shardwg.proto.allowedips import AllowedIPs

Net = IPv4Network | IPv6Network


class NaiveTable:
    """The specification: scan every prefix, keep the longest that contains the address."""

    def __init__(self) -> None:
        self.routes: dict[Net, str] = {}

    def insert(self, net: Net, value: str) -> None:
        self.routes[net] = value

    def remove(self, net: Net) -> None:
        self.routes.pop(net, None)

    def remove_value(self, value: str) -> None:
        self.routes = {n: v for n, v in self.routes.items() if v != value}

    def lookup(self, addr: bytes) -> str | None:
        ip = ip_address(addr)
        best: tuple[int, str] | None = None
        for net, value in self.routes.items():
            if net.version == ip.version and ip in net:
                if best is None or net.prefixlen > best[0]:
                    best = (net.prefixlen, value)
        return best[1] if best else None

    def networks_of(self, value: str) -> set[Net]:
        return {n for n, v in self.routes.items() if v == value}


PEERS = [f"peer{i}" for i in range(6)]
V4_BASES = [0x0A000000, 0x0A0A0A00, 0xC0A80100, 0xFFFFFFFF, 0x00000000, 0x0A000001]
V6_BASES = [0xFD00 << 112, (0xFD00 << 112) | 1, 0x20010DB8 << 96, (1 << 128) - 1, 0]


def _rand_net(rng: random.Random) -> Net:
    if rng.random() < 0.5:
        plen = rng.choice([0, 1, 8, 16, 24, 31, 32, 32, rng.randrange(33)])
        base = rng.choice(V4_BASES) ^ (rng.getrandbits(32) if rng.random() < 0.2 else 0)
        return ip_network((base, plen), strict=False)
    plen = rng.choice([0, 1, 48, 64, 127, 128, 128, rng.randrange(129)])
    base = rng.choice(V6_BASES) ^ (rng.getrandbits(128) if rng.random() < 0.2 else 0)
    return ip_network((base, plen), strict=False)


def _rand_addr(rng: random.Random, table: NaiveTable) -> bytes:
    if table.routes and rng.random() < 0.6:
        net = rng.choice(list(table.routes))
        span = net.num_addresses
        return (net.network_address + rng.randrange(span)).packed
    if rng.random() < 0.5:
        return (rng.choice(V4_BASES) ^ rng.getrandbits(rng.choice([0, 8, 32]))).to_bytes(4, "big")
    return (rng.choice(V6_BASES) ^ rng.getrandbits(rng.choice([0, 16, 128]))).to_bytes(16, "big")


def _check_lookups(t: AllowedIPs[str], model: NaiveTable, rng: random.Random) -> None:
    for _ in range(40):
        addr = _rand_addr(rng, model)
        want = model.lookup(addr)
        assert t.lookup(addr) == want, addr.hex()
        buf = bytearray(b"\xee" * 8 + addr + b"\xee")
        assert t.lookup(memoryview(buf)[8 : 8 + len(addr)]) == want  # writable view
        assert t.lookup(memoryview(addr)) == want  # read-only view
        as_int = int.from_bytes(addr, "big")
        fast = t.lookup_v4(as_int) if len(addr) == 4 else t.lookup_v6(as_int)
        assert fast == want


@pytest.mark.parametrize("seed", range(10))
def test_matches_naive_model(seed: int) -> None:
    rng = random.Random(seed)
    t: AllowedIPs[str] = AllowedIPs()
    model = NaiveTable()
    for _ in range(250):
        r = rng.random()
        if r < 0.6:
            net, peer = _rand_net(rng), rng.choice(PEERS)
            t.insert(net, peer)
            model.insert(net, peer)
        elif r < 0.85 and model.routes:
            net = rng.choice(list(model.routes)) if rng.random() < 0.8 else _rand_net(rng)
            t.remove(net)
            model.remove(net)
        else:
            peer = rng.choice(PEERS)
            t.remove_value(peer)
            model.remove_value(peer)
        _check_lookups(t, model, rng)
        assert len(t) == len(model.routes)
    for peer in PEERS:
        assert set(t.networks_of(peer)) == model.networks_of(peer)
    assert {(n, v) for n, v in t.items()} == set(model.routes.items())


def test_edge_lengths_both_families() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ip_network("0.0.0.0/0"), "v4-default")
    t.insert(ip_network("10.0.0.1/32"), "host4")
    t.insert(ip_network("::/0"), "v6-default")
    t.insert(ip_network("fd00::1/128"), "host6")
    assert t.lookup(bytes([10, 0, 0, 1])) == "host4"
    assert t.lookup(bytes([10, 0, 0, 2])) == "v4-default"
    assert t.lookup(bytes([255, 255, 255, 255])) == "v4-default"
    assert t.lookup(ip_address("fd00::1").packed) == "host6"
    assert t.lookup(ip_address("fd00::2").packed) == "v6-default"
    # IPv4 and IPv6 never answer for each other, even for the same integer.
    t2: AllowedIPs[str] = AllowedIPs()
    t2.insert(ip_network("::/0"), "v6")
    assert t2.lookup(bytes(4)) is None and t2.lookup_v4(0) is None
    assert t2.lookup(bytes(16)) == "v6"


def test_host_bits_are_masked() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ip_network("10.1.2.3/24", strict=False), "a")
    t.insert("fd00::1234/64", "b")  # strings are accepted too
    assert t.networks_of("a") == [ip_network("10.1.2.0/24")]
    assert t.networks_of("b") == [ip_network("fd00::/64")]
    assert t.lookup(bytes([10, 1, 2, 200])) == "a"
    assert "10.1.2.0/24" in t and ip_network("10.1.3.0/24") not in t


def test_identical_prefix_moves_to_new_value() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ip_network("10.0.0.0/8"), "old")
    t.insert(ip_network("192.168.0.0/16"), "old")
    assert t.lookup(bytes([10, 9, 9, 9])) == "old"  # warms the cache
    t.insert(ip_network("10.0.0.0/8"), "new")
    assert t.lookup(bytes([10, 9, 9, 9])) == "new"
    assert t.networks_of("old") == [ip_network("192.168.0.0/16")]
    assert t.networks_of("new") == [ip_network("10.0.0.0/8")]
    assert len(t) == 2


def test_remove_and_remove_value_invalidate_lookups() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ip_network("10.0.0.0/8"), "wide")
    t.insert(ip_network("10.1.0.0/16"), "narrow")
    addr = bytes([10, 1, 1, 1])
    assert t.lookup(addr) == "narrow"
    t.remove(ip_network("10.1.0.0/16"))
    assert t.lookup(addr) == "wide"
    t.remove(ip_network("10.1.0.0/16"))  # absent: no error
    t.remove_value("wide")
    assert t.lookup(addr) is None
    assert len(t) == 0 and t.networks_of("wide") == []
    t.remove_value("nobody")


def test_unhashable_values_by_identity() -> None:
    a: list[int] = []
    b: list[int] = []  # equal to a, but a different peer
    t: AllowedIPs[list[int]] = AllowedIPs()
    t.insert(ip_network("10.0.0.0/24"), a)
    t.insert(ip_network("10.0.1.0/24"), b)
    t.remove_value(b)
    assert t.lookup(bytes([10, 0, 0, 1])) is a
    assert t.lookup(bytes([10, 0, 1, 1])) is None
    assert t.networks_of(a) == [ip_network("10.0.0.0/24")]


def test_rejects_none_value_and_bad_input() -> None:
    t: AllowedIPs[object] = AllowedIPs()
    with pytest.raises(ValueError):
        t.insert(ip_network("10.0.0.0/8"), None)
    with pytest.raises(TypeError):
        t.insert(ip_address("10.0.0.1"), "x")  # type: ignore[arg-type]
    t.insert(ip_network("0.0.0.0/0"), "x")
    assert t.lookup(b"\x01\x02\x03") is None
    assert t.lookup(b"") is None


def test_cache_overflow_stays_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mod, "CACHE_SIZE", 16)
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ip_network("10.0.0.0/8"), "ten")
    t.insert(ip_network("10.0.0.0/24"), "low")
    for i in range(200):
        addr = bytes([10, 0, i % 3, i])
        assert t.lookup(addr) == ("low" if i % 3 == 0 else "ten")
    assert len(t._cache) <= 16


def test_clear() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ip_network("::/0"), "x")
    assert t.lookup(bytes(16)) == "x"
    t.clear()
    assert len(t) == 0 and t.lookup(bytes(16)) is None and t.networks_of("x") == []
