"""Shared fixtures: the namespace harness, in-memory gateways, and what happens on machines
that cannot run network tests.

Markers: `netns` / `requires_root_netns` need root with /dev/net/tun and a working `ip netns
add`; `interop` / `requires_wireguard_go` additionally need wireguard-go and wg. Without them
those tests are skipped, except when SHARDWG_REQUIRE_NETNS=1 (CI running as root sets it): then
they fail with the reason, so a broken runner cannot pass by silently running nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) would not find shardwg
    sys.path.insert(0, str(REPO_ROOT))

from lab.harness import Harness  # noqa: E402 - needs the path above
from lab.netns import root_netns_problem  # noqa: E402
from lab.wggo import wireguard_go_problem  # noqa: E402

if TYPE_CHECKING:
    from lab.enginetest import MemoryGateway

NETNS_MARKERS = ("netns", "requires_root_netns")
WG_MARKERS = ("interop", "requires_wireguard_go")
REQUIRE_ENV = "SHARDWG_REQUIRE_NETNS"


def netns_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def unavailable(reason: str) -> None:
    """Skip for want of a prerequisite, or fail when the environment says it must be there."""
    if netns_required():
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_root_netns: skip unless root + netns + TUN")
    config.addinivalue_line("markers", "requires_wireguard_go: skip unless wireguard-go and wg")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # a CI timeout's SIGTERM then unwinds through fixture teardown (namespaces get deleted)
        signal.signal(signal.SIGTERM, _sigterm)


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def pytest_report_header(config: pytest.Config) -> str:
    mode = "fail" if netns_required() else "skip"
    return f"netns/interop tests: {mode} when prerequisites are missing ({REQUIRE_ENV})"


def pytest_runtest_setup(item: pytest.Item) -> None:
    names = {m.name for m in item.iter_markers()}
    if names.intersection(NETNS_MARKERS + WG_MARKERS):
        reason = root_netns_problem()
        if reason:
            unavailable(reason)
    if names.intersection(WG_MARKERS):
        reason = wireguard_go_problem()
        if reason:
            unavailable(reason)


@pytest.fixture
def netns_factory() -> Iterator[Harness]:
    """Call it to make namespaces (`a, b = netns_factory(2)`); `.wireguard_go(ns, ...)` starts a
    tracked wireguard-go peer, `.gateway(ns, ...)` a tracked shardwg. Everything is removed at
    teardown, whatever the test did."""
    reason = root_netns_problem()
    if reason:
        unavailable(reason)
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def gateways() -> Iterator[list[MemoryGateway]]:
    """A list for the in-memory gateways (lab/enginetest) a test makes; each is closed at
    teardown, whatever the test did."""
    made: list[MemoryGateway] = []
    yield made
    for gw in made:
        gw.close()
