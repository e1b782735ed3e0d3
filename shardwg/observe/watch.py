"""`shardwg show --watch`: the per-worker table redrawn once a second, a load bar per worker.

Cores pile up unseen: one hot worker caps the whole gateway while the average looks idle. So
each worker gets a row with its CPU share as a bar (like top/htop), its packet and bit rates
both ways and its drops per second, all measured between two reads of shared memory one
second apart (plus /proc for CPU time). On a terminal the screen is redrawn in place (ANSI)
until q or Ctrl-C; otherwise plain frames are printed, `count` of them, so a pipe or a log
always ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from shardwg.observe.show import _rate
from shardwg.observe.status import GatewayStatus, WorkerStatus, read_status

BAR_WIDTH = 20
INTERVAL = 1.0
DEFAULT_PIPE_FRAMES = 10  # not a terminal and no --count: stop after this many frames
CLEAR, HIDE_CURSOR, SHOW_CURSOR = "\x1b[H\x1b[2J", "\x1b[?25l", "\x1b[?25h"


@dataclass
class WorkerLoad:
    worker: int
    pid: int
    alive: bool
    peers: int
    cpu: float  # cores (1.0: one core busy)
    rx_pps: float
    tx_pps: float
    rx_bps: float
    tx_bps: float
    drops_ps: float


def loads(prev: GatewayStatus, cur: GatewayStatus, dt: float) -> list[WorkerLoad]:
    """Per-worker rates between two status reads `dt` seconds apart. A replaced worker (new
    pid) restarts its CPU time, so its share counts from zero rather than going negative."""
    before = {w.worker: w for w in prev.worker_stats}
    out = []
    for w in cur.worker_stats:
        b = before.get(w.worker, w)
        cpu = w.cpu_seconds - (b.cpu_seconds if b.pid == w.pid else 0.0)

        def rate(now: int, then: int) -> float:
            return max(0, now - then) / dt

        out.append(WorkerLoad(
            worker=w.worker, pid=w.pid, alive=w.alive, peers=w.peers_owned,
            cpu=max(0.0, cpu) / dt,
            rx_pps=rate(w.rx_packets, b.rx_packets), tx_pps=rate(w.tx_packets, b.tx_packets),
            rx_bps=8 * rate(w.rx_bytes, b.rx_bytes), tx_bps=8 * rate(w.tx_bytes, b.tx_bytes),
            drops_ps=rate(_drops(w), _drops(b)),
        ))  # fmt: skip
    return out


def _drops(w: WorkerStatus) -> int:
    return sum(w.drops.values())


def bar(share: float, width: int = BAR_WIDTH) -> str:
    """`[|||||||       ]  35%`: the share of one core, capped at a full bar."""
    filled = min(width, round(max(0.0, share) * width))
    return f"[{'|' * filled}{' ' * (width - filled)}] {share * 100:3.0f}%"


def frame(st: GatewayStatus, rows: list[WorkerLoad], clock: str) -> list[str]:
    """One screen: a header, one row per worker, a total row, and a hint at imbalance."""
    head = (
        f"shardwg {st.interface}  port {st.listen_port}  {st.workers} worker(s)  "
        f"{len(st.peers)} peer(s)  up {st.uptime:.0f} s  {clock}"
        + ("  UNDER LOAD" if st.under_load else "")
    )
    lines = [head, ""]
    lines.append(
        f"{'id':>3} {'pid':>7} {'peers':>6}  {'cpu (one core = 100%)':<{BAR_WIDTH + 7}}"
        f" {'rx pkt/s':>9} {'tx pkt/s':>9} {'rx':>13} {'tx':>13} {'drops/s':>8}"
    )
    for r in rows:
        lines.append(_row(str(r.worker), str(r.pid), r, bar(r.cpu) if r.alive else "(dead)"))
    fields = ("cpu", "rx_pps", "tx_pps", "rx_bps", "tx_bps", "drops_ps")
    sums = {f: sum(getattr(r, f) for r in rows) for f in fields}
    total = WorkerLoad(-1, 0, True, sum(r.peers for r in rows), **sums)
    lines.append(_row("all", "", total, f"{total.cpu * 100:.0f}% of a core"))
    busy = max(rows, key=lambda r: r.cpu, default=None)
    if busy is not None and len(rows) > 1 and busy.cpu >= 0.9:
        lines += ["", f"worker {busy.worker} is using a whole core: it caps its peers' traffic"
                      " whatever the other workers do"]  # fmt: skip
    return lines


def _row(ident: str, pid: str, r: WorkerLoad, load: str) -> str:
    return (
        f"{ident:>3} {pid:>7} {r.peers:>6}  {load:<{BAR_WIDTH + 7}}"
        f" {r.rx_pps:>9.0f} {r.tx_pps:>9.0f} {_rate(r.rx_bps):>13} {_rate(r.tx_bps):>13}"
        f" {r.drops_ps:>8.0f}"
    )


def frames(interface: str, interval: float = INTERVAL) -> Iterator[list[str]]:
    """Endless frames, one per `interval`; StatusError when the gateway goes away."""
    prev, t_prev = read_status(interface, interval=0), time.monotonic()
    while True:
        yield []  # the caller waits (and reads keys) between samples
        cur, t = read_status(interface, interval=0), time.monotonic()
        rows = loads(prev, cur, max(t - t_prev, 1e-3))
        prev, t_prev = cur, t
        yield frame(cur, rows, time.strftime("%H:%M:%S"))


def watch(interface: str, count: int = 0, out: TextIO = sys.stdout, keys: int = -1) -> int:
    """Redraw until q / Ctrl-C (or `count` frames). `keys`: a terminal fd to read q from."""
    live = out.isatty()
    if not live and count <= 0:
        count = DEFAULT_PIPE_FRAMES
    shown = 0
    with _cbreak(keys if live else -1) as fd:
        if live:
            out.write(HIDE_CURSOR)
        try:
            for lines in frames(interface):
                if not lines:
                    if _wait_for_quit(fd, INTERVAL):
                        break
                    continue
                if live:
                    lines[0] += "  (q quits)"
                    out.write(CLEAR + "\n".join(lines) + "\n")
                else:
                    out.write(("\n" if shown else "") + "\n".join(lines) + "\n")
                out.flush()
                shown += 1
                if count and shown >= count:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            if live:
                out.write(SHOW_CURSOR)
                out.flush()
    return 0


def _wait_for_quit(fd: int, seconds: float) -> bool:
    """Sleep `seconds`, or less if q arrives on `fd` (True then)."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd < 0:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 64)
            if not data or b"q" in data.lower():
                return True


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[int]:
    """Keys without Enter and without echo, restored on the way out; -1 when no terminal."""
    if fd < 0 or not os.isatty(fd):
        yield -1
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
