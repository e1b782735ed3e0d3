"""A handshake flood: initiations with a VALID mac1 from many spoofed sources, well above what
the gateway can process, while an honest wireguard-go peer works.

Topology as in test_hostile (gateway, one peer on veth0, a hostile namespace on hveth); the
gateway routes the spoofed prefix 10.97.0.0/16 back to the hostile namespace, so its cookie
replies travel there and an AF_PACKET counter sees them. The flood reuses 64 initiations
(built with shardwg.proto for a key the gateway does not know) behind 20,000 prebuilt IP/UDP
headers with random sources, sent over a raw IP_HDRINCL socket with sendmmsg.
"""

from __future__ import annotations

import base64
import os
import random
import re
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
from test_hostile import (
    GW_PORT,
    HOSTILE_GW,
    Hostile,
    Snapshot,
    add_hostile,
    drop_delta,
    settle_counters,
    snapshot,
)
from test_sharding import Site, build_site

from lab import hostile as H
from lab.harness import Harness
from lab.iperf import IperfResult, iperf3_tcp
from lab.netns import LabError
from lab.ping import ping, ping_rtts
from shardwg.observe.metrics import render as metrics_render
from shardwg.observe.show import render as show_render
from shardwg.observe.status import StatusError, read_status
from shardwg.proto.constants import RATELIMIT_BURST, RATELIMIT_PACKETS_PER_SECOND

pytestmark = [pytest.mark.interop, pytest.mark.netns]

SPOOFED = "10.97.0.0/16"
FLOOD_RATE = 20_000  # initiations/s offered: ~2x what two workers can take with full DH work
RSS_GROWTH_LIMIT_KIB = 32 * 1024  # all gateway processes together


def flood_site(harness: Harness) -> tuple[Site, Hostile, bytes]:
    site = build_site(harness, 1, 2)
    hx = add_hostile(harness, site)
    site.gw_ns.ip("route", "add", SPOOFED, "via", "10.98.0.2")
    assert ping(site.peers[0][0], "10.0.0.1", count=2, timeout=10), site.gw.log_text()
    return site, hx, base64.b64decode(site.gw_keys[1])


def flood_packets(gw_public: bytes, n: int = 20_000) -> list[bytes]:
    rng = random.Random(77)
    inits = H.valid_mac1_initiations(gw_public, 64, rng)
    return H.spoofed_packets(rng, SPOOFED, HOSTILE_GW, GW_PORT, inits, n)


def kernel_drops(snap: Snapshot) -> int:
    return sum(w.kernel_drops for w in snap.status.worker_stats)


def accounted(after: Snapshot, before: Snapshot) -> int:
    """Datagrams the kernel dropped on the gateway's sockets (the initiation filter, a full
    receive buffer) plus those the workers read and dropped by reason."""
    return kernel_drops(after) - kernel_drops(before) + sum(drop_delta(after, before).values())


def gateway_pids(site: Site) -> list[int]:
    st = read_status(site.gw.ifname, interval=0)
    return [st.supervisor_pid, *(w.pid for w in st.worker_stats)]


def iperf(site: Site, seconds: float = 3) -> IperfResult:
    return iperf3_tcp(site.gw_ns, site.peers[0][0], "10.0.0.1", seconds=seconds)


def iperf_or_zero(site: Site, seconds: float = 3) -> IperfResult:
    """iperf under attack: a run that stalls counts as 0 bit/s, so the report still prints."""
    try:
        return iperf(site, seconds)
    except (LabError, subprocess.TimeoutExpired) as e:
        print(f"\niperf3 during the flood failed: {type(e).__name__}")
        return IperfResult(seconds, 0, 0.0, 0)


@dataclass
class Flood:
    """The flood running in the hostile namespace on a thread of ours."""

    hx: Hostile
    packets: list[bytes]
    gw_public: bytes
    seconds: float
    client_delay: float = 1.5
    rate: float = FLOOD_RATE
    report: H.FloodReport | None = None
    error: BaseException | None = None
    started: float = 0.0
    thread: threading.Thread | None = None

    def start(self) -> Flood:
        def run() -> None:
            try:
                self.report = self.hx.ns.call(
                    H.flood_with_cookie_client, "eth0", HOSTILE_GW, GW_PORT, self.packets,
                    int(self.rate * self.seconds), self.rate, self.seconds + 5,
                    self.gw_public, 200.0, self.client_delay, timeout=self.seconds + 30,
                )  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - re-raised by join()
                self.error = e

        self.started = time.monotonic()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def join(self) -> H.FloodReport:
        assert self.thread is not None
        self.thread.join(timeout=self.seconds + 40)
        if self.error is not None:
            raise self.error
        assert self.report is not None, "flood did not finish"
        return self.report


