"""`shardwg show --watch`: the load arithmetic alone, then the live view of a real gateway, in a
pipe (bounded frames) and on a terminal (tmux: redrawn in place, q quits)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_sharding import build_site

from lab.harness import Harness
from lab.netns import RUN_HEX, lab_env, stop_popen, wait_for
from lab.ping import ping
from shardwg.observe.status import GatewayStatus, WorkerStatus
from shardwg.observe.watch import bar, frame, loads

REPO = Path(__file__).resolve().parent.parent
SEND_UDP = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"x" * 100, (sys.argv[1], 9))
    time.sleep(0.02)
"""


def worker(i: int, pid: int, rx: int, cpu: float, drops: int = 0) -> WorkerStatus:
    return WorkerStatus(
        worker=i, pid=pid, alive=True, heartbeat_age=0.01, peers_owned=3, restarts=0,
        rx_packets=rx, rx_bytes=rx * 100, tx_packets=rx // 2, tx_bytes=rx * 50,
        rx_pps=0, tx_pps=0, rx_bps=0, tx_bps=0, handshakes_sent=0, handshakes_received=0,
        handshakes_completed=0, handoffs_in=0, handoffs_out=0, handshake_backlog=0,
        kernel_drops=0, initiations_offered=0, initiation_share=1.0,
        drops={"replayed": drops} if drops else {}, cpu_seconds=cpu,
    )  # fmt: skip


def status(*workers: WorkerStatus) -> GatewayStatus:
    return GatewayStatus("wg0", 51820, len(workers), 1, 5.0, True, False, [], list(workers), {})


def test_loads_bars_and_the_hot_worker_hint() -> None:
    prev = status(worker(0, 10, 1000, 5.0), worker(1, 11, 0, 2.0))
    cur = status(worker(0, 10, 3000, 5.95, drops=40), worker(1, 12, 100, 0.1))  # 1 replaced
    rows = loads(prev, cur, 1.0)
    assert rows[0].rx_pps == 2000 and rows[0].tx_pps == 1000 and rows[0].rx_bps == 1_600_000
    assert rows[0].cpu == pytest.approx(0.95) and rows[0].drops_ps == 40
    assert rows[1].cpu == pytest.approx(0.1)  # a new pid: its CPU counts from zero
    assert bar(0.5, 10) == "[|||||     ]  50%" and bar(1.7, 10) == "[||||||||||] 170%"
    text = "\n".join(frame(cur, rows, "12:00:00"))
    assert re.search(r"^\s+0\s+10\s+3\s+\[\|{19} \]\s+95%\s+2000\s+1000", text, re.M), text
    assert "worker 0 is using a whole core" in text
    assert "105% of a core" in text  # the total row


def watch_cmd(ifname: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shardwg", "show", ifname, "--watch", *extra]


def worker_rows(screen: str) -> dict[int, list[str]]:
    rows = {}
    for line in screen.splitlines():
        m = re.match(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+\[([| ]+)\]\s+(\d+)%\s+(\d+)\s+(\d+)", line)
        if m:
            rows[int(m.group(1))] = list(m.groups())
    return rows


@pytest.mark.netns
@pytest.mark.interop
def test_watch_on_a_terminal_and_in_a_pipe(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 2, 2)
    tmux = ["tmux", "-L", f"swgwatch{RUN_HEX}{os.getpid()}"]  # our own server, killed below
    pingers: list[subprocess.Popen[bytes]] = []
    try:
        for ns, _wg, _kp in site.peers:
            assert ping(ns, "10.0.0.1", count=1, timeout=10)
        for ns, _wg, _kp in site.peers:  # ~50 datagrams/s per peer through the tunnel, 40 s
            pingers.append(ns.popen([sys.executable, "-c", SEND_UDP, "10.0.0.1", "2000"]))

        # a pipe: plain frames, no escape codes, and it ends by itself
        piped = subprocess.run(watch_cmd(site.gw.ifname, "--count", "2"), capture_output=True,
                               text=True, timeout=30, env=lab_env(), cwd=REPO)  # fmt: skip
        assert piped.returncode == 0, piped.stderr
        assert "\x1b" not in piped.stdout and piped.stdout.count("rx pkt/s") == 2
        rows = worker_rows(piped.stdout.split("\n\n")[-1])
        assert set(rows) == {0, 1} and all(int(r[5]) > 0 for r in rows.values()), piped.stdout

        # a terminal: redrawn in place once a second until q
        shell = f"cd {REPO} && {' '.join(watch_cmd(site.gw.ifname))}"
        subprocess.run([*tmux, "new-session", "-d", "-s", "w", "-x", "140", "-y", "20", shell],
                       check=True, env=lab_env(), timeout=10)  # fmt: skip

        def screen() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "w"], capture_output=True,
                                  text=True, timeout=10).stdout  # fmt: skip

        assert wait_for(lambda: len(worker_rows(screen())) == 2, 10), screen()
        first = screen()
        clock = re.search(r"\d\d:\d\d:\d\d", first)
        assert clock and "(q quits)" in first and first.count("rx pkt/s") == 1, first
        assert wait_for(lambda: clock.group() not in screen(), 5), "not redrawn"
        again = screen()
        assert again.count("rx pkt/s") == 1  # in place, not scrolled
        rows = worker_rows(again)
        assert all(int(r[5]) >= 10 for r in rows.values()), again  # both workers see pings
        print("\n" + again)
        subprocess.run([*tmux, "send-keys", "-t", "w", "q"], check=True, timeout=10)

        def gone() -> bool:
            return subprocess.run([*tmux, "has-session", "-t", "w"], capture_output=True,
                                  timeout=10).returncode != 0  # fmt: skip

        assert wait_for(gone, 5), screen()

        # Ctrl-C ends it too, and the shell behind gets its terminal back (cursor, echo)
        marker = "after-watch"
        subprocess.run([*tmux, "new-session", "-d", "-s", "w", "-x", "140", "-y", "20",
                        f"{shell}; echo {marker}; sleep 30"], check=True, env=lab_env(),
                       timeout=10)  # fmt: skip
        assert wait_for(lambda: len(worker_rows(screen())) == 2, 10), screen()
        subprocess.run([*tmux, "send-keys", "-t", "w", "C-c"], check=True, timeout=10)
        assert wait_for(lambda: marker in screen(), 5), screen()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
        for p in pingers:
            stop_popen(p)
        assert site.gw.stop() == 0
