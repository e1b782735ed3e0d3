"""Faults against a real gateway with honest TCP transfers in flight: workers killed and
frozen, the supervisor killed and the gateway restarted over its leftovers, and outbound
queues overflowing. No fault may cost an honest transfer a byte (sha256 checked).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from test_sharding import ShmView, Site, b64, build_site

from lab import hostile as H
from lab.harness import Harness
from lab.netns import wait_for
from lab.ping import ping
from lab.transfer import Transfer
from shardwg.shm.region import SharedRegion, region_name

pytestmark = [pytest.mark.interop, pytest.mark.netns]

GW_PORT = 51820
MiB = 1024 * 1024


def start_transfers(
    site: Site, size: int, port0: int
) -> list[tuple[Transfer, subprocess.Popen[str]]]:
    """Every peer starts sending `size` bytes to the gateway's tunnel address."""
    out = []
    for i, (ns, _wg, _kp) in enumerate(site.peers):
        t = Transfer(site.gw_ns, ns, "10.0.0.1", port0 + i, size, seed=100 + i, timeout=150)
        out.append((t, t.start_client()))
    return out


def finish_transfers(runs: list[tuple[Transfer, subprocess.Popen[str]]], size: int) -> None:
    for t, c in runs:
        res = t.finish(c)
        assert res.received_bytes == size and res.ok, res


def wait_replaced(shm: ShmView, worker: int, old_pid: int, since: float, timeout: float) -> float:
    """Seconds from `since` until worker slot `worker` runs a new, beating process."""
    ok = wait_for(
        lambda: (
            shm.workers()[worker].pid not in (0, old_pid)
            and shm.workers()[worker].heartbeat > since
        ),
        timeout,
        interval=0.01,
    )
    assert ok, f"worker {worker} (pid {old_pid}) was not replaced within {timeout} s"
    return time.monotonic() - since


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_kill_9_each_worker_in_turn_during_transfers(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 2, 2)
    try:
        for ns, _wg, _kp in site.peers:
            assert ping(ns, "10.0.0.1", count=2, timeout=10), site.gw.log_text()
        size = 60 * MiB
        shm = ShmView(site.gw.ifname)
        try:
            runs = start_transfers(site, size, 6300)
            times = []
            for worker in (0, 1, 0):
                base = shm.workers()[worker].rx_bytes
                assert wait_for(lambda w=worker, b=base: shm.workers()[w].rx_bytes > b + 2 * MiB,
                                30)  # fmt: skip
                old = shm.workers()[worker].pid
                killed = time.monotonic()
                os.kill(old, signal.SIGKILL)
                times.append(wait_replaced(shm, worker, old, killed, 5))
            finish_transfers(runs, size)
            stats = shm.workers()
            assert [s.restarts for s in stats] == [2, 1], stats
            took = ", ".join(f"{t * 1000:.0f} ms" for t in times)
            print(f"\nkill -9 worker 0, 1, 0 mid-transfer: replaced in {took}; 2 x 60 MiB intact")
        finally:
            shm.close()
        assert site.gw.proc.poll() is None
    finally:
        assert site.gw.stop() == 0