@dataclass
class Sampler:
    """under_load, backlog and RSS of every gateway process every `interval` seconds."""

    site: Site
    interval: float = 0.5
    under_load: list[bool] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # monotonic time of each sample
    backlog: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        def run() -> None:
            while not self._stop.wait(self.interval):
                try:
                    st = read_status(self.site.gw.ifname, interval=0)
                except StatusError:
                    continue  # the gateway is gone; the test says why
                self.under_load.append(st.under_load)
                self.times.append(time.monotonic())
                self.backlog.append(max(w.handshake_backlog for w in st.worker_stats))
                pids = [st.supervisor_pid, *(w.pid for w in st.worker_stats)]
                self.rss.append(sum(H.pids_rss(pids).values()))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def under_load_between(self, start: float, end: float) -> list[bool]:
        return [u for u, t in zip(self.under_load, self.times, strict=True) if start <= t <= end]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def rehandshake(site: Site, timeout: float) -> tuple[float, float]:
    """Make the honest peer forget the gateway and come back (`wg set ... remove`, re-add):
    its next packet needs a brand-new handshake. Returns (seconds it took, monotonic time it
    was seen), seconds -1 if it did not happen within timeout."""
    peer_ns, wg, _kp = site.peers[0]
    gw_pub = site.gw_keys[1]
    hs0 = wg.latest_handshake(gw_pub)
    time.sleep(1.1)  # latest-handshake has one-second resolution
    t0 = time.monotonic()
    wg.set_peer(gw_pub, remove=True)
    wg.set_peer(gw_pub, allowed_ips=["10.0.0.0/24"], endpoint=f"10.99.0.1:{GW_PORT}")
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if ping(peer_ns, "10.0.0.1", count=1, timeout=1) and wg.latest_handshake(gw_pub) > hs0:
            now = time.monotonic()
            return now - t0, now
    return -1.0, time.monotonic()


def test_under_load_engages_during_handshake_flood(netns_factory: Harness) -> None:
    site, hx, gw_public = flood_site(netns_factory)
    try:
        before = snapshot(site)
        flood = Flood(hx, flood_packets(gw_public), gw_public, 6.0, client_delay=60).start()
        seen: list[tuple[bool, int, list[float]]] = []
        screens: list[str] = []
        for _ in range(4):
            time.sleep(0.5)
            st = read_status(site.gw.ifname, interval=0)
            screens.append(show_render(st) + "\n" + metrics_render(st))
            rtts = ping_rtts(site.peers[0][0], "10.0.0.1", count=1, timeout=0.8)
            seen.append((st.under_load, max(w.handshake_backlog for w in st.worker_stats), rtts))
        report = flood.join()
        settle_counters()
        after = snapshot(site)
        drops = drop_delta(after, before)
        print(f"\n{report.flood.sent} initiations in {report.flood.seconds:.1f} s; "
              f"(under_load, backlog, honest rtt ms): {seen}; drops {drops}; cookie replies "
              f"seen {report.cookie_replies}")  # fmt: skip
        # under load for the whole flood, the kernel shedding most initiations, the workers
        # answering the admitted share (between 1/8 and 1/4 of their 3000/s cookie budget)
        assert all(under for under, _b, _r in seen[1:]), seen  # from 1 s in
        assert report.cookie_replies > report.flood.sent * 0.02, report
        assert drops.get("cookie_required", 0) >= report.cookie_replies, drops
        # what an operator sees: `shardwg show` names the flood, /metrics the admitted share
        assert any("initiation flood" in text and "the kernel admits 1/" in text
                   for text in screens), screens[-1]  # fmt: skip
        assert any(re.search(r"shardwg_worker_initiation_share\{[^}]*\} 0\.\d", text)
                   for text in screens), screens[-1]  # fmt: skip
        # and every flood datagram is accounted for: shed by the filter or dropped by reason
        total = accounted(after, before)
        print(f"accounted for {total} of {report.flood.sent} (kernel drops "
              f"{kernel_drops(after) - kernel_drops(before)})")  # fmt: skip
        assert report.flood.sent * 0.98 <= total <= report.flood.sent * 1.02
    finally:
        assert site.gw.stop() == 0


