"""One owner for everything a test or script builds, so one close() removes all of it."""

from __future__ import annotations

from types import FrameType
from typing import Any

from lab.cpucap import PERIOD_US, CpuCap
from lab.gateway_proc import ShardwgGateway
from lab.netns import Namespace, make_namespaces, root_netns_problem
from lab.wggo import WireguardGo, wireguard_go_problem


class Harness:
    """Tracks namespaces, wireguard-go peers, gateways and CPU caps; close() stops the
    processes first, then removes the caps and the namespaces, and keeps going past errors
    (the first is raised at the end).

    `a, b = harness(2)` makes namespaces; `harness.namespace("site-a", exact=True)` one by name.
    """

    def __init__(self) -> None:
        self.namespaces: list[Namespace] = []
        self.peers: list[WireguardGo] = []
        self.gateways: list[ShardwgGateway] = []
        self.cpu_caps: list[CpuCap] = []

    def __call__(self, n: int = 1, label: str = "") -> list[Namespace]:
        made = make_namespaces(n, label)
        self.namespaces += made
        return made

    def namespace(self, label: str = "", *, exact: bool = False) -> Namespace:
        ns = Namespace(label, exact=exact)
        self.namespaces.append(ns)
        return ns

    def wireguard_go(self, ns: Namespace, *args: Any, **kwargs: Any) -> WireguardGo:
        wg = WireguardGo(ns, *args, **kwargs)
        self.peers.append(wg)
        return wg

    def gateway(self, ns: Namespace, *args: Any, **kwargs: Any) -> ShardwgGateway:
        gw = ShardwgGateway(ns, *args, **kwargs)
        self.gateways.append(gw)
        return gw

    def cap_workers(self, gw: ShardwgGateway, cores: float,
                    period_us: int = PERIOD_US) -> CpuCap:  # fmt: skip
        """Give every worker process of `gw` a budget of `cores` of CPU per `period_us`
        (lab/cpucap.py); the groups go when the harness closes, after the processes."""
        cap = CpuCap(cores, period_us)
        self.cpu_caps.append(cap)
        for w in gw.show_json(timeout=20)["worker_stats"]:
            cap.add(int(w["pid"]), f"{gw.ifname}-w{w['worker']}")
        return cap

    def close(self) -> None:
        errors: list[BaseException] = []
        closers: list[ShardwgGateway | WireguardGo | CpuCap | Namespace] = [
            *self.gateways, *self.peers, *self.cpu_caps, *reversed(self.namespaces)
        ]
        for obj in closers:
            try:
                obj.close()
            except Exception as e:  # noqa: BLE001 - keep cleaning, report after
                errors.append(e)
        self.gateways.clear()
        self.peers.clear()
        self.cpu_caps.clear()
        self.namespaces.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lab_problems(*extra: str | None) -> list[str]:
    """Why the lab cannot run here (root, netns, TUN, wireguard-go, wg, plus `extra`)."""
    return [p for p in (root_netns_problem(), wireguard_go_problem(), *extra) if p]


def exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    """Signal handler for lab programs: unwind (tearing down) as exit code 128 + signum."""
    raise SystemExit(128 + signum)
