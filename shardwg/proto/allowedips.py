"""Longest-prefix match over IPv4 and IPv6 prefixes: cryptokey routing.

Design (measured; see the commit message): a bit trie costs one Python step per
bit (up to 128). Instead each family keeps one dict per prefix length in use,
keyed by the masked network as an int, and a lookup probes the lengths from
longest to shortest. Real configs use a handful of lengths (/32 and /128 for
road warriors, /0 for a client), so a lookup is one int conversion plus one or
two dict probes. Worst case is one probe per distinct length (33 or 129).

In front of that, `lookup` keeps a bounded cache keyed by the raw address bytes
(flows repeat addresses): a hit is a single dict probe, about 2.5x faster than
converting to int and probing even one level. Any change empties it, and it is
emptied when full, so an address flood costs one extra dict store per packet.

Values are peers and are tracked by identity (like wg's peer pointers), so any
object can be a value, hashable or not. `None` cannot be a value: it means "no
route" in `lookup`.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Generic, TypeVar

__all__ = ["AllowedIPs", "Network"]

V = TypeVar("V")
Network = IPv4Network | IPv6Network
_Key = tuple[int, int, int]  # (version, prefix length, masked network int)

_BITS = {4: 32, 6: 128}
CACHE_SIZE = 8192  # lookup-cache entries per table before it is emptied and refilled
_from_bytes = int.from_bytes  # bound once: `int.from_bytes` per call costs ~50 ns more


def _mask(version: int, plen: int) -> int:
    bits = _BITS[version]
    return ((1 << plen) - 1) << (bits - plen)


def _key(network: Network | str) -> _Key:
    """(version, prefix length, network int); host bits are masked off, like wg.

    ipaddress networks never carry host bits (strict=False masks them), so only
    strings need the non-strict parse.
    """
    if isinstance(network, str):
        network = ip_network(network, strict=False)
    elif not isinstance(network, IPv4Network | IPv6Network):
        raise TypeError(f"expected an IPv4Network or IPv6Network, got {type(network).__name__}")
    version, plen = network.version, network.prefixlen
    return version, plen, int(network.network_address)


def _network(key: _Key) -> Network:
    version, plen, net = key
    if version == 4:
        return IPv4Network((net, plen))
    return IPv6Network((net, plen))


class AllowedIPs(Generic[V]):
    """Prefix -> peer table with longest-prefix-match lookups on raw packet addresses."""

    __slots__ = ("_tables", "_v4", "_v6", "_owners", "_cache", "generation")

    def __init__(self) -> None:
        # (version, plen) -> {masked network int: value}
        self._tables: dict[tuple[int, int], dict[int, V]] = {}
        # Probe order for lookups: ((mask, table), ...) longest prefix first.
        self._v4: tuple[tuple[int, dict[int, V]], ...] = ()
        self._v6: tuple[tuple[int, dict[int, V]], ...] = ()
        # id(value) -> (value, its prefixes); keeps remove_value/networks_of O(own prefixes).
        self._owners: dict[int, tuple[V, set[_Key]]] = {}
        # Raw address -> value for hits seen since the last change; emptied by every change.
        self._cache: dict[bytes, V] = {}
        # Bumped by every change (as IndexTable.generation): the batch data path rebuilds its
        # flat copy only then.
        self.generation = 0

    # -- hot path -----------------------------------------------------------------------

    def lookup(self, addr: bytes | bytearray | memoryview) -> V | None:
        """Peer for a raw 4- or 16-byte address (e.g. a slice of an IP header), else None."""
        if addr.__class__ is not bytes:
            addr = bytes(addr)  # writable views are unhashable; 4-16 byte copy is cheap
        value = self._cache.get(addr)
        if value is not None:
            return value
        n = len(addr)
        if n == 4:
            levels = self._v4
        elif n == 16:
            levels = self._v6
        else:
            return None
        a = _from_bytes(addr, "big")
        for mask, table in levels:
            value = table.get(a & mask)
            if value is not None:
                cache = self._cache
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[addr] = value
                return value
        return None

    def lookup_v4(self, addr: int) -> V | None:
        """Peer for an IPv4 address given as an int, else None (uncached: ints need no copy)."""
        for mask, table in self._v4:
            value = table.get(addr & mask)
            if value is not None:
                return value
        return None

    def lookup_v6(self, addr: int) -> V | None:
        """Peer for an IPv6 address given as an int, else None (uncached)."""
        for mask, table in self._v6:
            value = table.get(addr & mask)
            if value is not None:
                return value
        return None

    # -- control plane ------------------------------------------------------------------

    def insert(self, network: Network | str, value: V) -> None:
        """Route `network` to `value`; an identical prefix moves from its old peer, like wg."""
        if value is None:
            raise ValueError("None cannot be an AllowedIPs value")
        key = _key(network)
        version, plen, net = key
        self._cache.clear()
        self.generation += 1
        table = self._tables.get((version, plen))
        if table is None:
            table = self._tables[(version, plen)] = {}
            self._rebuild(version)
        old = table.get(net)
        if old is not None:
            self._disown(old, key)
        table[net] = value
        entry = self._owners.get(id(value))
        if entry is None:
            self._owners[id(value)] = (value, {key})
        else:
            entry[1].add(key)

    def remove(self, network: Network | str) -> None:
        """Drop one prefix; a prefix that is not present is ignored."""
        self._drop(_key(network))

    def remove_value(self, value: V) -> None:
        """Drop every prefix routed to `value` (a peer being removed or replacing its IPs)."""
        entry = self._owners.get(id(value))
        if entry is None:
            return
        for key in list(entry[1]):
            self._drop(key)

    def networks_of(self, value: V) -> list[Network]:
        """Prefixes routed to `value`, IPv4 first, each family in address then length order."""
        entry = self._owners.get(id(value))
        if entry is None:
            return []
        return [_network(k) for k in sorted(entry[1], key=lambda k: (k[0], k[2], k[1]))]

    def items(self) -> Iterator[tuple[Network, V]]:
        """Every (prefix, value) pair, in no particular order."""
        for (version, plen), table in list(self._tables.items()):
            for net, value in list(table.items()):
                yield _network((version, plen, net)), value

    def clear(self) -> None:
        self.generation += 1
        self._tables.clear()
        self._owners.clear()
        self._cache.clear()
        self._v4 = self._v6 = ()

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())

    def __contains__(self, network: object) -> bool:
        if not isinstance(network, IPv4Network | IPv6Network | str):
            return False
        version, plen, net = _key(network)
        return net in self._tables.get((version, plen), {})

    # -- internals ----------------------------------------------------------------------

    def _drop(self, key: _Key) -> None:
        version, plen, net = key
        table = self._tables.get((version, plen))
        if table is None or net not in table:
            return
        self._cache.clear()
        self.generation += 1
        self._disown(table.pop(net), key)
        if not table:
            del self._tables[(version, plen)]
            self._rebuild(version)

    def _disown(self, value: V, key: _Key) -> None:
        entry = self._owners[id(value)]
        entry[1].discard(key)
        if not entry[1]:
            del self._owners[id(value)]

    def _rebuild(self, version: int) -> None:
        levels = tuple(
            (_mask(v, plen), table)
            for (v, plen), table in sorted(self._tables.items(), key=lambda kv: -kv[0][1])
            if v == version
        )
        if version == 4:
            self._v4 = levels
        else:
            self._v6 = levels