def test_handshake_flood_cookies_rate_limits_memory_and_rehandshake(
    netns_factory: Harness,
) -> None:
    site, hx, gw_public = flood_site(netns_factory)
    try:
        packets = flood_packets(gw_public)
        pids = gateway_pids(site)
        rss0 = sum(H.pids_rss(pids).values())
        unloaded = iperf(site)
        # Long enough for the cookie-answering client to meet its token bucket many times over
        # and for the honest peer's re-handshake (a cookie, then a retry ~5 s later) to finish.
        seconds = 40.0
        start_snap = snapshot(site)
        sampler = Sampler(site).start()
        flood = Flood(hx, packets, gw_public, seconds).start()
        time.sleep(1.0)
        before_client: Snapshot = snapshot(site)  # under load by now; the client starts at 1.5 s
        loaded = iperf_or_zero(site)
        rehandshake_s, rehandshake_at = rehandshake(site, timeout=seconds + 10)
        report = flood.join()
        end_snap = snapshot(site)
        sampler.stop()
        settle_counters()
        after = snapshot(site)
        rss1 = sum(H.pids_rss(pids).values())

        drops = drop_delta(after, start_snap)
        client_drops = drop_delta(end_snap, before_client)
        hs = sum(w.handshakes_received for w in after.status.worker_stats) - sum(
            w.handshakes_received for w in start_snap.status.worker_stats
        )
        fs = report.flood.seconds
        # Only the cookie-answering client can carry a valid mac2, so only it can meet the
        # per-source limiter: rate_limited counts its initiations turned away. (unknown_peer
        # cannot tell its passes apart: spoofed initiations that arrive while under-load mode
        # has lapsed get the full work and land there too.)
        limited = client_drops.get("rate_limited", 0)
        passed = max(0, report.client_sent_with_mac2 - limited)
        allowance = RATELIMIT_PACKETS_PER_SECOND * report.client_seconds + RATELIMIT_BURST
        ratio = loaded.bits_per_second / unloaded.bits_per_second
        during = rehandshake_at < flood.started + report.flood.seconds
        lines = [
            f"offered: {report.flood.sent} valid-mac1 initiations in {fs:.1f} s "
            f"= {report.flood.sent / fs:,.0f}/s from {len(packets)} spoofed (source, port)s",
            f"gateway read {hs / fs:,.0f} handshake messages/s; cookie replies seen by the "
            f"attacker {report.cookie_replies} = {report.cookie_replies / fs:,.0f}/s",
            f"drops: {drops}; kernel drops {kernel_drops(after) - kernel_drops(start_snap)}",
            f"under_load samples: {sum(sampler.under_load)}/{len(sampler.under_load)}, "
            f"max backlog {max(sampler.backlog, default=0)}",
            f"cookie-answering source: {report.client_sent_with_mac2} initiations with a valid "
            f"mac2 in {report.client_seconds:.1f} s: {limited} rate_limited, {passed} not "
            f"(the token bucket allows {allowance:.0f} while under load), "
            f"{report.client_cookies} cookies received",
            f"honest throughput: unloaded {unloaded.bits_per_second / 1e6:.0f} Mbit/s, during "
            f"the flood {loaded.bits_per_second / 1e6:.0f} Mbit/s ({ratio:.0%})",
            f"re-handshake: {rehandshake_s:.1f} s after `wg set` ("
            f"{'during' if during else 'AFTER'} the flood)",
            f"gateway RSS: {rss0 / 1024:.1f} MiB before, {rss1 / 1024:.1f} MiB after, "
            f"max {max(sampler.rss, default=0) / 1024:.1f} MiB during",
        ]
        print("\n" + "\n".join(lines))

        assert site.gw.proc.poll() is None, site.gw.log_text()
        assert all(w.alive and w.restarts == 0 for w in after.status.worker_stats), "\n".join(
            line for line in site.gw.log_text().splitlines() if "WARNING" in line or "ERROR" in line
        )
        # under-load mode engaged and cookies went out instead of handshakes
        assert any(sampler.under_load), sampler.under_load  # `shardwg show --json` says so
        # and it never lapses (from 1 s in: the supervisor raises the shared flag from the
        # gauges it samples; until the flood's last second)
        steady = sampler.under_load_between(flood.started + 1, flood.started + fs - 1)
        assert steady and all(steady), steady
        assert report.cookie_replies > report.flood.sent * 0.02, report
        assert report.flood.sent * 0.98 <= accounted(after, start_snap), (drops, report)
        # a source that answers cookies is held to its token bucket (20/s, burst 5)
        assert report.client_cookies >= 1 and report.client_sent_with_mac2 > 300, report
        # (under-load mode comes and goes during the flood, and the limiter only works while it
        # is on: a quarter is a floor that held in every run, typically 70-90% are turned away)
        assert limited >= report.client_sent_with_mac2 * 0.25, (limited, report)
        # the flood does not grow memory
        assert rss1 - rss0 < RSS_GROWTH_LIMIT_KIB, (rss0, rss1)
        assert max(sampler.rss, default=0) - rss0 < RSS_GROWTH_LIMIT_KIB, sampler.rss
        # the honest peer got through: its endpoint is known, so the kernel passes its
        # cookie-less initiation, it gets a cookie and its retry (~5 s later) carries a mac2
        assert rehandshake_s > 0 and during, (rehandshake_s, during)
        assert rehandshake_s < 20, rehandshake_s
        assert loaded.bytes_received > 0
        assert ping(site.peers[0][0], "10.0.0.1", count=3, timeout=10)
    finally:
        assert site.gw.stop() == 0


