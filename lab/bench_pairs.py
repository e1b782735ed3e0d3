"""The set-ups the benchmark measures, each built fresh in its own namespaces and torn down by
PID and exact name afterwards:

- a pair: two namespaces joined by a veth, a tunnel end in each (wireguard-go or shardwg, MTU
  1420); end A holds the iperf3 server, end B the client. Direction "recv": A receives (B sends);
  "send": A sends (iperf3 -R). Kind "veth" has no tunnel at all: the ceiling of the underlay
  and of iperf3 itself on this machine.
- a handshake responder: wireguard-go or shardwg configured with the load generator's peers.
- a 4-peer star (lab.topology.Star) for 1-vs-2-worker scaling.
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass
from typing import Any

from lab import loadgen
from lab.bench_measure import (
    IperfJob,
    IperfRun,
    Tracked,
    children,
    cpu_delta,
    cpu_snapshot,
    machine_busy,
    machine_ticks,
    memory,
)
from lab.harness import Harness
from lab.keys import keypair
from lab.netns import LabError, Namespace, unique_ifname, veth_link
from lab.ping import ping_rtts
from lab.topology import Star

PAIRS: dict[str, tuple[str, str]] = {
    "wggo-wggo": ("wggo", "wggo"),
    "shardwg-wggo": ("shardwg", "wggo"),
    "shardwg-shardwg": ("shardwg", "shardwg"),
}
BASELINE = "veth"
LABELS = {
    "veth": "veth, no tunnel",
    "wggo-wggo": "wg-go<->wg-go",
    "shardwg-wggo": "shardwg<->wg-go",
    "shardwg-shardwg": "shardwg<->shardwg",
}
UNDERLAY = ("10.201.0.1", "10.201.0.2")
TUNNEL = ("10.202.0.1", "10.202.0.2")
WG_PORT = 51820
IPERF_PORT = 5201
LOSS_LIMIT = 1.0  # percent
UDP_LEN = 1392  # fills the 1420 tunnel MTU: 1420 - 20 (IPv4) - 8 (UDP)
DIRECTIONS = {"recv": "A receives", "send": "A sends"}


@dataclass
class TunnelEnd:
    """One running tunnel end and the processes whose CPU and memory count as its cost."""

    kind: str  # "wggo" or "shardwg"
    ns: Namespace
    pid: int

    def tracked(self) -> list[Tracked]:
        if self.kind == "wggo":
            return [Tracked(self.pid, "wireguard-go")]
        # the supervisor (with its reaped children's time) and its live workers
        return [Tracked(self.pid, "supervisor", with_children=True)] + [
            Tracked(c, "worker") for c in children(self.pid)
        ]

    def cpu(self) -> float:
        return sum(t.cpu() for t in self.tracked())

    def memory(self) -> list[dict[str, Any]]:
        return [{"role": t.role, "pid": t.pid, **memory(t.pid)} for t in self.tracked()]


def start_end(
    h: Harness,
    kind: str,
    ns: Namespace,
    private: str,
    port: int,
    peers: list[dict[str, Any]],
    addresses: list[str],
    workers: int,
    mtu: int = 1420,
) -> TunnelEnd:
    if kind == "wggo":
        wg = h.wireguard_go(ns, unique_ifname("wgb"), private, port, peers, addresses, mtu=mtu,
                            log_level="error")  # fmt: skip
        assert wg.proc is not None
        return TunnelEnd(kind, ns, wg.proc.pid)
    if kind == "shardwg":
        gw = h.gateway(ns, unique_ifname("swb"), private, port, peers, addresses,
                       workers=workers, mtu=mtu)  # fmt: skip
        return TunnelEnd(kind, ns, gw.proc.pid)
    raise ValueError(f"unknown tunnel kind {kind!r}")


class Pair:
    """Namespaces A and B on a veth; tunnel ends per `key` (PAIRS), or none for BASELINE."""

    def __init__(self, h: Harness, key: str, workers: int) -> None:
        self.key = key
        self.a_ns, self.b_ns = h(2, "bp")
        veth_link(self.a_ns, self.b_ns, [f"{UNDERLAY[0]}/24"], [f"{UNDERLAY[1]}/24"])
        self.ends: list[TunnelEnd] = []
        if key == BASELINE:
            self.addr_a = UNDERLAY[0]
            return
        kinds = PAIRS[key]
        (pa, ka), (pb, kb) = keypair(), keypair()
        sides = [(self.a_ns, kinds[0], pa, kb, 0), (self.b_ns, kinds[1], pb, ka, 1)]
        for ns, kind, priv, other_pub, i in sides:
            peer = {"public_key": other_pub, "allowed_ips": [f"{TUNNEL[1 - i]}/32"],
                    "endpoint": f"{UNDERLAY[1 - i]}:{WG_PORT}"}  # fmt: skip
            self.ends.append(
                start_end(h, kind, ns, priv, WG_PORT, [peer], [f"{TUNNEL[i]}/24"], workers)
            )
        self.addr_a = TUNNEL[0]

    def warm(self, timeout: float = 30) -> float:
        """Handshake (first ping through the tunnel); returns its RTT in ms."""
        rtts = ping_rtts(self.b_ns, self.addr_a, count=1, timeout=timeout)
        if not rtts:
            raise LabError(f"{LABELS[self.key]}: no reply through the tunnel in {timeout:g} s")
        return rtts[0]

    def tracked(self) -> list[Tracked]:
        return [t for e in self.ends for t in e.tracked()]

    def tcp(self, streams: int, seconds: float, reverse: bool = False) -> dict[str, float]:
        """One iperf3 TCP run B -> A (A -> B if reverse); throughput and each end's CPU cost."""
        job = IperfJob(self.a_ns, self.b_ns, self.addr_a, IPERF_PORT, seconds, streams,
                       reverse=reverse)  # fmt: skip
        job.start_server()
        snaps = [cpu_snapshot(e.tracked()) for e in self.ends]
        ticks = machine_ticks()
        run = job.start_client().finish()
        out: dict[str, float] = {"gbit_s": run.gbit_s, "retransmits": float(run.retransmits),
                                 "machine_busy": machine_busy(ticks, machine_ticks())}  # fmt: skip
        for e, before, side in zip(self.ends, snaps, "ab"[: len(self.ends)], strict=True):
            cores = cpu_delta(before, cpu_snapshot(e.tracked())) / max(run.seconds, 1e-9)
            out[f"cores_{side}"] = cores
            out[f"cores_per_gbit_{side}"] = cores / run.gbit_s if run.gbit_s > 0 else math.inf
        return out

    def udp_once(self, rate_bps: float, seconds: float, reverse: bool = False) -> IperfRun:
        job = IperfJob(self.a_ns, self.b_ns, self.addr_a, IPERF_PORT, seconds,
                       udp_rate=rate_bps, udp_len=UDP_LEN, reverse=reverse)  # fmt: skip
        return job.run()

    def udp_best(
        self,
        seconds: float,
        start_mbit: float = 50,
        max_mbit: float = 6400,
        say: Any = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """Double the offered UDP rate until loss exceeds 1% (or iperf3 cannot offer more),
        then two bisection steps between the last good and the first bad rate. Best = the
        highest received packet rate among steps with <= 1% loss."""
        steps: list[dict[str, float]] = []

        def step(mbit: float) -> dict[str, float]:
            r = self.udp_once(mbit * 1e6, seconds, reverse)
            s = {"offered_mbit_s": mbit, "sent_pps": r.packets / max(r.seconds, 1e-9),
                 "received_pps": r.received_pps, "loss_percent": r.lost_percent,
                 "received_mbit_s": r.bits_per_second / 1e6}  # fmt: skip
            steps.append(s)
            if say:
                say(f"udp {mbit:7.0f} Mbit/s offered: {s['received_pps']:9.0f} pps received, "
                    f"loss {s['loss_percent']:.2f}%")  # fmt: skip
            time.sleep(0.3)  # let queues drain before the next step
            return s

        good: float | None = None
        bad: float | None = None
        mbit = start_mbit
        while mbit <= max_mbit:
            s = step(mbit)
            if s["loss_percent"] > LOSS_LIMIT:
                bad = mbit
                break
            good = mbit
            offered_pps = mbit * 1e6 / 8 / UDP_LEN  # iperf3 -b counts payload bits
            if s["sent_pps"] < 0.8 * offered_pps:  # the sender is the limit: no point going on
                break
            mbit *= 2
        if bad is not None and good is None:
            s = step(bad / 4)
            good = bad / 4 if s["loss_percent"] <= LOSS_LIMIT else None
        for _ in range(2):  # bisect (geometrically) to within ~19% of the limit
            if bad is None or good is None or bad / good <= 1.2:
                break
            mid = math.sqrt(bad * good)
            if step(mid)["loss_percent"] <= LOSS_LIMIT:
                good = mid
            else:
                bad = mid
        ok = [s for s in steps if s["loss_percent"] <= LOSS_LIMIT]
        best = max(ok, key=lambda s: s["received_pps"]) if ok else None
        return {"steps": steps, "best": best}

    def rtt(self, count: int = 20, interval: float = 0.1) -> list[float]:
        """Idle echo RTTs (ms) B -> A through the tunnel."""
        return ping_rtts(self.b_ns, self.addr_a, count=count, timeout=count * interval + 10,
                         interval=interval)  # fmt: skip

    def memory(self) -> dict[str, list[dict[str, Any]]]:
        return {side: e.memory() for side, e in zip("ab"[: len(self.ends)], self.ends, strict=True)}


def handshake_run(
    h: Harness,
    kind: str,
    workers: int,
    seconds: float,
    n_peers: int = 256,
    window: int = 64,
    pool_rate: int = 8000,
) -> loadgen.LoadgenResult:
    """A responder (`kind`) in A configured with n_peers load-generator peers; the generator in
    B sends valid initiations for `seconds` and counts the responses."""
    a_ns, b_ns = h(2, "hs")
    veth_link(a_ns, b_ns, [f"{UNDERLAY[0]}/24"], [f"{UNDERLAY[1]}/24"])
    priv, pub = keypair()
    peers = loadgen.make_peers(n_peers)
    end = start_end(h, kind, a_ns, priv, WG_PORT, loadgen.peer_configs(peers),
                    [f"{TUNNEL[0]}/24"], workers)  # fmt: skip
    pool = int(min(seconds * pool_rate, 60_000))  # made before the clock starts: ~150 µs each
    result: loadgen.LoadgenResult = b_ns.call(
        loadgen.run_loadgen, (UNDERLAY[0], WG_PORT), base64.b64decode(pub), peers, seconds,
        window=window, pool=pool, cpu_probe=end.cpu, timeout=seconds + pool / 1000 + 60,
    )  # fmt: skip
    return result


def scaling_run(
    h: Harness, workers: int, seconds: float, name: str, n_peers: int = 4,
    worker_cpu: float = 0,
) -> dict[str, float]:
    """A shardwg gateway with `workers` and n_peers wireguard-go peers on a bridged underlay;
    one iperf3 TCP stream from every peer to the gateway at once. Aggregate Gbit/s and the
    gateway's CPU. `worker_cpu`: each worker's CPU budget in cores (0: none; lab/cpucap.py),
    and then also the fraction of budget periods in which a worker was throttled."""
    star = Star(h, n_peers, name=name).build().start(workers=workers)
    gw, gw_ns = star.gateway, star.gw_ns
    assert gw is not None and gw_ns is not None
    for p in star.peers:
        if not ping_rtts(p.ns, star.gw_tunnel4, count=1, timeout=15):
            raise LabError(f"scaling: {p.name} got no reply through the tunnel")
    cap = h.cap_workers(gw, worker_cpu) if worker_cpu else None
    cap_before = cap.periods() if cap else (0, 0)
    end = TunnelEnd("shardwg", gw_ns, gw.proc.pid)
    peer_ends = [TunnelEnd("wggo", p.ns, p.wg.proc.pid) for p in star.peers
                 if p.wg is not None and p.wg.proc is not None]  # fmt: skip
    peer_procs = [t for e in peer_ends for t in e.tracked()]
    jobs = [IperfJob(gw_ns, p.ns, star.gw_tunnel4, IPERF_PORT + i, seconds)
            for i, p in enumerate(star.peers)]  # fmt: skip
    try:
        for j in jobs:
            j.start_server()
        before = cpu_snapshot(end.tracked())
        peers_before = cpu_snapshot(peer_procs)
        ticks = machine_ticks()
        t0 = time.monotonic()
        for j in jobs:
            j.start_client()
        runs = [j.finish() for j in jobs]
    finally:
        for j in jobs:
            j.stop()
    wall = time.monotonic() - t0
    busy = machine_busy(ticks, machine_ticks())
    cores = cpu_delta(before, cpu_snapshot(end.tracked())) / max(wall, 1e-9)
    peer_cores = cpu_delta(peers_before, cpu_snapshot(peer_procs)) / max(wall, 1e-9)
    out = {"gbit_s": sum(r.gbit_s for r in runs), "cores": cores, "peer_cores": peer_cores,
           "machine_busy": busy, "min_peer_gbit_s": min(r.gbit_s for r in runs)}  # fmt: skip
    if cap is not None:
        out["throttled"] = cap.throttled_since(cap_before)
    return out
