"""One peer over several workers (issue 12): throughput, retransmits and each worker's share.

A pair of namespaces on a veth: end A is shardwg (1 or 2 workers, `--spread off|auto|on`, or
`packets`: `--spread on` with the peer's `Spread = packets`, so one flow's packets are spread
too), end B is wireguard-go or shardwg with the same worker count and spread setting. iperf3
TCP with 1 or 4 streams, each direction (B -> A: A receives; A -> B: A sends). For each run:
Gbit/s, TCP retransmits (iperf3 -J), and A's per-worker UDP datagram counts over the run from
`shardwg show --json` (the share each worker carried in each direction).

    python -m lab.bench_onepeer [--seconds 5] [--reps 3] [--peer wggo|shardwg] [--out F]
                                [--worker-cpu CORES]

Configurations alternate inside each repetition; the report gives medians over reps.
`--worker-cpu 0.3` caps every shardwg worker at 0.3 cores (lab/cpucap.py), so the workers,
not the load generators sharing this box's cores, are the bottleneck: how the engine scales
where each worker has a core of its own. `auto` is left out then: it spreads on measured
saturation of a whole core, which a capped worker never shows.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
from collections.abc import Callable
from typing import Any

from lab import wgconf
from lab.bench_measure import IperfJob
from lab.bench_pairs import TUNNEL, UNDERLAY, WG_PORT, TunnelEnd
from lab.cpucap import PERIOD_US, CpuCap
from lab.gateway_proc import ShardwgGateway
from lab.harness import Harness
from lab.keys import keypair
from lab.netns import unique_ifname, veth_link
from lab.ping import ping_rtts

IPERF_PORT = 5211
CONFIGS = [(1, "off"), (2, "off"), (2, "auto"), (2, "on"), (2, "packets")]  # (workers, spread)
CAPPED_CONFIGS = [(1, "off"), (2, "off"), (2, "on"), (2, "packets")]  # with --worker-cpu


def configs(worker_cpu: float) -> list[tuple[int, str]]:
    return CAPPED_CONFIGS if worker_cpu else CONFIGS


def worker_counts(gw: ShardwgGateway) -> list[tuple[int, int]]:
    """(rx_packets, tx_packets) per worker of `gw`, now."""
    return [(w["rx_packets"], w["tx_packets"]) for w in gw.show_json(timeout=20)["worker_stats"]]


class OnePeer:
    """End A: shardwg; end B: `peer_kind` (wggo or shardwg); one peer each."""

    def __init__(self, h: Harness, peer_kind: str, workers: int, spread: str,
                 peer_spread: str = "", worker_cpu: float = 0,
                 cap_period_us: int = PERIOD_US) -> None:  # fmt: skip
        """`spread`: --spread, or "packets" (--spread on and the peer's `Spread = packets`);
        `peer_spread`: the peer's own `Spread` in the shardwg ends' configs ("" = none);
        `worker_cpu`: each shardwg worker's CPU budget in cores (0: none), per
        `cap_period_us`."""
        self.a_ns, self.b_ns = h(2, "op")
        veth_link(self.a_ns, self.b_ns, [f"{UNDERLAY[0]}/24"], [f"{UNDERLAY[1]}/24"])
        (pa, ka), (pb, kb) = keypair(), keypair()
        if spread == "packets":
            spread, peer_spread = "on", peer_spread or "packets"
        extra = ["--placement", "count", "--spread", spread]

        def peer(i: int, pub: str) -> dict[str, Any]:
            return {"public_key": pub, "allowed_ips": [f"{TUNNEL[1 - i]}/32"],
                    "endpoint": f"{UNDERLAY[1 - i]}:{WG_PORT}",
                    "spread": peer_spread if i == 0 or peer_kind == "shardwg" else ""}  # fmt: skip

        self.gw = h.gateway(self.a_ns, unique_ifname("opa"), pa, WG_PORT, [peer(0, kb)],
                            [f"{TUNNEL[0]}/24"], workers=workers, extra_args=extra)  # fmt: skip
        self.b_gw: ShardwgGateway | None = None  # end B when it is shardwg
        if peer_kind == "wggo":
            wg = h.wireguard_go(self.b_ns, unique_ifname("opb"), pb, WG_PORT, [peer(1, ka)],
                                [f"{TUNNEL[1]}/24"], log_level="error")  # fmt: skip
            assert wg.proc is not None
            self.b_end = TunnelEnd("wggo", self.b_ns, wg.proc.pid)
        else:
            gb = h.gateway(self.b_ns, unique_ifname("opb"), pb, WG_PORT, [peer(1, ka)],
                           [f"{TUNNEL[1]}/24"], workers=workers, extra_args=extra)  # fmt: skip
            self.b_end = TunnelEnd("shardwg", self.b_ns, gb.proc.pid)
            self.b_gw = gb
        if not ping_rtts(self.b_ns, TUNNEL[0], count=1, timeout=30):
            raise RuntimeError("no reply through the tunnel")
        self.caps: list[CpuCap] = []
        if worker_cpu:
            self.caps = [h.cap_workers(g, worker_cpu, cap_period_us)
                         for g in [self.gw, self.b_gw] if g]  # fmt: skip

    def set_peer_spread(self, value: str) -> None:
        """Rewrite the peer's `Spread` in every shardwg end's config and reload it (SIGHUP)."""
        for gw in [self.gw] + ([self.b_gw] if self.b_gw is not None else []):
            lines = [ln for ln in gw.config_path.read_text().splitlines()
                     if not ln.startswith("Spread =")]  # fmt: skip
            if value:
                lines.append(f"Spread = {value}")  # the last section is the one peer's
            wgconf.write_secret(gw.config_path, "\n".join(lines) + "\n")
            gw.proc.send_signal(signal.SIGHUP)

    def tcp(self, streams: int, seconds: float, a_sends: bool,
            cport: int | None = None) -> dict[str, Any]:  # fmt: skip
        """iperf3 one way; `cport`: the client's first port (default: the kernel's pick)."""
        server, client, addr = (self.b_ns, self.a_ns, TUNNEL[1]) if a_sends else (
            self.a_ns, self.b_ns, TUNNEL[0])  # fmt: skip
        ends = [self.gw] + ([self.b_gw] if self.b_gw is not None else [])
        before = [worker_counts(g) for g in ends]
        caps_before = [c.periods() for c in self.caps]
        run = IperfJob(server, client, addr, IPERF_PORT, seconds, streams, cport=cport).run()
        throttled = [c.throttled_since(b) for c, b in zip(self.caps, caps_before, strict=True)]
        after = [worker_counts(g) for g in ends]
        col = 1 if a_sends else 0  # A's tx datagrams when it sends, rx when it receives
        # per end, per worker: (rx, tx) datagrams over the run
        deltas = [[(b[0] - a[0], b[1] - a[1]) for a, b in zip(x, y, strict=True)]
                  for x, y in zip(before, after, strict=True)]  # fmt: skip
        per = [d[col] for d in deltas[0]]
        total = max(sum(per), 1)
        return {"gbit_s": run.gbit_s, "retransmits": run.retransmits,
                "shares": [round(p / total, 3) for p in per], "counts": deltas,
                "throttled": round(statistics.fmean(throttled), 3) if throttled else 0.0}


def run(seconds: float, reps: int, peer_kind: str, streams_list: list[int],
        worker_cpu: float = 0, cap_period_us: int = PERIOD_US) -> dict[str, Any]:  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {}
    for _rep in range(reps):
        for workers, spread in configs(worker_cpu):
            with Harness() as h:
                op = OnePeer(h, peer_kind, workers, spread, worker_cpu=worker_cpu,
                             cap_period_us=cap_period_us)  # fmt: skip
                for streams in streams_list:
                    for a_sends in (True, False):
                        key = (f"{workers}w spread={spread} {streams}s "
                               f"{'A->B' if a_sends else 'B->A'}")  # fmt: skip
                        res = op.tcp(streams, seconds, a_sends)
                        results.setdefault(key, []).append(res)
                        print(key, res, flush=True)
    summary = {}
    for key, runs in results.items():
        summary[key] = {
            "gbit_s": statistics.median(r["gbit_s"] for r in runs),
            "retransmits": statistics.median(r["retransmits"] for r in runs),
            "shares": runs[len(runs) // 2]["shares"],
            "throttled": statistics.median(r["throttled"] for r in runs),
            "runs": runs,
        }
    return summary


def run_all(
    reps: int,
    seconds: float,
    log: Callable[[str], None],
    attempt: Callable[[str, Callable[[], Any]], Any],
    add: Callable[[str, str, float, str], None],
    worker_cpu: float = 0,
) -> None:
    """`scripts/bench --only onepeer`: both peers, 1 and 4 streams, alternating configs; each
    figure goes to add(config, metric, value, unit) (the bench takes medians over reps)."""
    capped = f" cap {worker_cpu:g}" if worker_cpu else ""
    for rep in range(reps):
        for peer_kind in ("shardwg", "wggo"):
            for workers, spread in configs(worker_cpu):
                label = f"shardwg-{peer_kind} {workers}w spread {spread}{capped}"
                log(f"rep {rep + 1}/{reps} onepeer {label}")

                def one(peer_kind: str = peer_kind, workers: int = workers,
                        spread: str = spread, label: str = label) -> None:  # fmt: skip
                    with Harness() as h:
                        op = OnePeer(h, peer_kind, workers, spread, worker_cpu=worker_cpu)
                        for streams in (1, 4):
                            for a_sends in (True, False):
                                res = op.tcp(streams, seconds, a_sends)
                                cfg = f"{label} {streams}s {'A->B' if a_sends else 'B->A'}"
                                add(cfg, "gbit_s", res["gbit_s"], "Gbit/s")
                                add(cfg, "retransmits", float(res["retransmits"]), "segments")
                                add(cfg, "min_worker_share", min(res["shares"]), "fraction")
                                if worker_cpu:
                                    add(cfg, "throttled", res["throttled"], "fraction")

                attempt(label, one)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peer", choices=("wggo", "shardwg"), default="wggo")
    p.add_argument("--streams", default="1,4")
    p.add_argument("--out")
    p.add_argument("--worker-cpu", type=float, default=0, metavar="CORES",
                   help="cap every shardwg worker at this many cores (0: no cap)")
    p.add_argument("--cap-period-us", type=int, default=PERIOD_US, metavar="US",
                   help="the cap's period: a worker that spends its budget stalls for the "
                   "rest of it, and a long stall reorders a spread flow (default 10000)")
    a = p.parse_args(argv)
    summary = run(a.seconds, a.reps, a.peer, [int(s) for s in a.streams.split(",")],
                  a.worker_cpu, a.cap_period_us)  # fmt: skip
    text = json.dumps(summary, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    for key, s in summary.items():
        print(f"{key:32s} {s['gbit_s']:.3f} Gbit/s  retrans {s['retransmits']:.0f}  "
              f"shares {s['shares']}  throttled {s['throttled']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
