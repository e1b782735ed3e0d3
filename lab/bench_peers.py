"""`scripts/bench --only peers`: one gateway with 100, 1,000 and 10,000 configured peers.

Every configuration is a shardwg gateway (2 workers) in namespace A whose peers are generated
keys, each with a /32 of 10.128.0.0/9, plus one real wireguard-go peer in namespace B
(10.202.0.2) that pings the gateway (10.202.0.1) through the tunnel. Measured, in this order:

- ready: from starting `shardwg run` until every worker has built its shard and beats
  (its heartbeat word in shared memory is newer than the start); then the real peer's first
  ping (handshake included).
- PSS of the supervisor and its workers (/proc/PID/smaps_rollup, shared pages split), and
  their CPU over 10 s of idling (utime + stime), after 3 s to settle.
- `wg show IFACE dump` (median of 3 runs).
- a handshake storm: min(1,000, peers) generated peers, each from its own source address,
  initiate at once as after a restart and retransmit like WireGuard (lab/storm.py); the time
  until the last one got its response.
- `wg syncconf` removing min(1,000, half the generated peers) while the real peer pings every
  100 ms: the command's time and the share of pings answered from 1 s before it to 1 s after.

Then once: a gateway started with the real peer alone grows to 1,001 peers with one
`wg syncconf` (its time, and whether `wg show dump` lists them all).

Needs root, wireguard-go and wg. `python -m lab.bench_peers [--sizes 100,1000]` runs just this.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import secrets
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab import loadgen, storm, wgconf
from lab.bench_measure import memory
from lab.bench_pairs import TunnelEnd
from lab.harness import Harness, lab_problems
from lab.keys import keypair
from lab.netns import LabError, unique_ifname, veth_link, wait_for
from lab.ping import checksum, ping_rtts
from shardwg.observe.status import ShmReader, StatusError

SIZES = (100, 1000, 10000)
WORKERS = 2
GW, REAL = "10.201.0.1", "10.201.0.2"  # underlay (a /16: storm sources are 10.201.1.0 on)
GW_TUN, REAL_TUN = "10.202.0.1", "10.202.0.2"
PORT = 51820
REMOVE = 1000
STORM = 1000
GROW_TO = 1001
IDLE_SECONDS = 10.0
MIB = 1024.0
# (metric, unit, goal, at peers, smaller is better) for the issue-14 targets (2 workers)
TARGETS = [
    ("ready_s", "s", 10.0, 10000), ("pss_mib", "MiB", 400.0, 10000),
    ("idle_cores", "cores", 0.05, 10000), ("dump_s", "s", 2.0, 10000),
    ("remove_s", "s", 5.0, 10000), ("remove_pings_pct", "%", 90.0, 10000),
    ("grow_s", "s", 5.0, 1), ("storm_all_s", "s", 5.0, 1000),
]  # fmt: skip
Say = Callable[[str], None]


def load_ip(i: int) -> str:
    return f"10.{128 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32"


def storm_source(i: int) -> str:
    return f"10.201.{1 + i // 250}.{1 + i % 250}"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Fleet:
    """Namespaces, keys and the real wireguard-go peer, shared by one size's measurements."""

    def __init__(self, h: Harness, generated: int, sources: int) -> None:
        self.h = h
        self.a, self.b = h(2, "pk")
        veth_link(self.a, self.b, [f"{GW}/16"], [f"{REAL}/16"])
        batch = "".join(f"address add {storm_source(i)}/16 dev veth0\n" for i in range(sources))
        if batch:
            subprocess.run(["ip", "-n", self.b.name, "-batch", "-"], input=batch, text=True,
                           check=True, capture_output=True)  # fmt: skip
        self.gw_priv, self.gw_pub = keypair()
        self.load = loadgen.make_peers(generated)
        real_priv, real_pub = keypair()
        self.real = {"public_key": real_pub, "allowed_ips": [f"{REAL_TUN}/32"]}
        self.wg = h.wireguard_go(self.b, unique_ifname("pkr"), real_priv, PORT,
                                 [{"public_key": self.gw_pub, "endpoint": f"{GW}:{PORT}",
                                   "allowed_ips": [f"{GW_TUN}/32"]}],
                                 [f"{REAL_TUN}/24"], log_level="error")  # fmt: skip

    def peers(self, generated: int) -> list[dict[str, Any]]:
        return [self.real] + [{"public_key": _b64(p.public), "allowed_ips": [load_ip(i)]}
                              for i, p in enumerate(self.load[:generated])]  # fmt: skip

    def conf(self, generated: int) -> str:
        return wgconf.config_text(wgconf.interface_section(self.gw_priv, PORT),
                                  self.peers(generated))  # fmt: skip


