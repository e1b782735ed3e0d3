"""`python -m lab.demo`: a shardwg gateway and real wireguard-go peers, end to end.

Builds a star in fresh namespaces (gateway `site-a`, a bridged `underlay`, `peer1..N`), shows
the configs (keys redacted), then proves the tunnel: handshake, pings both ways over IPv4 and
IPv6, concurrent sha256-checked TCP transfers from every peer, an iperf3 run, and what each
side reports. Everything is removed at the end, also on Ctrl-C, SIGTERM, errors or the time
limit. Needs root. `scripts/demo` is the wrapper that sets up the machine first.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

from lab.harness import Harness, exit_on_signal, lab_problems
from lab.iperf import IperfResult, iperf3_problem, iperf3_tcp
from lab.netns import LabError, run
from lab.ping import ping_rtts
from lab.topology import BRIDGE, MAX_PEERS, Star, StarPeer
from lab.transfer import Transfer, TransferResult

PING_COUNT = 5
TRANSFER_PORT = 5301
IPERF_PORT = 5201
LOG_TAIL = 60


class DemoTimeout(Exception):
    """The whole-demo time limit passed; raised from SIGALRM so teardown still runs."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n==> {title}")


def indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in text.rstrip("\n").splitlines())


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def rtt_text(rtts: list[float], sent: int) -> str:
    if not rtts:
        return f"no replies (0/{sent})"
    return (
        f"min/avg/max {min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/{max(rtts):.3f} ms "
        f"({len(rtts)}/{sent})"
    )


@dataclass
class PeerReport:
    """What was measured for one peer."""

    handshake_ms: float | None = None
    pings: dict[str, list[float]] = field(default_factory=dict)
    transfer: TransferResult | None = None
    wg_show: str = ""
    wg_handshake_age: float | None = None
    wg_rx_tx: tuple[int, int] = (0, 0)


