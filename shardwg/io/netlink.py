"""Link, address and route setup over rtnetlink (pyroute2), never by running `ip`.

Every call opens its own IPRoute socket, so it acts in the network namespace of the calling
process (or thread) at that moment: `ip netns exec` and setns both just work. These are
configuration calls, not hot path: clarity over speed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shardwg.io import rtnl

IFA_F_NODAD = 0x02
RTPROT_STATIC = 4
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RT_TABLE_MAIN = 254
RTA_TABLE_FIELD = "RTA_TABLE"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class LinkNotFoundError(LookupError):
    """The named interface does not exist in this network namespace."""


class RouteConflictError(OSError):
    """A route for the prefix exists through another interface (typically the default route)."""


@contextmanager
def _ipr() -> Iterator[Any]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LinkNotFoundError(f"no interface named {name!r} in this network namespace")
    return int(found[0])


def link_index(name: str) -> int | None:
    """Interface index, or None when absent."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def link_exists(name: str) -> bool:
    return link_index(name) is not None


def link_kind(name: str) -> str | None:
    """IFLA_INFO_KIND ("tun", "veth", ...; "" for kind-less devices like lo), None when absent."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        (msg,) = ipr.link("get", index=found[0])
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return str(kind) if kind else ""


def delete_link(name: str) -> None:
    """Delete the link if present (idempotent: a vanished link is not an error)."""
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise


def set_link_up(name: str, mtu: int) -> None:
    """Set the MTU and bring the link up."""
    with _ipr() as ipr:
        ipr.link("set", index=_index(ipr, name), mtu=mtu, state="up")


def set_gso_max_segs(name: str, segs: int) -> None:
    """Cap the segments of a GSO super-packet the kernel hands this link (TUN offloads:
    the worker splits each into a fixed set of buffers)."""
    with _ipr() as ipr:
        ipr.link("set", index=_index(ipr, name), gso_max_segs=segs)


def _enable_ipv6(name: str) -> None:
    """A link with disable_ipv6=1 refuses IPv6 addresses (EACCES): flip it (per-netns sysctl)."""
    path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    try:
        with open(path) as f:
            if f.read().strip() == "0":
                return
        with open(path, "w") as f:
            f.write("0")
    except FileNotFoundError:
        return  # IPv6 is off in this kernel: the address add reports it
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"IPv6 is disabled on {name} and {path} cannot be written ({exc.strerror}); "
            "set net.ipv6.conf.default.disable_ipv6=0 (e.g. a container sysctl) "
            "or remove the IPv6 Address",
        ) from exc


def add_addresses(name: str, addresses: list[str]) -> None:
    """Add CIDR addresses (v4 and v6; v6 without DAD so they are usable at once). Idempotent."""
    ifaces = [ipaddress.ip_interface(a) for a in addresses]
    if any(i.version == 6 for i in ifaces):
        _enable_ipv6(name)
    with _ipr() as ipr:
        idx = _index(ipr, name)
        for i in ifaces:
            kw: dict[str, Any] = {"index": idx, "address": str(i.ip)}
            kw["prefixlen"] = i.network.prefixlen
            if i.version == 6:
                kw["flags"] = IFA_F_NODAD
            try:
                ipr.addr("add", **kw)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise


def list_addresses(name: str) -> list[str]:
    """The link's addresses as CIDR strings (link-local included)."""
    with _ipr() as ipr:
        idx = _index(ipr, name)
        msgs = ipr.addr("dump", index=idx)
        return [f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}" for m in msgs]


def _routes(ipr: Any, idx: int, table: int) -> list[tuple[Network, int]]:
    """(prefix, protocol) of unicast routes through link idx in table."""
    out: list[tuple[Network, int]] = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        for m in ipr.route("dump", family=fam):
            if m.get_attr("RTA_OIF") != idx or (m.get_attr(RTA_TABLE_FIELD) or m["table"]) != table:
                continue
            dst = m.get_attr("RTA_DST") or ("0.0.0.0" if fam == socket.AF_INET else "::")
            out.append((ipaddress.ip_network(f"{dst}/{m['dst_len']}"), m["proto"]))
    return out


