"""`python -m lab.bench`: shardwg against wireguard-go, measured on this machine.

In throwaway network namespaces it runs wireguard-go<->wireguard-go, shardwg<->wireguard-go and
shardwg<->shardwg (alternating within every repetition) and measures, in both directions (A
receives, A sends), iperf3 TCP with 1 and 4 streams and the best UDP packet rate at <= 1% loss;
idle ping RTT, CPU seconds per Gbit/s of each end's tunnel processes, their memory; handshakes
per second from a generator of valid initiations; a shardwg gateway with 1 vs 2 workers serving
4 peers; and a syscall-free microbenchmark of open and seal per packet (native and pure Python).
It prints progress, then tables with ratios and the targets (PASS/MISS), and writes bench.json,
bench.md and bench.png to --out.

The wireguard-go raced is `--wireguard-go PATH` (default: the one on PATH); its version
(`wireguard-go --version`) goes into the report.

Needs root, wireguard-go, wg and iperf3 (`scripts/bench` sets the machine up and runs this).
Everything it starts is stopped by PID and its namespaces deleted by name, also on errors,
Ctrl-C, SIGTERM or the time limit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from lab import bench_micro, bench_onepeer, bench_peers, bench_report
from lab.bench_args import EXTRA_SECTIONS, NETNS_SECTIONS, SECTIONS, SUFFIX, parse_args
from lab.bench_env import BinaryError, machine_facts, use_wireguard_go
from lab.bench_measure import series
from lab.bench_pairs import (
    BASELINE,
    DIRECTIONS,
    LABELS,
    PAIRS,
    Pair,
    handshake_run,
    scaling_run,
)
from lab.harness import Harness, exit_on_signal, lab_problems
from lab.iperf import iperf3_problem
from lab.loadgen import x25519_cost_us

HANDSHAKE_CONFIGS = {"wggo": ("wggo", 1), "shardwg-1w": ("shardwg", 1),
                     "shardwg-2w": ("shardwg", 2)}  # fmt: skip
SCALING_WORKERS = (1, 2)
MIB = 1024.0


class BenchTimeout(Exception):
    """The whole-run time limit passed (SIGALRM); teardown still runs."""


def rotate(items: list[Any], n: int) -> list[Any]:
    """items started at position n: each repetition runs the configurations in another order."""
    k = n % len(items) if items else 0
    return items[k:] + items[:k]


class Results:
    """Samples per (section, config, metric), details per (section, config), failures."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, dict[str, list[float]]]] = {}
        self.units: dict[tuple[str, str], str] = {}
        self.details: dict[str, dict[str, list[Any]]] = {}
        self.errors: list[dict[str, Any]] = []

    def add(self, section: str, config: str, metric: str, value: float, unit: str) -> None:
        self.samples.setdefault(section, {}).setdefault(config, {}).setdefault(metric, [])
        self.samples[section][config][metric].append(float(value))
        self.units[(section, metric)] = unit

    def detail(self, section: str, config: str, value: Any) -> None:
        self.details.setdefault(section, {}).setdefault(config, []).append(value)

    def sections(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section, configs in self.samples.items():
            out[section] = {}
            for config, metrics in configs.items():
                entry: dict[str, Any] = {
                    m: series(v, self.units[(section, m)]) for m, v in metrics.items()
                }
                if config in self.details.get(section, {}):
                    entry["detail"] = self.details[section][config]
                out[section][config] = entry
        return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.only: set[str] = set(args.only)
        self.results = Results()
        self.started = time.monotonic()
        self.meta: dict[str, Any] = {}
        self.current = ""

    # ---- progress -------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {self.current}{text}", flush=True)

    def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; a failure is recorded and reported, and the run goes on."""
        try:
            return fn()
        except (BenchTimeout, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - recorded, the other measurements still run
            msg = f"{type(e).__name__}: {e}"
            self.results.errors.append({"what": f"{self.current}{what}", "error": msg[-2000:]})
            self.log(f"{what}: ERROR {msg.splitlines()[0][:300]}")
            return None

    def wants(self, *sections: str) -> bool:
        return bool(self.only.intersection(sections))

    # ---- the run --------------------------------------------------------------------------

    def estimate(self) -> float:
        a, s = self.args, self.args.seconds
        d = len(a.directions)
        per_pair = 6.0 + (d * (s + 2) if self.wants("tcp1", "cpu", "rss") else 0)
        per_pair += (d * (s + 2) if self.wants("tcp4") else 0) + (3 if self.wants("rtt") else 0)
        per_pair += d * 5 * (a.udp_seconds + 1) if self.wants("udp") else 0
        total = a.reps * len(PAIRS) * per_pair
        total += a.reps * len(HANDSHAKE_CONFIGS) * (a.hs_seconds + 8) if self.wants(
            "handshakes") else 0  # fmt: skip
        total += a.reps * len(SCALING_WORKERS) * (s + 15) if self.wants("scaling") else 0
        if self.wants("tcp1", "udp"):
            total += s + 8 * (a.udp_seconds + 1)
        total += a.reps * 4 if self.wants("micro") else 0
        onepeer_runs = 2 * len(bench_onepeer.configs(a.worker_cpu))  # both peer kinds
        total += a.reps * onepeer_runs * (8 * (s + 2) + 20) if self.wants("onepeer") else 0
        return total + (240 if self.wants("peers") else 0)

    def run(self) -> None:
        a = self.args
        self.meta["loadavg_start"] = os.getloadavg()
        if self.wants(*NETNS_SECTIONS, *EXTRA_SECTIONS):
            wg = self.meta["wireguard_go"]
            self.log(f"racing wireguard-go {wg['version']} ({wg['path']})")
        if self.meta["loadavg_start"][0] > 0.5:
            self.log(f"WARNING: load average {self.meta['loadavg_start'][0]:.2f} before the "
                     "start: other work shares these CPUs, numbers will be lower and "
                     "noisier")  # fmt: skip
        self.log(f"sections {','.join(s for s in SECTIONS + EXTRA_SECTIONS if s in self.only)}; "
                 f"{a.reps} "
                 f"repetition(s), {a.seconds:g} s per iperf3 run, {a.udp_seconds:g} s per UDP "
                 f"step, {a.hs_seconds:g} s per handshake run; about "
                 f"{self.estimate() / 60:.0f} min")  # fmt: skip
        if self.wants("handshakes"):
            self.meta["x25519"] = x25519_cost_us()
            x = self.meta["x25519"]
            self.log(f"X25519: {x['dh_us']:.1f} µs per DH, {x['base_us']:.1f} µs per public key")
        for rep in range(a.reps):
            tag = f"rep {rep + 1}/{a.reps} "
            if self.wants("micro"):
                self.micro(tag)
            if rep == 0 and self.wants("tcp1", "udp"):
                self.pair(tag, BASELINE)
            for key in rotate(list(PAIRS), rep):
                if self.wants("tcp1", "tcp4", "udp", "rtt", "cpu", "rss"):
                    self.pair(tag, key)
            if self.wants("handshakes"):
                for cfg in rotate(list(HANDSHAKE_CONFIGS), rep):
                    self.handshakes(tag, cfg)
            if self.wants("scaling"):
                for w in rotate(list(SCALING_WORKERS), rep):
                    self.scaling(tag, w)
        self.current = ""
        if self.wants("onepeer"):  # lab/bench_onepeer.py: one peer over 1 and 2 workers
            self.current = "onepeer "
            bench_onepeer.run_all(a.reps, a.seconds, self.log, self.attempt,
                                  lambda c, m, v, u: self.results.add("onepeer", c, m, v, u),
                                  a.worker_cpu)  # fmt: skip
            self.current = ""
            for cfg, ms in self.results.sections().get("onepeer", {}).items():
                self.log(f"onepeer {cfg}: " + ", ".join(
                    f"{m} {s['median']:.3f}" for m, s in ms.items() if m != "detail"))  # fmt: skip
        if self.wants("peers"):  # once: lab/bench_peers.py (its own table, its own targets)
            self.current = "peers "
            bench_peers.run_all(
                bench_peers.SIZES,
                self.log,
                self.attempt,
                lambda c, m, v, u: self.results.add("peers", c, m, v, u),
            )
            self.current = ""
            figures = self.results.sections().get("peers", {})
            self.log("\n" + bench_peers.table(
                {c: {m: s["median"] for m, s in ms.items() if m != "detail"}
                 for c, ms in figures.items()}))  # fmt: skip

    def pair(self, tag: str, key: str) -> None:
        a, r = self.args, self.results
        self.current = f"{tag}{LABELS[key]:<18} "
        with Harness() as h:
            p = self.attempt("set-up", lambda: Pair(h, key, a.workers))
            if p is None:
                return
            if key != BASELINE:
                hs = self.attempt("handshake", p.warm)
                if hs is None:
                    return
                self.log(f"up, first ping (with handshake) {hs:.1f} ms")
            if self.wants("rtt") and key != BASELINE:
                rtts = self.attempt("rtt", lambda: p.rtt(a.ping_count))
                if rtts:
                    rtts_sorted = sorted(rtts)
                    r.add("rtt", key, "ms", rtts_sorted[len(rtts) // 2], "ms")
                    r.detail("rtt", key, rtts)
                    self.log(f"idle ping RTT median {rtts_sorted[len(rtts) // 2]:.3f} ms "
                             f"({len(rtts)}/{a.ping_count} replies)")  # fmt: skip
            # the veth baseline is symmetric: one direction is its ceiling for both
            dirs = a.directions[:1] if key == BASELINE else a.directions
            if self.wants("tcp1", "cpu", "rss") or (key == BASELINE and self.wants("tcp1")):
                for d in dirs:
                    self.tcp(p, key, 1, d)
            if self.wants("tcp4") and key != BASELINE:
                for d in dirs:
                    self.tcp(p, key, 4, d)
            if self.wants("rss") and key != BASELINE:
                mem = self.attempt("memory", p.memory)
                if mem:
                    for side, procs in mem.items():
                        r.add("rss", key, f"rss_mib_{side}",
                              sum(m["rss_kib"] for m in procs) / MIB, "MiB")  # fmt: skip
                        r.add("rss", key, f"pss_mib_{side}",
                              sum(m["pss_kib"] for m in procs) / MIB, "MiB")  # fmt: skip
                    r.detail("rss", key, mem)
                    self.log("memory " + "; ".join(
                        f"{side}: " + ", ".join(f"{m['role']} {m['rss_kib'] / MIB:.1f} MiB"
                                                for m in procs)
                        for side, procs in mem.items()))  # fmt: skip
            if self.wants("udp"):
                for d in dirs:
                    self.udp(p, key, d)
            self.log("tearing down")

    def udp(self, p: Pair, key: str, direction: str) -> None:
        a, r, sec = self.args, self.results, "udp" + SUFFIX[direction]
        rev = direction == "send"
        u = self.attempt(sec, lambda: p.udp_best(a.udp_seconds, say=self.log, reverse=rev))
        if not u:
            return
        r.detail(sec, key, u["steps"])
        if u["best"]:
            r.add(sec, key, "best_pps", u["best"]["received_pps"], "packets/s")
            r.add(sec, key, "best_mbit_s", u["best"]["received_mbit_s"], "Mbit/s")
            self.log(f"udp ({DIRECTIONS[direction]}) best {u['best']['received_pps']:.0f} "
                     f"packets/s at {u['best']['loss_percent']:.2f}% loss")  # fmt: skip
        else:
            self.log(f"udp ({DIRECTIONS[direction]}): no rate with <= 1% loss")

    def tcp(self, p: Pair, key: str, streams: int, direction: str) -> None:
        r, sec = self.results, f"tcp{streams}{SUFFIX[direction]}"
        what = f"tcp {streams} stream(s), {DIRECTIONS[direction]}"
        out = self.attempt(what, lambda: p.tcp(streams, self.args.seconds,
                                               reverse=direction == "send"))  # fmt: skip
        if not out:
            return
        r.add(sec, key, "gbit_s", out["gbit_s"], "Gbit/s")
        r.add(sec, key, "retransmits", out["retransmits"], "segments")
        r.add(sec, key, "machine_busy", out["machine_busy"], "fraction of all CPUs")
        cpu = ""
        for side in "ab":
            if f"cores_{side}" in out:
                r.add("cpu", key, f"{sec}_cores_{side}", out[f"cores_{side}"], "cores")
                r.add("cpu", key, f"{sec}_cores_per_gbit_{side}", out[f"cores_per_gbit_{side}"],
                      "cores per Gbit/s")  # fmt: skip
                cpu += f", end {side.upper()} {out[f'cores_{side}']:.2f} cores"
        self.log(f"{what}: {out['gbit_s']:.3f} Gbit/s, "
                 f"{out['retransmits']:.0f} retransmits{cpu}; machine "
                 f"{100 * out['machine_busy']:.0f}% busy")  # fmt: skip

    def micro(self, tag: str) -> None:
        """One repetition of the syscall-free open/seal microbenchmark, in this process."""
        self.current = f"{tag}{'microbenchmark':<18} "
        res = self.attempt("micro", lambda: bench_micro.run_once(self.args.micro_batches))
        if res is None:
            return
        for path, metrics in res.items():
            for m, v in metrics.items():
                self.results.add("micro", path, m, v, "packets/s per core")
        self.log("; ".join(f"{path}: " + ", ".join(f"{m.removesuffix('_pps')} {v / 1e3:.0f}k/s"
                                                   for m, v in sorted(metrics.items()))
                           for path, metrics in res.items()))  # fmt: skip

    def handshakes(self, tag: str, cfg: str) -> None:
        kind, workers = HANDSHAKE_CONFIGS[cfg]
        self.current = f"{tag}{'handshakes ' + cfg:<18} "
        with Harness() as h:
            res = self.attempt("loadgen", lambda: handshake_run(h, kind, workers,
                                                                self.args.hs_seconds))  # fmt: skip
        if res is None:
            return
        r = self.results
        r.add("handshakes", cfg, "per_s", res.handshakes_per_s, "handshakes/s")
        r.add("handshakes", cfg, "cores", res.responder_cores, "cores")
        r.add("handshakes", cfg, "per_core_s", res.handshakes_per_core_s, "handshakes per core-s")
        r.add("handshakes", cfg, "latency_ms", res.latency_ms_median, "ms")
        r.add("handshakes", cfg, "cookie_replies", res.cookie_replies, "replies")
        r.add("handshakes", cfg, "timeouts", res.timeouts, "initiations")
        r.detail("handshakes", cfg, {k: getattr(res, k) for k in (
            "seconds", "sent", "responses", "cookie_replies", "cookies_accepted", "timeouts",
            "pool", "generated_live", "responder_cpu_s", "generator_cpu_s")})  # fmt: skip
        self.log(f"{res.handshakes_per_s:.0f} handshakes/s, responder {res.responder_cores:.2f} "
                 f"cores = {res.handshakes_per_core_s:.0f} per core-second; "
                 f"{res.cookie_replies} cookie replies, {res.timeouts} timeouts, generator "
                 f"{res.generator_cpu_s / max(res.seconds, 1e-9):.2f} cores, "
                 f"{res.generated_live} made live")  # fmt: skip

    def scaling(self, tag: str, workers: int) -> None:
        cap = self.args.worker_cpu
        cfg = f"shardwg-{workers}w" + (f" cap {cap:g}" if cap else "")
        self.current = f"{tag}{'scaling ' + cfg:<18} "
        with Harness() as h:
            out = self.attempt("4 peers", lambda: scaling_run(
                h, workers, self.args.seconds, f"sc{workers}-", worker_cpu=cap))  # fmt: skip
            self.log("tearing down")
        if out is None:
            return
        units = {"gbit_s": "Gbit/s", "cores": "cores", "peer_cores": "cores",
                 "machine_busy": "fraction of all CPUs", "min_peer_gbit_s": "Gbit/s",
                 "throttled": "fraction of periods"}  # fmt: skip
        for m, unit in units.items():
            if m in out:
                self.results.add("scaling", cfg, m, out[m], unit)
        self.log(f"4 peers x 1 TCP stream: {out['gbit_s']:.3f} Gbit/s in all, gateway "
                 f"{out['cores']:.2f} cores, the 4 wireguard-go peers {out['peer_cores']:.2f} "
                 f"cores, machine {100 * out['machine_busy']:.0f}% busy")  # fmt: skip

    # ---- output ---------------------------------------------------------------------------

    def document(self, status: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "meta": {
                **self.meta,
                **machine_facts(),
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "command": " ".join(shlex.quote(x) for x in self.args.argv),
                "reps": self.args.reps,
                "seconds": self.args.seconds,
                "udp_seconds": self.args.udp_seconds,
                "handshake_seconds": self.args.hs_seconds,
                "pair_workers": self.args.workers,
                "sections": [s for s in SECTIONS if s in self.only],
                "directions": self.args.directions,
                "micro": {**bench_micro.describe(), "batches": self.args.micro_batches},
                "runtime_s": round(time.monotonic() - self.started, 1),
                "loadavg_end": os.getloadavg(),
                "status": status,
            },
            "sections": self.results.sections(),
            "errors": self.results.errors,
        }
        doc["targets"] = bench_report.targets(doc)
        return doc


def _raise_timeout(_signum: int, _frame: FrameType | None) -> None:
    raise BenchTimeout()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__)
    out = Path(args.out)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        notes = bench_report.write_outputs(doc, out)
        print(bench_report.markdown(doc))
        for n in notes:
            print(n, file=sys.stderr)
        return 0
    bench = Bench(args)
    if bench.wants(*NETNS_SECTIONS, *EXTRA_SECTIONS):
        try:
            bench.meta["wireguard_go"] = use_wireguard_go(args.wireguard_go)
        except BinaryError as e:
            print(f"bench cannot run here: {e}", file=sys.stderr)
            return 2
        problems = lab_problems(iperf3_problem())
        if problems:
            print(f"bench cannot run here: {'; '.join(problems)}", file=sys.stderr)
            return 2
    limit = args.timeout or max(600.0, 4 * bench.estimate())
    status, rc = "complete", 0
    prev = {s: signal.signal(s, exit_on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(max(1, int(limit)))
    try:
        bench.run()
    except KeyboardInterrupt:
        status, rc = "interrupted", 130
    except BenchTimeout:
        status, rc = f"time limit of {limit:.0f} s reached", 1
    except SystemExit as e:
        status, rc = f"stopped by signal ({e.code})", int(e.code) if isinstance(e.code, int) else 1
    finally:
        signal.alarm(0)
        for s, handler in prev.items():
            signal.signal(s, handler)
    bench.current = ""
    if status != "complete":
        bench.log(f"{status}: writing what was measured")
    doc = bench_report.finite(bench.document(status))
    notes = bench_report.write_outputs(doc, out)
    print("\n" + bench_report.markdown(doc), flush=True)
    for n in notes:
        print(f"NOTE: {n}", flush=True)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}"
          f"{', ' + str(out / 'bench.png') if doc['meta'].get('chart') else ''} "
          f"in {doc['meta']['runtime_s']:.0f} s", flush=True)  # fmt: skip
    if rc == 0 and doc["errors"]:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