class Gateway:
    """A started gateway of the fleet and the time it took to be ready."""

    def __init__(self, fleet: Fleet, generated: int) -> None:
        self.fleet = fleet
        self.ifname = unique_ifname("pkg")
        t0 = time.monotonic()
        self.gw = fleet.h.gateway(fleet.a, self.ifname, fleet.gw_priv, PORT,
                                  fleet.peers(generated), [f"{GW_TUN}/24"], workers=WORKERS,
                                  start_timeout=300)  # fmt: skip
        if not wait_for(lambda: self._beating(t0), 300, interval=0.05):
            raise LabError(f"{self.ifname}: workers not beating after 300 s")
        self.ready_s = time.monotonic() - t0
        self.end = TunnelEnd("shardwg", fleet.a, self.gw.proc.pid)

    def _beating(self, since: float) -> bool:
        try:
            reader = ShmReader(self.ifname)
        except StatusError:
            return False
        try:
            stats = reader.counters()
        finally:
            reader.close()
        return bool(stats) and all(s.heartbeat > since for s in stats)

    def wg(self, *args: str, timeout: float = 120) -> tuple[float, str]:
        t0 = time.monotonic()
        cp = self.fleet.a.run(["wg", *args], timeout=timeout)
        return time.monotonic() - t0, cp.stdout

    def dump_peers(self) -> int:
        return len(self.wg("show", self.ifname, "dump")[1].splitlines()) - 1

    def syncconf(self, text: str, timeout: float = 120) -> float:
        path = Path(self.gw.tmp) / "sync.conf"
        wgconf.write_secret(path, text)
        return self.wg("syncconf", self.ifname, str(path), timeout=timeout)[0]


def first_ping(fleet: Fleet) -> float:
    t0 = time.monotonic()
    if not ping_rtts(fleet.b, GW_TUN, count=1, timeout=30):
        raise LabError("the real peer got no reply through the tunnel in 30 s")
    return time.monotonic() - t0


def ping_until(addr: str, stop: str, interval: float = 0.1) -> tuple[int, int]:
    """In the pinging namespace: echo requests every `interval` until the file `stop` exists,
    then 1 s more for late replies; returns (sent, answered)."""
    ident = secrets.randbits(16)
    sent = 0
    got: set[int] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        next_send, stop_at = 0.0, math.inf
        while time.monotonic() < stop_at + 1.0:
            now = time.monotonic()
            if stop_at == math.inf and now >= next_send:
                if os.path.exists(stop):
                    stop_at = now
                    continue
                sent += 1
                body = struct.pack("!HH", ident, sent) + b"shardwg-peers"
                hdr = struct.pack("!BBH", 8, 0, 0)
                with contextlib.suppress(OSError):
                    s.sendto(struct.pack("!BBH", 8, 0, checksum(hdr + body)) + body, (addr, 0))
                next_send = now + interval
            if not select.select([s], [], [], 0.02)[0]:
                continue
            pkt = s.recv(2048)
            icmp = pkt[(pkt[0] & 0x0F) * 4 :]
            if len(icmp) >= 8 and icmp[0] == 0:
                rid, rseq = struct.unpack_from("!HH", icmp, 4)
                if rid == ident and 0 < rseq <= sent:
                    got.add(rseq)
    return sent, len(got)


