"""Supervisor duties against a real gateway: one instance per interface, foreign TUN
queues refused, restart storms stopped, shared memory and sockets owner-only."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from test_sharding import ShmView, build_site

from lab.harness import Harness
from lab.netns import wait_for
from lab.ping import ping

pytestmark = [pytest.mark.interop, pytest.mark.netns]

ATTACH_QUEUE = r"""
import fcntl, os, struct, sys, time
fd = os.open("/dev/net/tun", os.O_RDWR)
IFF_TUN, IFF_NO_PI, IFF_MULTI_QUEUE = 0x0001, 0x1000, 0x0100
flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), flags))
print("attached", flush=True)
time.sleep(30)
"""


def test_second_instance_refused_and_permissions(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    try:
        assert ping(site.peers[0][0], "10.0.0.1", count=1, timeout=10)
        second = site.gw_ns.run(
            [sys.executable, "-m", "shardwg", "run", "--config", str(site.gw.config_path),
             "--workers", "1"],
            check=False, timeout=30,
        )  # fmt: skip
        assert second.returncode != 0
        assert "another instance" in second.stderr or "already exists" in second.stderr
        # the first one is untouched
        assert ping(site.peers[0][0], "10.0.0.1", count=1, timeout=10)
        shm = f"/dev/shm/shardwg-{site.gw.ifname}"
        assert stat.S_IMODE(os.stat(shm).st_mode) == 0o600
        sock = f"/var/run/wireguard/{site.gw.ifname}.sock"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    finally:
        assert site.gw.stop() == 0
    assert not os.path.exists(f"/dev/shm/shardwg-{site.gw.ifname}")
    assert not os.path.exists(f"/var/run/wireguard/{site.gw.ifname}.sock")


def test_foreign_tun_queue_stops_the_gateway(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    try:
        assert ping(site.peers[0][0], "10.0.0.1", count=1, timeout=10)
        intruder = site.gw_ns.popen(
            [sys.executable, "-c", ATTACH_QUEUE, site.gw.ifname],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert intruder.stdout is not None and "attached" in intruder.stdout.readline()
        assert wait_for(lambda: site.gw.proc.poll() is not None, 10), "foreign queue not noticed"
        assert site.gw.proc.returncode == 4
        assert "refusing to run with a compromised interface" in site.gw.log_text()
        assert str(intruder.pid) in site.gw.log_text()
        intruder.kill()
    finally:
        site.gw.stop()


def test_restart_storm_stops_the_gateway(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    try:
        shm = ShmView(site.gw.ifname)
        try:
            killed: set[int] = set()
            deadline = time.monotonic() + 30
            while site.gw.proc.poll() is None and time.monotonic() < deadline:
                pid = shm.workers()[0].pid
                if pid and pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                time.sleep(0.02)
        finally:
            shm.close()
        assert site.gw.proc.poll() == 1, site.gw.log_text()
        assert "died 5 times within 2 s of starting; stopping the gateway" in site.gw.log_text()
        assert len(killed) == 5
    finally:
        site.gw.stop()


def test_no_core_dumps_for_gateway_processes(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    try:
        shm = ShmView(site.gw.ifname)
        try:
            assert wait_for(lambda: all(w.pid for w in shm.workers()), 5)
            pids = [site.gw.proc.pid] + [w.pid for w in shm.workers()]
        finally:
            shm.close()
        for pid in pids:
            limits = open(f"/proc/{pid}/limits").read()
            core = next(line for line in limits.splitlines() if line.startswith("Max core"))
            assert core.split()[4:6] == ["0", "0"], core
            # PR_SET_DUMPABLE=0 makes /proc/<pid> owned by root:root
            assert os.stat(f"/proc/{pid}").st_uid == 0
    finally:
        assert site.gw.stop() == 0