def list_routes(name: str, table: int | None = None) -> list[str]:
    """Prefixes routed through the link in table (main by default), as strings."""
    with _ipr() as ipr:
        idx = _index(ipr, name)
        return [str(n) for n, _ in _routes(ipr, idx, table or RT_TABLE_MAIN)]


def _normalise(prefixes: list[str]) -> list[Network]:
    nets = {ipaddress.ip_network(p, strict=False) for p in prefixes}
    # most specific first, like wg-quick, so a later default route never hides an error
    return sorted(nets, key=lambda n: (-n.prefixlen, n.version, int(n.network_address)))


def add_routes(name: str, prefixes: list[str], table: int | None = None) -> None:
    """Route prefixes through the link, into `table` (main when None), idempotently; raises
    the first prefix's failure (see try_add_routes), after every other got its route.

    In the main table a prefix that the link's connected routes (its own address prefixes) cover
    is skipped. Default routes are added like any other; if one exists through another link the
    kernel says EEXIST and we raise RouteConflictError (pass `table` for a separate table).
    """
    failed = try_add_routes(name, prefixes, table)
    if failed:
        raise failed[0][1]


def try_add_routes(
    name: str, prefixes: list[str], table: int | None = None
) -> list[tuple[Network, OSError]]:
    """add_routes, but each prefix the kernel refused is returned with its error (an OSError,
    or RouteConflictError when another link has it) instead of raised: one message per
    prefix, so one failure never keeps the others from their routes. Raises only when the
    pass as a whole fails (no such link, netlink itself). Sent in batches over a raw socket
    (io/rtnl.py): thousands of routes take milliseconds.
    """
    tbl = table or RT_TABLE_MAIN
    idx = _link_index(name)
    connected = rtnl.link_networks(idx) if tbl == RT_TABLE_MAIN else []
    todo = [n for n in _normalise(prefixes) if not any(_covers(c, n) for c in connected)]
    errs = rtnl.change_routes(rtnl.RTM_NEWROUTE, idx, todo, tbl, RTPROT_STATIC, RT_SCOPE_LINK,
                              0, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL)  # fmt: skip
    failed: list[tuple[Network, OSError]] = [
        (net, OSError(err, f"route {net} through {name}: {os.strerror(err)}"))
        for net, err in zip(todo, errs, strict=True)
        if err not in (0, errno.EEXIST)
    ]
    exist = [net for net, err in zip(todo, errs, strict=True) if err == errno.EEXIST]
    if exist:  # ours already (idempotent), or through another link (a conflict)
        with _ipr() as ipr:
            ours = {n for n, _ in _routes(ipr, idx, tbl)}
        for net in exist:
            if net not in ours:
                msg = f"{net} is already routed elsewhere in table {tbl}"
                failed.append((net, RouteConflictError(errno.EEXIST, msg)))
    return failed


def _link_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise LinkNotFoundError(f"no interface named {name!r} in this network namespace") from None


def _covers(outer: Network, inner: Network) -> bool:
    return outer.version == inner.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def remove_routes(name: str, prefixes: list[str], table: int | None = None) -> None:
    """Remove routes we added through the link (protocol static); absent ones and connected
    routes are left alone. One batch over a raw socket (io/rtnl.py)."""
    tbl = table or RT_TABLE_MAIN
    nets = _normalise(prefixes)
    errs = rtnl.change_routes(rtnl.RTM_DELROUTE, _link_index(name), nets, tbl, RTPROT_STATIC,
                              RT_SCOPE_NOWHERE, RT_SCOPE_NOWHERE)  # fmt: skip
    for net, err in zip(nets, errs, strict=True):
        if err not in (0, errno.ESRCH, errno.ENOENT):
            raise OSError(err, f"route {net} through {name}: {os.strerror(err)}")