class Pinger:
    """The real peer pinging the gateway through the tunnel in the background."""

    def __init__(self, fleet: Fleet, tmp: str) -> None:
        self.stop_path = os.path.join(tmp, f"stop-ping-{secrets.token_hex(4)}")
        self.result: list[tuple[int, int]] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(
                fleet.b.call(ping_until, GW_TUN, self.stop_path, timeout=600)
            ),
            daemon=True,
        )
        self.thread.start()

    def share(self) -> float:
        """Stop; percent of echo requests answered."""
        Path(self.stop_path).touch()
        self.thread.join(timeout=30)
        if not self.result or not self.result[0][0]:
            raise LabError("the pinger returned nothing")
        sent, got = self.result[0]
        return 100.0 * got / sent


def measure_size(h: Harness, n: int, say: Say, out: dict[str, float]) -> None:
    """Every per-size figure for a gateway of n configured peers (n - 1 generated), into out
    as it is measured (what came before an error is kept)."""
    generated = n - 1
    storm_n = min(STORM, generated)
    fleet = Fleet(h, generated, storm_n)
    gw = Gateway(fleet, generated)
    out["ready_s"] = gw.ready_s
    say(f"{n} peers: ready in {gw.ready_s:.2f} s")
    out["first_ping_s"] = first_ping(fleet)
    time.sleep(3)
    cpu0, t0 = gw.end.cpu(), time.monotonic()
    time.sleep(IDLE_SECONDS)
    out["idle_cores"] = (gw.end.cpu() - cpu0) / (time.monotonic() - t0)
    out["pss_mib"] = sum(memory(t.pid)["pss_kib"] for t in gw.end.tracked()) / MIB
    dumps = [gw.wg("show", gw.ifname, "dump") for _ in range(3)]
    out["dump_s"] = statistics.median(t for t, _ in dumps)
    listed = len(dumps[0][1].splitlines()) - 1
    say(f"{n} peers: first ping {out['first_ping_s']:.2f} s, idle {out['idle_cores']:.3f} "
        f"cores, PSS {out['pss_mib']:.0f} MiB, wg show dump {out['dump_s']:.2f} s "
        f"({listed} peers)")  # fmt: skip
    if listed != n:
        raise LabError(f"wg show dump listed {listed} peers, not {n}")
    res: storm.StormResult = fleet.b.call(
        storm.storm, (GW, PORT), base64.b64decode(fleet.gw_pub), fleet.load[:storm_n],
        [storm_source(i) for i in range(storm_n)], timeout=120,
    )  # fmt: skip
    out["storm_peers"] = res.peers
    out["storm_served"] = res.served
    if res.all_served_s is not None:
        out["storm_all_s"] = res.all_served_s
    say(f"{n} peers: storm of {res.peers}: {res.served} served, all in "
        f"{'—' if res.all_served_s is None else f'{res.all_served_s:.2f} s'}, median "
        f"{res.median_s or 0:.2f} s, {res.cookie_replies} cookie replies, "
        f"{res.retransmissions} retransmissions")  # fmt: skip
    remove = min(REMOVE, generated // 2)
    pinger = Pinger(fleet, gw.gw.tmp)
    time.sleep(1)
    took: float | None = None
    failed = ""
    try:
        took = gw.syncconf(fleet.conf(generated - remove))
    except subprocess.TimeoutExpired:
        failed = "> 120 s (timed out)"
    except LabError as e:  # wg's refusal, e.g. "Message too long"
        failed = "failed: " + str(e).strip().splitlines()[-1]
    finally:
        time.sleep(1)
        out["remove_pings_pct"] = pinger.share()
    out["removed"] = remove
    if took is not None:
        out["remove_s"] = took
    say(f"{n} peers: wg syncconf removing {remove}: "
        f"{failed or f'{took:.2f} s'}, real peer's pings "
        f"{out['remove_pings_pct']:.0f}% answered")  # fmt: skip


def measure_grow(h: Harness, say: Say, out: dict[str, float]) -> None:
    fleet = Fleet(h, GROW_TO - 1, 0)
    gw = Gateway(fleet, 0)
    first_ping(fleet)
    try:
        took = gw.syncconf(fleet.conf(GROW_TO - 1))
    except LabError as e:
        say(f"grow 1 -> {GROW_TO}: wg syncconf failed: {str(e).strip().splitlines()[-1]}")
        return
    out["grow_s"] = took
    listed = gw.dump_peers()
    out["grow_listed"] = listed
    say(f"grow 1 -> {GROW_TO}: {took:.2f} s, wg show dump lists {listed}")


def run_all(sizes: tuple[int, ...], say: Say, attempt: Callable[[str, Callable[[], Any]], Any],
            add: Callable[[str, str, float, str], None]) -> None:  # fmt: skip
    """Every size, then the grow case; figures go to add(config, metric, value, unit)."""
    for n in sizes:
        got: dict[str, float] = {}
        with Harness() as h:
            attempt(f"{n} peers", lambda: measure_size(h, n, say, got))  # noqa: B023
        for k, v in got.items():
            add(str(n), k, v, UNITS.get(k, ""))
    grown: dict[str, float] = {}
    with Harness() as h:
        attempt("grow", lambda: measure_grow(h, say, grown))
    for k, v in grown.items():
        add("1", k, v, UNITS.get(k, ""))


UNITS = {"ready_s": "s", "first_ping_s": "s", "idle_cores": "cores", "pss_mib": "MiB",
         "dump_s": "s", "storm_all_s": "s", "remove_s": "s", "remove_pings_pct": "%",
         "grow_s": "s"}  # fmt: skip


def table(figures: dict[str, dict[str, float]]) -> str:
    """Markdown: one column per size, then the targets with PASS/MISS."""
    sizes = sorted((c for c in figures if c != "1"), key=int)
    rows = [("ready (s)", "ready_s", 2), ("first ping of the real peer (s)", "first_ping_s", 2),
            ("PSS, all processes (MiB)", "pss_mib", 0), ("idle CPU (cores)", "idle_cores", 3),
            ("`wg show dump` (s)", "dump_s", 2), ("storm: peers", "storm_peers", 0),
            ("storm: served", "storm_served", 0), ("storm: all served (s)", "storm_all_s", 2),
            ("`wg syncconf` removing (peers)", "removed", 0), ("... took (s)", "remove_s", 2),
            ("... real peer's pings answered (%)", "remove_pings_pct", 0)]  # fmt: skip
    lines = ["| peers | " + " | ".join(f"{int(s):,}" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]  # fmt: skip
    for label, key, digits in rows:
        cells = [f"{figures[s][key]:.{digits}f}" if key in figures[s] else "—" for s in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    grow = figures.get("1", {})
    lines += ["", f"grow 1 -> {GROW_TO} peers with one `wg syncconf`: "
              + (f"{grow['grow_s']:.2f} s, {grow.get('grow_listed', 0):.0f} listed"
                 if "grow_s" in grow else "failed"), "",
              "| target | goal | measured | verdict |", "|---|---:|---:|---|"]  # fmt: skip
    for key, unit, goal, at in TARGETS:
        v = figures.get(str(at), {}).get(key)
        higher = key == "remove_pings_pct"
        met = None if v is None else (v >= goal if higher else v <= goal)
        lines.append(f"| {key} at {at:,} peers | {'≥' if higher else '≤'} {goal:g} {unit} | "
                     f"{'not measured' if v is None else f'{v:.3g} {unit}'} | "
                     f"{ {True: 'PASS', False: 'MISS', None: '—'}[met]} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench_peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--out", default="bench-out/peers.json")
    args = p.parse_args(argv)
    problems = lab_problems()
    if problems:
        print(f"cannot run here: {'; '.join(problems)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    figures: dict[str, dict[str, float]] = {}
    errors: list[str] = []

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {text}", flush=True)

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported; the other sizes still run
            errors.append(f"{what}: {type(e).__name__}: {e}")
            say(f"{what}: ERROR {type(e).__name__}: {str(e)[:300]}")
            return None

    def add(config: str, metric: str, value: float, _unit: str) -> None:
        figures.setdefault(config, {})[metric] = value

    run_all(tuple(int(s) for s in args.sizes.split(",")), say, attempt, add)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"figures": figures, "errors": errors}, indent=1))
    print("\n" + table(figures))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
