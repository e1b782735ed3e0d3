"""The command line of `python -m lab.bench`: sections, directions, durations, the wireguard-go
to race, and the defaults --quick changes."""

from __future__ import annotations

import argparse
import sys

from lab.bench_pairs import DIRECTIONS

SECTIONS = ("tcp1", "tcp4", "udp", "rtt", "cpu", "rss", "handshakes", "scaling", "peers",
            "micro")  # fmt: skip
NETNS_SECTIONS = SECTIONS[:-1]  # all but the in-process microbenchmark
EXTRA_SECTIONS = ("onepeer",)  # in namespaces, only when named in --only (lab/bench_onepeer.py)
SUFFIX = {"recv": "", "send": "_send"}  # section name per direction: tcp1, tcp1_send, ...


def parse_args(argv: list[str] | None, doc: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lab.bench", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, short runs (a CI smoke test, under 3 minutes)")  # fmt: skip
    p.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    p.add_argument("--seconds", type=float, help="seconds per iperf3 TCP run (10; 3 --quick)")
    p.add_argument("--udp-seconds", type=float, help="seconds per UDP rate step (seconds/2)")
    p.add_argument("--hs-seconds", type=float, help="seconds per handshake run (min(5, seconds))")
    p.add_argument("--workers", type=int, default=2,
                   help="workers of each shardwg end in the pairs (default 2)")  # fmt: skip
    p.add_argument("--ping-count", type=int, default=20, help="idle pings per pair (20)")
    p.add_argument("--out", default="bench-out", help="directory for bench.json/.md/.png")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections of {','.join(SECTIONS)} (all), or "
                        f"{','.join(EXTRA_SECTIONS)}")  # fmt: skip
    p.add_argument("--wireguard-go", metavar="PATH",
                   help="the wireguard-go binary to race (default: the one on PATH); its "
                        "version goes into the report")  # fmt: skip
    p.add_argument("--directions", default="recv,send",
                   help="recv (A receives), send (A sends) or both (default recv,send)")
    p.add_argument("--micro-batches", type=int,
                   help="batches of 64 packets per microbenchmark path (300; 60 --quick)")
    p.add_argument("--timeout", type=float, help="whole-run limit in seconds (default: 4x the "
                   "estimate, at least 10 min)")  # fmt: skip
    p.add_argument("--worker-cpu", type=float, default=0, metavar="CORES",
                   help="cap every shardwg worker at CORES of CPU in the scaling and onepeer "
                        "sections (lab/cpucap.py), so the workers, not the load generators "
                        "sharing the cores, are the bottleneck (default 0: no cap)")  # fmt: skip
    p.add_argument("--render", metavar="JSON",
                   help="re-render bench.md and bench.png from a saved bench.json")  # fmt: skip
    args = p.parse_args(argv)
    args.argv = ["python", "-m", "lab.bench", *(sys.argv[1:] if argv is None else argv)]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS + EXTRA_SECTIONS]
    if bad or not only:
        p.error(f"--only: unknown section(s) {','.join(bad)}; choose from {','.join(SECTIONS)}")
    args.only = only
    dirs = [d.strip() for d in args.directions.split(",") if d.strip()]
    if not dirs or any(d not in DIRECTIONS for d in dirs) or len(set(dirs)) != len(dirs):
        p.error(f"--directions: choose from {','.join(DIRECTIONS)}")
    args.directions = dirs
    if args.micro_batches is None:
        args.micro_batches = 60 if args.quick else 300
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if args.udp_seconds is None:
        args.udp_seconds = max(1.0, args.seconds / 2)
    if args.hs_seconds is None:
        args.hs_seconds = min(5.0, args.seconds)
    if (args.reps < 1 or args.seconds <= 0 or args.workers < 1 or args.ping_count < 1
            or args.micro_batches < 1):  # fmt: skip
        p.error("--reps, --seconds, --workers, --ping-count and --micro-batches must be positive")
    if args.worker_cpu and not 0.01 <= args.worker_cpu <= 64:
        p.error("--worker-cpu: a budget between 0.01 and 64 cores, or 0 for none")
    return args
