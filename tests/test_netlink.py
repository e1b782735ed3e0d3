"""shardwg.io.netlink inside throwaway namespaces, plus the harness's own veth/ping proof."""

from __future__ import annotations

import json

import pytest

from lab.netns import Namespace, veth_link
from lab.ping import ping
from shardwg.io import netlink as nl

pytestmark = pytest.mark.netns


def _pair(ns: Namespace) -> None:
    """A veth pair inside ns (this kernel has no dummy driver): d0 is the link under test."""
    ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    ns.ip("link", "set", "d1", "up")


def test_veth_ping_v4_v6(netns_factory) -> None:
    a, b = netns_factory(2)
    veth_link(a, b, ["10.11.0.1/24", "fd00:11::1/64"], ["10.11.0.2/24", "fd00:11::2/64"])
    assert ping(a, "10.11.0.2")
    assert ping(b, "fd00:11::1")
    assert not ping(a, "10.11.0.99", count=1, timeout=0.6)


def _configure_and_read() -> dict[str, object]:
    with open("/proc/sys/net/ipv6/conf/d0/disable_ipv6", "w") as f:
        f.write("1")  # prove add_addresses turns IPv6 back on
    nl.set_link_up("d0", 1400)
    addrs = ["10.50.0.1/24", "fd00:50::1/64"]
    nl.add_addresses("d0", addrs)
    nl.add_addresses("d0", addrs)  # idempotent
    prefixes = ["10.50.0.0/24", "10.50.0.7/32", "10.60.0.0/16", "fd00:60::/64", "fd00:50::/64"]
    nl.add_routes("d0", prefixes + ["0.0.0.0/0", "::/0"])
    nl.add_routes("d0", prefixes)  # idempotent
    main = nl.list_routes("d0")
    nl.add_routes("d0", ["10.70.0.0/16", "0.0.0.0/0", "::/0"], table=100)
    t100 = nl.list_routes("d0", 100)
    nl.remove_routes("d0", ["10.50.0.0/24", "10.60.0.0/16", "0.0.0.0/0", "::/0", "10.9.0.0/16"])
    nl.remove_routes("d0", ["0.0.0.0/0", "::/0", "10.70.0.0/16"], table=100)
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        (link,) = ipr.link("get", index=nl.link_index("d0"))
    return {
        "mtu": link.get_attr("IFLA_MTU"),
        "up": bool(link["flags"] & 1),
        "addrs": nl.list_addresses("d0"),
        "main": main,
        "t100": t100,
        "after": nl.list_routes("d0"),
        "after100": nl.list_routes("d0", 100),
        "kind": nl.link_kind("d0"),
    }


def test_addresses_and_routes(netns_factory) -> None:
    (ns,) = netns_factory(1)
    _pair(ns)
    r = ns.call(_configure_and_read)
    assert r["mtu"] == 1400 and r["up"] and r["kind"] == "veth"
    assert {"10.50.0.1/24", "fd00:50::1/64"} <= set(r["addrs"])
    main = set(r["main"])
    assert {"10.50.0.0/24", "10.60.0.0/16", "fd00:50::/64", "fd00:60::/64"} <= main
    assert {"0.0.0.0/0", "::/0"} <= main
    assert "10.50.0.7/32" not in main  # covered by the connected /24
    assert set(r["t100"]) == {"10.70.0.0/16", "0.0.0.0/0", "::/0"}
    after = set(r["after"])
    assert "10.50.0.0/24" in after  # connected routes are never removed
    assert not after & {"10.60.0.0/16", "0.0.0.0/0", "::/0"}
    assert "fd00:60::/64" in after
    assert r["after100"] == []


def _conflict_and_lifecycle() -> dict[str, object]:
    out: dict[str, object] = {}
    try:
        nl.add_routes("d0", ["0.0.0.0/0"])
    except nl.RouteConflictError as e:
        out["conflict"] = str(e)
    try:
        nl.set_link_up("nope0", 1400)
    except nl.LinkNotFoundError:
        out["missing"] = True
    out["before"] = (nl.link_exists("d0"), nl.link_index("d0") is not None)
    nl.delete_link("d0")
    nl.delete_link("d0")  # idempotent
    out["after"] = (nl.link_exists("d0"), nl.link_exists("d1"), nl.link_index("d0"))
    out["lo"] = nl.link_kind("lo")
    return out


def test_default_route_conflict_and_link_lifecycle(netns_factory) -> None:
    (ns,) = netns_factory(1)
    _pair(ns)
    ns.ip("link", "add", "e0", "type", "veth", "peer", "name", "e1")
    ns.ip("addr", "add", "10.99.0.1/24", "dev", "e0")
    ns.ip("link", "set", "e0", "up")
    ns.ip("link", "set", "d0", "up")
    ns.ip("route", "add", "default", "via", "10.99.0.2")
    r = ns.call(_conflict_and_lifecycle)
    assert "0.0.0.0/0" in r["conflict"]
    assert r["missing"] is True
    assert r["before"] == (True, True)
    assert r["after"] == (False, False, None)
    assert r["lo"] == ""


def test_pyroute2_under_ip_netns_exec(netns_factory) -> None:
    """IPRoute uses the netns of the process: `ip netns exec` is enough, no setns needed."""
    (ns,) = netns_factory(1)
    _pair(ns)
    code = (
        "import json; from shardwg.io import netlink as nl;"
        "nl.add_addresses('d0', ['10.3.0.1/24']);"
        "print(json.dumps([nl.link_exists('d0'), nl.list_addresses('d0')]))"
    )
    exists, addrs = json.loads(ns.python(code))
    assert exists and "10.3.0.1/24" in addrs
    assert "10.3.0.1/24" in ns.ip("addr", "show", "d0").stdout
    host = nl.list_addresses("d0") if nl.link_exists("d0") else []  # the host's view: untouched
    assert "10.3.0.1/24" not in host
