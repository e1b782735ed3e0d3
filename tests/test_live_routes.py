"""Route changes of a live reconfiguration (engine/live.py apply_routes) in a throwaway
namespace: one prefix that cannot be routed costs only its own route, and says so."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from lab.netns import Namespace
from shardwg.io import netlink as nl

pytestmark = pytest.mark.netns

CONFLICT = "10.99.5.0/24"  # routed through e0 before the change: not ours to take


def _links(ns: Namespace) -> None:
    """d0: the gateway's link (a veth: this kernel has no dummy driver); e0 holds CONFLICT."""
    ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    ns.ip("link", "add", "e0", "type", "veth", "peer", "name", "e1")
    for link in ("d1", "e0", "e1"):
        ns.ip("link", "set", link, "up")
    ns.ip("addr", "add", "10.99.0.1/24", "dev", "e0")
    ns.ip("route", "add", CONFLICT, "dev", "e0")


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _apply(fail_remove: bool) -> dict[str, Any]:
    from shardwg.engine import live

    warnings = _Warnings()
    logging.getLogger("shardwg.engine.live").addHandler(warnings)
    nl.set_link_up("d0", 1400)
    nl.add_addresses("d0", ["10.50.0.1/24", "fd00:50::1/64"])
    old = [f"10.82.0.{i}/32" for i in range(1, 51)]
    nl.add_routes("d0", old)
    add = [f"10.81.{i >> 8}.{i & 255}/32" for i in range(1000)] + [CONFLICT, "fd00:81::/64"]
    if fail_remove:

        def refuse(*_args: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        nl.remove_routes = refuse  # type: ignore[assignment]  # this child only
    t0 = time.monotonic()
    live.apply_routes("d0", add, old[:25], None)
    took = time.monotonic() - t0
    return {"d0": nl.list_routes("d0"), "warnings": warnings.lines, "old": old, "add": add,
            "took": took}  # fmt: skip


@pytest.mark.parametrize("fail_remove", [False, True])
def test_one_conflicting_prefix_costs_only_its_route(netns_factory, fail_remove: bool) -> None:
    (ns,) = netns_factory(1, "lr")
    _links(ns)
    r = ns.call(_apply, fail_remove, timeout=120)
    print(f"\napply_routes, 1,002 prefixes, 1 conflict: {r['took']:.2f} s")
    routed = set(r["d0"])
    assert set(r["add"]) - routed == {CONFLICT}  # every other prefix got its route
    assert CONFLICT in ns.ip("route", "show", "dev", "e0").stdout  # left where it was
    kept = set(r["old"]) if fail_remove else set(r["old"][25:])
    assert set(r["old"]) & routed == kept
    (conflict,) = [w for w in r["warnings"] if CONFLICT in w]
    assert "d0" in conflict
    removal = [w for w in r["warnings"] if "not removed" in w]
    assert len(removal) == int(fail_remove) and all("d0" in w for w in removal)
    assert len(r["warnings"]) == 1 + int(fail_remove), r["warnings"]