def test_sigstop_worker_is_killed_and_replaced(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    peer_ns = site.peers[0][0]
    try:
        assert ping(peer_ns, "10.0.0.1", count=2, timeout=10), site.gw.log_text()
        size = 40 * MiB
        shm = ShmView(site.gw.ifname)
        try:
            owner = shm.owner(b64(site.peers[0][2][1]))
            runs = start_transfers(site, size, 6400)
            assert wait_for(lambda: shm.workers()[owner].rx_bytes > 2 * MiB, 30)
            old = shm.workers()[owner].pid
            stopped = time.monotonic()
            os.kill(old, signal.SIGSTOP)
            took = wait_replaced(shm, owner, old, stopped, 10)
            assert wait_for(lambda: proc_state(old) in ("gone", "Z"), 5), proc_state(old)
            finish_transfers(runs, size)
            assert ping(peer_ns, "10.0.0.1", count=3, timeout=10)
            assert "stuck" in site.gw.log_text()
            print(f"\nSIGSTOP worker {owner}: killed and replaced after {took:.1f} s; "
                  f"40 MiB transfer intact")  # fmt: skip
        finally:
            shm.close()
    finally:
        assert site.gw.stop() == 0


def test_supervisor_kill_9_workers_exit_and_restart_reclaims(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2, gw_initiates=True)
    ifname = site.gw.ifname
    peer_ns = site.peers[0][0]
    shm_path = f"/dev/shm{region_name(ifname)}"
    try:
        assert ping(site.gw_ns, "10.0.0.10", count=2, timeout=10), site.gw.log_text()
        shm = ShmView(ifname)
        workers = [w.pid for w in shm.workers()]
        size = 30 * MiB
        runs = start_transfers(site, size, 6500)
        assert wait_for(lambda: sum(w.rx_bytes for w in shm.workers()) > 2 * MiB, 30)
        shm.close()
        killed = time.monotonic()
        os.kill(site.gw.proc.pid, signal.SIGKILL)
        assert wait_for(lambda: all(proc_state(p) in ("gone", "Z") for p in workers), 5), [
            proc_state(p) for p in workers
        ]
        workers_gone = time.monotonic() - killed
        assert os.path.exists(shm_path), "the killed supervisor's region should be left over"
        links = site.gw_ns.ip("-o", "link", "show").stdout
        assert ifname not in links, "the TUN interface outlived every process holding it"

        # a new `shardwg run` with the same config takes over the name and the stale region
        t0 = time.monotonic()
        gw2 = netns_factory.gateway(
            site.gw_ns, ifname, site.gw_keys[0], GW_PORT, site.peer_conf, ["10.0.0.1/24"],
            workers=2,
        )  # fmt: skip
        started = time.monotonic() - t0
        region = SharedRegion.attach(region_name(ifname), readonly=True)
        try:
            assert region.creator() == gw2.proc.pid
        finally:
            region.close()
        assert ifname in site.gw_ns.ip("-o", "link", "show").stdout
        assert ping(site.gw_ns, "10.0.0.10", count=2, timeout=15), gw2.log_text()
        finish_transfers(runs, size)
        assert ping(peer_ns, "10.0.0.1", count=2, timeout=10)
        print(f"\nsupervisor kill -9: workers gone in {workers_gone * 1000:.0f} ms; restart over "
              f"the stale region in {started:.1f} s; 30 MiB transfer across it intact")  # fmt: skip
        assert gw2.stop() == 0
        assert not os.path.exists(shm_path)
    finally:
        site.gw.stop()


def test_full_outbound_queues_are_counted_and_survived(netns_factory: Harness) -> None:
    """A local sender floods the TUN towards peer 1, whose link drains at 20 Mbit/s behind a
    64 MB queue (tbf): the UDP send buffers and the handoff rings fill. Peer 0's transfer
    goes on."""
    site = build_site(netns_factory, 2, 2)
    try:
        for ns, _wg, _kp in site.peers:
            assert ping(ns, "10.0.0.1", count=2, timeout=10), site.gw.log_text()
        # a slow link to peer 1 whose queue is far deeper than our sockets' send buffers
        site.gw_ns.run(["tc", "qdisc", "add", "dev", "veth1", "root", "tbf", "rate", "20mbit",
                        "burst", "64kb", "limit", "64mb"])  # fmt: skip
        shm = ShmView(site.gw.ifname)
        try:
            before = shm.workers()
            tun0 = site.gw_ns.call(H.link_stats, site.gw.ifname)
            size = 30 * MiB
            t = Transfer(site.gw_ns, site.peers[0][0], "10.0.0.1", 6600, size, seed=5, timeout=150)
            runs = [(t, t.start_client())]
            payload = [bytes(1200)]
            flood = site.gw_ns.call(H.blast, "10.0.0.11", 9, payload, 400_000, sources=32,
                                    max_seconds=8, timeout=30)  # fmt: skip
            finish_transfers(runs, size)
            time.sleep(1.5)
            after = shm.workers()
            tun1 = site.gw_ns.call(H.link_stats, site.gw.ifname)
        finally:
            shm.close()
        site.gw_ns.run(["tc", "qdisc", "del", "dev", "veth1", "root"])
        counted = {
            r: sum(a.drops[r] - b.drops[r] for a, b in zip(after, before, strict=True))
            for r in ("send_error", "handoff_full", "tun_write_error", "staged_overflow")
        }
        tun_drops = tun1["tx_dropped"] - tun0["tx_dropped"]
        print(f"\nlocal flood towards a slow peer: {flood.sent} datagrams in "
              f"{flood.seconds:.1f} s ({flood.errors} send errors at the sender); gateway "
              f"counted {counted}; TUN queue drops by the kernel {tun_drops}; 30 MiB honest "
              f"transfer intact")  # fmt: skip
        assert counted["send_error"] + counted["handoff_full"] > 0, counted
        assert site.gw.proc.poll() is None, site.gw.log_text()
        assert all(s.restarts == 0 for s in after), after
        for i, (ns, _wg, _kp) in enumerate(site.peers):
            assert ping(ns, "10.0.0.1", count=2, timeout=10)
            assert ping(site.gw_ns, f"10.0.0.{10 + i}", count=2, timeout=10)
    finally:
        assert site.gw.stop() == 0
