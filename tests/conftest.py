"""Shared fixtures: the namespace harness, and skips for machines that cannot run network tests.

Markers: `netns` / `requires_root_netns` skip unless we are root with /dev/net/tun and can make a
namespace; `interop` / `requires_wireguard_go` additionally need wireguard-go and wg.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) would not find shardwg
    sys.path.insert(0, str(REPO_ROOT))

import netns  # noqa: E402 - needs the path above

NETNS_MARKERS = ("netns", "requires_root_netns")
WG_MARKERS = ("interop", "requires_wireguard_go")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_root_netns: skip unless root + netns + TUN")
    config.addinivalue_line("markers", "requires_wireguard_go: skip unless wireguard-go and wg")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # a CI timeout's SIGTERM then unwinds through fixture teardown (namespaces get deleted)
        signal.signal(signal.SIGTERM, _sigterm)


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def pytest_runtest_setup(item: pytest.Item) -> None:
    names = {m.name for m in item.iter_markers()}
    if names.intersection(NETNS_MARKERS + WG_MARKERS):
        reason = netns.root_netns_problem()
        if reason:
            pytest.skip(reason)
    if names.intersection(WG_MARKERS):
        reason = netns.wireguard_go_problem()
        if reason:
            pytest.skip(reason)


@pytest.fixture
def netns_factory() -> Iterator[netns.Harness]:
    """Call it to make namespaces (`a, b = netns_factory(2)`); `.wireguard_go(ns, ...)` starts a
    tracked wireguard-go peer. Everything is removed at teardown, whatever the test did."""
    reason = netns.root_netns_problem()
    if reason:
        pytest.skip(reason)
    harness = netns.Harness()
    try:
        yield harness
    finally:
        harness.close()