class Demo:
    """The steps, in order; failures are collected so the summary can say all that went wrong."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.harness = Harness()
        self.star = Star(self.harness, args.peers)
        self.reports: dict[str, PeerReport] = {}
        self.failures: list[str] = []
        self.iperf: IperfResult | None = None
        self.iperf_note = ""
        self.shardwg_show: str | None = None
        self.shardwg_show_note = ""
        self.transfer_wall = 0.0
        self.started = time.monotonic()

    # ---- steps ----------------------------------------------------------------------------

    def run(self) -> None:
        self.build()
        self.start()
        self.handshake()
        self.pings()
        self.transfers()
        self.iperf3()
        self.collect()
        self.summary()
        if self.args.keep:
            self.wait_for_enter()

    def build(self) -> None:
        step(f"creating namespaces and the underlay ({self.args.peers} peer(s))")
        star = self.star.build()
        assert star.gw_ns and star.underlay_ns
        say(f"    {star.gw_ns.name:<28} gateway  underlay {star.gw_underlay}/16")
        say(f"    {star.underlay_ns.name:<28} bridge {BRIDGE} joining every namespace below")
        for p in star.peers:
            say(f"    {p.ns.name:<28} {p.name:<8} underlay {p.underlay}/16")

    def start(self) -> None:
        step(f"starting shardwg (--workers {self.args.workers}) and wireguard-go peers")
        self.star.start(workers=self.args.workers)
        gw = self.star.gateway
        assert gw is not None
        say(f"    gateway pid {gw.proc.pid}: {' '.join(gw.command)}")
        for p in self.star.peers:
            assert p.wg is not None
            say(f"    {p.name} pid {p.wg.proc.pid if p.wg.proc else '?'}: wireguard-go -f "
                f"{p.wg.ifname}, tunnel {p.tunnel4} / {p.tunnel6}")  # fmt: skip
            self.reports[p.name] = PeerReport()
        step("configs (private keys redacted)")
        say(f"  # {gw.config_path.name} (shardwg, namespace {gw.ns.name})")
        say(indent(gw.config_text()))
        shown = self.star.peers[:2]
        for p in shown:
            assert p.wg is not None
            say(f"\n  # {p.wg.ifname}.conf (wireguard-go, namespace {p.ns.name})")
            say(indent(p.wg.config_text()))
        if len(self.star.peers) > len(shown):
            say(f"\n  # ... and {len(self.star.peers) - len(shown)} more peer(s) like these")

    def handshake(self) -> None:
        step("handshakes: each peer's first ping to the gateway (the handshake is in its RTT)")
        for p in self.star.peers:
            rtts = ping_rtts(p.ns, self.star.gw_tunnel4, count=1, timeout=10)
            if not rtts:
                raise LabError(f"{p.name}: no reply through the tunnel within 10 s")
            self.reports[p.name].handshake_ms = rtts[0]
            say(f"    {p.name}: first reply after {rtts[0]:.2f} ms")

    def _directions(self, p: StarPeer) -> list[tuple[str, str]]:
        return [
            (f"{p.name} -> site-a IPv4", self.star.gw_tunnel4),
            (f"site-a -> {p.name} IPv4", p.tunnel4),
            (f"{p.name} -> site-a IPv6", self.star.gw_tunnel6),
            (f"site-a -> {p.name} IPv6", p.tunnel6),
        ]

    def pings(self) -> None:
        step(f"pings through the tunnel, both ways ({PING_COUNT} each)")
        gw_ns = self.star.gw_ns
        assert gw_ns is not None
        for p in self.star.peers:
            for label, addr in self._directions(p):
                src = p.ns if label.startswith(p.name) else gw_ns
                rtts = ping_rtts(src, addr, count=PING_COUNT, timeout=5, interval=0.05)
                self.reports[p.name].pings[label] = rtts
                say(f"    {label:<24} {rtt_text(rtts, PING_COUNT)}")
                if len(rtts) < PING_COUNT:
                    self.failures.append(f"ping {label}: {len(rtts)}/{PING_COUNT} replies")

    def transfers(self) -> None:
        size = self.args.transfer_mib << 20
        n = len(self.star.peers)
        step(f"TCP transfers: {mib(size)} from each of {n} peer(s) at once, sha256 checked")
        gw_ns = self.star.gw_ns
        assert gw_ns is not None
        transfers = [
            (p, Transfer(gw_ns, p.ns, self.star.gw_tunnel4, TRANSFER_PORT + i, size, seed=i + 1,
                         timeout=60))  # fmt: skip
            for i, p in enumerate(self.star.peers)
        ]
        t0 = time.monotonic()
        clients = [(p, tr, tr.start_client()) for p, tr in transfers]
        for p, tr, client in clients:
            result = tr.finish(client)
            self.reports[p.name].transfer = result
            if not result.ok or result.received_bytes != size:
                self.failures.append(
                    f"transfer {p.name}: {result.received_bytes}/{size} bytes, "
                    f"sha256 {'match' if result.ok else 'MISMATCH'}"
                )
        self.transfer_wall = time.monotonic() - t0
        for p in self.star.peers:
            r = self.reports[p.name].transfer
            assert r is not None
            say(f"    {p.name}: {r.received_bytes} bytes in {r.seconds:.2f} s, "
                f"sha256 {'match' if r.ok else 'MISMATCH'}")  # fmt: skip

    def iperf3(self) -> None:
        secs = self.args.iperf_seconds
        problem = iperf3_problem()
        if problem or secs <= 0:
            self.iperf_note = f"skipped: {problem or '--iperf-seconds 0'}"
            step(f"iperf3 {self.iperf_note}")
            return
        p = self.star.peers[0]
        step(f"iperf3 TCP, {secs:g} s, {p.name} -> site-a through the tunnel")
        assert self.star.gw_ns is not None
        try:
            self.iperf = iperf3_tcp(self.star.gw_ns, p.ns, self.star.gw_tunnel4, IPERF_PORT, secs)
        except LabError as e:
            self.iperf_note = f"failed: {e}"
            self.failures.append(f"iperf3: {e}")
            say(f"    {self.iperf_note}")
            return
        say(f"    {self.iperf.gbit_s:.3f} Gbit/s received, "
            f"{self.iperf.retransmits} retransmits")  # fmt: skip

    def collect(self) -> None:
        step("what each side reports")
        gw = self.star.gateway
        assert gw is not None
        now = time.time()
        for p in self.star.peers:
            assert p.wg is not None
            rep = self.reports[p.name]
            rep.wg_show = p.wg.show()
            hs = p.wg.latest_handshake(self.star.gw_public_key)
            rep.wg_handshake_age = now - hs if hs else None
            rep.wg_rx_tx = p.wg.transfer(self.star.gw_public_key)
            if not hs:
                self.failures.append(f"{p.name}: wireguard-go reports no handshake with shardwg")
        cp = gw.show()
        if cp.returncode == 0:
            self.shardwg_show = cp.stdout
        else:
            last = (cp.stderr.strip().splitlines() or ["no output"])[-1]
            self.shardwg_show_note = f"not available in this build ({last})"
        if gw.proc.poll() is not None:
            self.failures.append(f"gateway exited early, rc={gw.proc.returncode}")
        say("    done")

    # ---- summary --------------------------------------------------------------------------

    def summary(self) -> None:
        star, gw = self.star, self.star.gateway
        assert gw is not None and star.gw_ns is not None and star.underlay_ns is not None
        say("\n" + "=" * 30 + " summary " + "=" * 30)
        say(f"gateway    {star.gw_ns.name}: shardwg run --workers {self.args.workers} "
            f"on {gw.ifname} ({star.gw_tunnel4}, {star.gw_tunnel6}), "
            f"{'running' if gw.proc.poll() is None else 'EXITED'}")  # fmt: skip
        say(f"underlay   {star.underlay_ns.name}: bridge {BRIDGE}, {star.underlay_net}.0.0/16")
        say(f"peers      {', '.join(p.ns.name for p in star.peers)} (wireguard-go)")

        say("\nhandshake (first ping RTT, handshake included)")
        for p in star.peers:
            ms = self.reports[p.name].handshake_ms
            say(f"  {p.name}: {ms:.2f} ms" if ms is not None else f"  {p.name}: none")

        say("\nping RTTs through the tunnel")
        for p in star.peers:
            for label, rtts in self.reports[p.name].pings.items():
                say(f"  {label:<24} {rtt_text(rtts, PING_COUNT)}")

        say("\nTCP transfers (concurrent, peer -> site-a, sha256 end to end)")
        total = 0
        for p in star.peers:
            r = self.reports[p.name].transfer
            if r is None:
                say(f"  {p.name} -> site-a: not run")
                continue
            total += r.received_bytes
            say(f"  {p.name} -> site-a: {r.received_bytes} bytes ({mib(r.received_bytes)}) in "
                f"{r.seconds:.2f} s = {r.mbit_s:.1f} Mbit/s, "
                f"sha256 {'match' if r.ok else 'MISMATCH'}")  # fmt: skip
            say(f"      sent     {r.sent_sha256}")
            say(f"      received {r.received_sha256}")
        if self.transfer_wall > 0:
            say(f"  all together: {mib(total)} in {self.transfer_wall:.2f} s = "
                f"{total * 8 / self.transfer_wall / 1e6:.1f} Mbit/s")  # fmt: skip

        say("\niperf3 TCP")
        if self.iperf is not None:
            say(f"  {star.peers[0].name} -> site-a: {self.iperf.gbit_s:.3f} Gbit/s over "
                f"{self.iperf.seconds:.1f} s ({mib(self.iperf.bytes_received)}), "
                f"{self.iperf.retransmits} retransmits")  # fmt: skip
        else:
            say(f"  {self.iperf_note or 'not run'}")

        say("\nwireguard-go's view of the shardwg peer (wg show)")
        for p in star.peers:
            rep = self.reports[p.name]
            age = rep.wg_handshake_age
            rx, tx = rep.wg_rx_tx
            say(f"  {p.name}: latest handshake "
                f"{f'{age:.0f} s ago' if age is not None else 'never'}, "
                f"transfer {mib(rx)} received, {mib(tx)} sent")  # fmt: skip
        for p in star.peers[:2]:
            say(f"  --- {p.name}: wg show {p.wg.ifname if p.wg else ''}")
            say(indent(self.reports[p.name].wg_show, "  "))

        say(f"\nshardwg show {gw.ifname}")
        if self.shardwg_show is not None:
            say(indent(self.shardwg_show, "  "))
        else:
            say(f"  skipped: {self.shardwg_show_note}")

        lines = gw.log_text().rstrip("\n").splitlines()
        say(f"\ngateway log ({gw.log_path}, {len(lines)} line(s))")
        if len(lines) > LOG_TAIL:
            say(f"  ... {len(lines) - LOG_TAIL} earlier line(s)")
        say(indent("\n".join(lines[-LOG_TAIL:]), "  "))
        say("=" * 69)

    def wait_for_enter(self) -> None:
        signal.alarm(0)  # the user decides how long now
        star, gw = self.star, self.star.gateway
        assert gw is not None and star.gw_ns is not None
        p = star.peers[0]
        assert p.wg is not None
        say("\nThe lab stays up. In another shell, try:")
        say(f"  ip netns exec {p.ns.name} ping {star.gw_tunnel4}")
        say(f"  ip netns exec {star.gw_ns.name} ping {p.tunnel6}")
        say(f"  ip netns exec {p.ns.name} wg show {p.wg.ifname}")
        say(f"  ip netns exec {star.gw_ns.name} ip addr show {gw.ifname}")
        say(f"  ip netns exec {star.gw_ns.name} iperf3 -s -1 -B {star.gw_tunnel4} &")
        say(f"  ip netns exec {p.ns.name} iperf3 -c {star.gw_tunnel4}")
        if self.shardwg_show is not None:
            say(f"  ip netns exec {star.gw_ns.name} {sys.executable} -m shardwg show {gw.ifname}")
        say(f"  tail -f {gw.log_path}")
        say("Press Enter to tear everything down.")
        try:
            input()
        except EOFError:
            pass

    # ---- teardown -------------------------------------------------------------------------

    def teardown(self) -> None:
        """Graceful gateway stop first (its exit code is part of the verdict), then everything
        by PID and exact name, then a check that nothing of ours is left."""
        step("tearing down")
        gw = self.star.gateway
        if gw is not None and not gw.closed:
            rc = gw.stop()
            say(f"    gateway stopped, exit code {rc}")
            tail = [ln for ln in gw.log_text().splitlines()[-3:] if ln]
            say(indent("\n".join(tail)))
            if rc != 0:
                self.failures.append(f"gateway exit code {rc}")
        names = [ns.name for ns in self.star.namespaces()]
        socks = [p.wg.sock_path for p in self.star.peers if p.wg is not None]
        try:
            self.harness.close()
        except Exception as e:  # noqa: BLE001 - report and still verify below
            self.failures.append(f"teardown: {e}")
        listed = run(["ip", "netns", "list"], check=False).stdout.split()
        left = [n for n in names if n in listed] + [str(s) for s in socks if s.exists()]
        if left:
            self.failures.append(f"left behind: {', '.join(left)}")
            say(f"    LEFT BEHIND: {', '.join(left)}")
        else:
            say(f"    removed {len(names)} namespace(s) and {len(socks)} wireguard-go peer(s)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lab.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="shardwg workers (default 2)")
    p.add_argument("--peers", type=int, default=2, help=f"wireguard-go peers, 1..{MAX_PEERS}")
    p.add_argument("--keep", action="store_true", help="leave it running until Enter")
    p.add_argument("--transfer-mib", type=int, default=50, help="MiB sent by each peer (50)")
    p.add_argument("--iperf-seconds", type=float, default=5, help="iperf3 duration, 0 skips")
    p.add_argument("--timeout", type=float, default=110, help="whole-demo limit in s (110)")
    args = p.parse_args(argv)
    if not 1 <= args.peers <= MAX_PEERS:
        p.error(f"--peers must be 1..{MAX_PEERS}")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.transfer_mib < 1:
        p.error("--transfer-mib must be at least 1")
    return args


def _raise_timeout(_signum: int, _frame: FrameType | None) -> None:
    raise DemoTimeout()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = lab_problems()
    if problems:
        print(f"demo cannot run here: {'; '.join(problems)}", file=sys.stderr)
        return 2
    demo = Demo(args)
    rc = 0
    prev = {s: signal.signal(s, exit_on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(max(1, int(args.timeout)))
    try:
        demo.run()
    except KeyboardInterrupt:
        say("\ninterrupted")
        rc = 130
    except DemoTimeout:
        demo.failures.append(f"time limit of {args.timeout:g} s reached")
    except SystemExit as e:
        say(f"\nstopped by signal ({e.code})")
        rc = int(e.code) if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - report, then tear down
        demo.failures.append(f"{type(e).__name__}: {e}")
        gw = demo.star.gateway
        if gw is not None:
            say("\ngateway log so far:\n" + indent(gw.log_text()))
    finally:
        signal.alarm(0)
        # teardown must finish: a second Ctrl-C or SIGTERM would leave namespaces behind
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        demo.teardown()
        for s, handler in prev.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    elapsed = time.monotonic() - demo.started
    if rc == 0 and demo.failures:
        rc = 1
    if demo.failures:
        say(f"\ndemo FAILED after {elapsed:.1f} s:")
        for f in demo.failures:
            say(f"  - {f}")
    elif rc == 0:
        say(f"\ndemo OK in {elapsed:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