@pytest.mark.skipif(
    os.environ.get("SHARDWG_NATIVE") == "0",
    reason="a throughput floor of the production (native) path; the kernel filter it guards "
    "is the same on both paths, and the pure-Python reference is checked for correctness",
)
def test_honest_throughput_survives_handshake_flood(netns_factory: Harness) -> None:
    """A 40k/s flood (5x what two workers take with full DH work) must not take the honest
    peer's throughput down: the median of three loaded iperf3 runs, interleaved with four
    unloaded ones, keeps at least half of the unloaded median. The goal itself (>= 80 %) is a
    performance figure, measured over more runs by `scripts/flood`; this floor guards the
    mechanism (before the kernel filter the same test measured 1-10 %)."""
    site, hx, gw_public = flood_site(netns_factory)
    try:
        packets = flood_packets(gw_public)
        unloaded = [iperf(site)]
        loaded: list[IperfResult] = []
        seen: list[str] = []
        for _ in range(3):
            before = snapshot(site)
            flood = Flood(hx, packets, gw_public, 6.0, client_delay=60, rate=40_000).start()
            time.sleep(1.0)
            loaded.append(iperf_or_zero(site))
            st = read_status(site.gw.ifname, interval=0)
            inside = time.monotonic() < flood.started + 6.0
            report = flood.join()
            settle_counters()
            after = snapshot(site)
            kdrops = sum(w.kernel_drops for w in after.status.worker_stats) - sum(
                w.kernel_drops for w in before.status.worker_stats
            )
            seen.append(
                f"{report.flood.sent / report.flood.seconds:,.0f} initiations/s offered; "
                f"under_load {st.under_load}; kernel shares "
                f"{[w.initiation_share for w in st.worker_stats]}, offered per worker "
                f"{[w.initiations_offered for w in st.worker_stats]}/s; kernel drops {kdrops}; "
                f"cookie replies {report.cookie_replies / report.flood.seconds:,.0f}/s; "
                f"drops {drop_delta(after, before)}"
            )
            assert inside, "the loaded iperf3 run outlasted the flood"
            assert st.under_load and all(w.initiation_share < 1 for w in st.worker_stats), st
            unloaded.append(iperf(site))
        u = statistics.median(r.bits_per_second for r in unloaded)
        lo = statistics.median(r.bits_per_second for r in loaded)
        print("\n" + "\n".join(seen))
        print(f"unloaded {[round(r.bits_per_second / 1e6) for r in unloaded]} Mbit/s, during "
              f"the flood {[round(r.bits_per_second / 1e6) for r in loaded]} Mbit/s: "
              f"median {lo / u:.0%} of unloaded")  # fmt: skip
        assert lo / u >= 0.5
        assert site.gw.proc.poll() is None and all(
            w.alive and w.restarts == 0 for w in snapshot(site).status.worker_stats
        )
    finally:
        assert site.gw.stop() == 0
