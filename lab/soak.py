"""`python -m lab.soak`: a long run of mixed traffic, handshakes and peer churn against
one gateway, watching its memory.

Builds a star (gateway `soak-site-a`, bridged underlay, wireguard-go peers), then until the
time is up repeats rounds of: pings from every peer, sha256-checked TCP transfers from one or
two random peers, now and then a forced new handshake (the peer drops the gateway with
`wg set ... remove` and re-adds it), extra peers added to and removed from the gateway with
`wg set` (churn), and a SIGHUP reload when no churn peers are in place. A sampler records the
RSS of every gateway process (supervisor and workers) every `--sample` seconds.

At the end it prints the samples and judges memory flat when the average of the last third
is at most `--rss-tolerance` (10%) above the average of the middle third (the first third is
warm-up). Exit status: 0 when every check passed and RSS is flat, 1 otherwise, 2 when the
machine cannot run it. `scripts/soak` is the wrapper; needs root.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from lab.harness import Harness, exit_on_signal, lab_problems
from lab.hostile import rss_kib
from lab.keys import keypair
from lab.ping import ping
from lab.topology import GW_PORT, Star, StarPeer
from lab.transfer import Transfer
from shardwg.observe.status import StatusError, read_status

TRANSFER_PORT0 = 7000
MiB = 1 << 20


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class Sample:
    t: float  # seconds since the start
    per_pid: dict[int, int]  # pid -> RSS KiB (supervisor first)

    @property
    def total(self) -> int:
        return sum(self.per_pid.values())


@dataclass
class RssVerdict:
    flat: bool | None  # None: too few samples to judge
    middle_kib: float
    last_kib: float

    @property
    def growth(self) -> float:
        return self.last_kib / self.middle_kib - 1 if self.middle_kib else 0.0


def judge_rss(totals: list[int], tolerance: float) -> RssVerdict:
    """Flat when the last third's average is at most `tolerance` above the middle third's."""
    n = len(totals)
    if n < 6:
        return RssVerdict(None, 0.0, 0.0)
    third = n // 3
    middle = totals[third : 2 * third]
    last = totals[n - third :]
    m, lst = sum(middle) / len(middle), sum(last) / len(last)
    return RssVerdict(lst <= m * (1 + tolerance), m, lst)


class RssSampler(threading.Thread):
    """Samples the RSS of every gateway process every `interval` seconds (pids re-read from
    the gateway's status each time, so a replaced worker is followed)."""

    def __init__(self, ifname: str, interval: float, t0: float) -> None:
        super().__init__(daemon=True)
        self.ifname, self.interval, self.t0 = ifname, interval, t0
        self.samples: list[Sample] = []
        self.errors = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        try:
            st = read_status(self.ifname, interval=0)
        except StatusError:
            self.errors += 1
            return
        pids = [st.supervisor_pid, *(w.pid for w in st.worker_stats)]
        self.samples.append(Sample(time.monotonic() - self.t0, {p: rss_kib(p) for p in pids}))

    def run(self) -> None:
        self.sample()
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


@dataclass
class Tally:
    rounds: int = 0
    pings_ok: int = 0
    pings_failed: int = 0
    transfers_ok: int = 0
    transferred: int = 0
    rehandshakes_ok: int = 0
    churn_added: int = 0
    churn_removed: int = 0
    reloads: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failures.append(what)
        say(f"    FAILED: {what}")


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.harness = Harness()
        self.star = Star(self.harness, args.peers, name="soak-")
        self.tally = Tally()
        self.extra: list[str] = []  # churn peers' public keys currently on the gateway
        self.port = TRANSFER_PORT0
        self.started = time.monotonic()
        self.sampler: RssSampler | None = None

    # ------------------------------------------------------------------ actions
    def wg_gw(self, *args: str) -> str:
        assert self.star.gw_ns is not None
        return self.star.gw_ns.run(["wg", *args]).stdout

    def pings(self) -> None:
        for p in self.star.peers:
            if ping(p.ns, self.star.gw_tunnel4, count=3, timeout=10):
                self.tally.pings_ok += 1
            else:
                self.tally.pings_failed += 1
                self.tally.fail(f"{p.name}: pings to the gateway went unanswered")

    def transfers(self) -> None:
        assert self.star.gw_ns is not None
        k = min(len(self.star.peers), self.rng.choice((1, 1, 2)))
        chosen = self.rng.sample(self.star.peers, k)
        size = self.args.transfer_mib * MiB
        runs = []
        for p in chosen:
            self.port = TRANSFER_PORT0 + (self.port + 1 - TRANSFER_PORT0) % 1000
            t = Transfer(self.star.gw_ns, p.ns, self.star.gw_tunnel4, self.port, size,
                         seed=self.rng.getrandbits(31), timeout=120)  # fmt: skip
            runs.append((p, t, t.start_client()))
        for p, t, c in runs:
            try:
                res = t.finish(c)
            except Exception as e:  # noqa: BLE001 - a failed transfer is a finding
                self.tally.fail(f"{p.name}: transfer failed: {e}")
                continue
            if res.ok and res.received_bytes == size:
                self.tally.transfers_ok += 1
                self.tally.transferred += size
                say(f"    {p.name}: {size // MiB} MiB, sha256 ok, {res.mbit_s:.0f} Mbit/s")
            else:
                self.tally.fail(f"{p.name}: transfer corrupted or short: {res}")

    def rehandshake(self) -> None:
        p: StarPeer = self.rng.choice(self.star.peers)
        assert p.wg is not None
        gw_pub = self.star.gw_public_key
        before = p.wg.latest_handshake(gw_pub)
        time.sleep(1.1)  # latest-handshake has one-second resolution
        p.wg.set_peer(gw_pub, remove=True)
        p.wg.set_peer(
            gw_pub,
            allowed_ips=[f"{self.star.tunnel_net}.0.0/16", f"{self.star.tunnel6_prefix}/64"],
            endpoint=f"{self.star.gw_underlay}:{GW_PORT}",
        )
        if ping(p.ns, self.star.gw_tunnel4, count=2, timeout=15) and (
            p.wg.latest_handshake(gw_pub) > before
        ):
            self.tally.rehandshakes_ok += 1
            say(f"    {p.name}: forced a new handshake")
        else:
            self.tally.fail(f"{p.name}: no new handshake after re-adding the gateway")

    def churn(self) -> None:
        assert self.star.gateway is not None
        ifname = self.star.gateway.ifname
        if self.extra:
            for pub in self.extra:
                self.wg_gw("set", ifname, "peer", pub, "remove")
            self.tally.churn_removed += len(self.extra)
            say(f"    churn: removed {len(self.extra)} extra peer(s)")
            self.extra = []
        else:
            base = 200 + self.rng.randrange(50)
            for i in range(self.args.churn):
                _priv, pub = keypair()
                self.wg_gw("set", ifname, "peer", pub, "allowed-ips",
                           f"{self.star.tunnel_net}.{base}.{i + 1}/32")  # fmt: skip
                self.extra.append(pub)
            self.tally.churn_added += len(self.extra)
            say(f"    churn: added {len(self.extra)} extra peer(s)")
        listed = set(self.wg_gw("show", ifname, "peers").split())
        missing = [k for k in self.extra if k not in listed]
        wanted = len(self.star.peers) + len(self.extra)
        if missing or len(listed) != wanted:
            self.tally.fail(f"churn: gateway lists {len(listed)} peers, expected {wanted}")

    def reload(self) -> None:
        gw = self.star.gateway
        assert gw is not None
        if self.extra:
            return
        os.kill(gw.proc.pid, signal.SIGHUP)
        self.tally.reloads += 1
        say("    SIGHUP: reload with an unchanged config")

    # ------------------------------------------------------------------ run
    def alive(self) -> bool:
        gw = self.star.gateway
        return gw is not None and gw.proc.poll() is None

    def run(self) -> None:
        a = self.args
        say(f"==> soak: {a.peers} wireguard-go peer(s), {a.workers} worker(s), "
            f"{a.minutes:g} min, RSS every {a.sample:g} s")  # fmt: skip
        self.star.build().start(workers=a.workers)
        assert self.star.gateway is not None
        for p in self.star.peers:
            if not ping(p.ns, self.star.gw_tunnel4, count=2, timeout=15):
                raise RuntimeError(f"{p.name}: no tunnel to the gateway at start")
        self.started = time.monotonic()
        self.sampler = RssSampler(self.star.gateway.ifname, a.sample, self.started)
        self.sampler.start()
        deadline = self.started + a.minutes * 60
        actions = [self.rehandshake, self.churn, self.churn, self.reload]
        while time.monotonic() < deadline and self.alive():
            t_round = time.monotonic()
            self.tally.rounds += 1
            last = self.sampler.samples[-1].total / 1024 if self.sampler.samples else 0.0
            say(f"  round {self.tally.rounds} at {t_round - self.started:.0f} s "
                f"(gateway RSS {last:.1f} MiB)")  # fmt: skip
            self.pings()
            self.transfers()
            self.rng.choice(actions)()
            rest = a.round_seconds - (time.monotonic() - t_round)
            if rest > 0:
                time.sleep(min(rest, max(0.0, deadline - time.monotonic())))
        self.sampler.stop()
        if not self.alive():
            self.tally.fail("the gateway exited during the soak")

    def report(self) -> bool:
        """Print the summary; True when everything passed and RSS is flat."""
        t = self.tally
        elapsed = time.monotonic() - self.started
        say(f"\n==> soak summary after {elapsed / 60:.1f} min, {t.rounds} rounds")
        say(f"    transfers ok {t.transfers_ok} ({t.transferred / MiB:.0f} MiB, sha256 checked), "
            f"ping rounds ok {t.pings_ok}, failed {t.pings_failed}")  # fmt: skip
        say(f"    forced handshakes {t.rehandshakes_ok}, churn peers added {t.churn_added} / "
            f"removed {t.churn_removed}, SIGHUP reloads {t.reloads}")  # fmt: skip
        gw = self.star.gateway
        if gw is not None and self.alive():
            try:
                st = read_status(gw.ifname, interval=0)
                restarts = [w.restarts for w in st.worker_stats]
                say(f"    worker restarts {restarts}, drops {st.drops_total}")
                if any(restarts):
                    t.fail(f"workers restarted during the soak: {restarts}")
            except StatusError as e:
                t.fail(f"status unreadable: {e}")
        if t.failures and gw is not None:
            keys = ("WARNING", "ERROR", "CRITICAL", "stuck", "exited", "Traceback", "Error")
            notable = [ln for ln in gw.log_text().splitlines() if any(k in ln for k in keys)]
            if notable:
                say("    gateway log, notable lines (last 40):")
                for ln in notable[-40:]:
                    say(f"      {ln}")
        samples = self.sampler.samples if self.sampler else []
        say("    RSS samples (s: total MiB = supervisor + workers):")
        for s in samples:
            parts = " + ".join(f"{v / 1024:.1f}" for v in s.per_pid.values())
            say(f"      {s.t:7.0f}: {s.total / 1024:7.1f} = {parts}")
        if len(samples) >= 2:
            first, last = samples[0].per_pid, samples[-1].per_pid
            growth = ", ".join(
                f"{pid} {(last[pid] - first[pid]) / 1024:+.1f}" for pid in last if pid in first
            )
            say(f"    RSS change per process, first to last sample (pid MiB): {growth}")
        verdict = judge_rss([s.total for s in samples], self.args.rss_tolerance)
        if verdict.flat is None:
            say(f"    RSS: {len(samples)} samples, too few to judge (need 6)")
        else:
            word = "flat" if verdict.flat else "GROWING"
            say(f"    RSS {word}: middle third {verdict.middle_kib / 1024:.1f} MiB, last third "
                f"{verdict.last_kib / 1024:.1f} MiB ({verdict.growth:+.1%}, limit "
                f"+{self.args.rss_tolerance:.0%})")  # fmt: skip
            if not verdict.flat:
                t.fail("gateway RSS grew")
        ok = not t.failures
        say(f"\nsoak {'OK' if ok else 'FAILED'}" + ("" if ok else f": {'; '.join(t.failures)}"))
        return ok

    def teardown(self) -> None:
        if self.sampler is not None and self.sampler.is_alive():
            self.sampler.stop()
        try:
            self.harness.close()
        except Exception as e:  # noqa: BLE001 - report, keep the exit path
            say(f"teardown: {e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lab.soak", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--minutes", type=float, default=30, help="how long (default 30)")
    p.add_argument("--workers", type=int, default=2, help="shardwg workers (default 2)")
    p.add_argument("--peers", type=int, default=3, help="wireguard-go peers (default 3)")
    p.add_argument("--transfer-mib", type=int, default=8, help="MiB per transfer (default 8)")
    p.add_argument("--churn", type=int, default=8, help="extra peers per churn (default 8)")
    p.add_argument("--sample", type=float, default=10, help="RSS sample interval s (10)")
    p.add_argument("--round-seconds", type=float, default=10, help="a round's length (10)")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed growth (0.10)")
    p.add_argument("--seed", type=int, default=1, help="random seed for the workload")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.workers < 1 or not 1 <= args.peers <= 50:
        p.error("need --minutes > 0, --workers >= 1, --peers 1..50")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = lab_problems()
    if problems:
        print(f"soak cannot run here: {'; '.join(problems)}", file=sys.stderr)
        return 2
    soak = Soak(args)
    prev = {s: signal.signal(s, exit_on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    rc = 0
    try:
        soak.run()
    except KeyboardInterrupt:
        say("\ninterrupted")
        rc = 130
    except SystemExit as e:
        say(f"\nstopped by signal ({e.code})")
        rc = int(e.code) if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - report, then tear down
        soak.tally.fail(f"{type(e).__name__}: {e}")
        if soak.star.gateway is not None:
            say("\ngateway log tail:\n" + soak.star.gateway.log_text()[-4000:])
    finally:
        if soak.sampler is not None and soak.sampler.is_alive():
            soak.sampler.stop()
        ok = soak.report()
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        soak.teardown()
        for s, handler in prev.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if rc == 0 and not ok:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
