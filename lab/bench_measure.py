"""What the benchmark reads and runs: CPU time and memory of processes from /proc, and iperf3
runs (TCP with N streams, UDP at a fixed rate) that can run several at once.

CPU is utime+stime from /proc/<pid>/stat (all threads), plus cutime+cstime for a process whose
children come and go (a shardwg supervisor reaps replaced workers). Memory is VmRSS and VmHWM
from /proc/<pid>/status and Pss from smaps_rollup: forked workers share pages with their
supervisor, so RSS double-counts and PSS does not.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from dataclasses import dataclass
from typing import Any

from lab.iperf import iperf3_problem
from lab.netns import LabError, Namespace, listening, stop_popen, wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from 3 (state) on, comm may hold spaces


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """utime+stime of pid (every thread), optionally plus its reaped children's; 0 if gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if with_children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of pid (/proc/<pid>/task/*/children, else a scan of /proc)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
        return sorted(set(kids))
    except OSError:
        pass
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(name))
    return sorted(kids)


@dataclass
class Tracked:
    """One tunnel process the benchmark accounts for."""

    pid: int
    role: str  # "wireguard-go", "supervisor", "worker"
    with_children: bool = False

    def cpu(self) -> float:
        return cpu_seconds(self.pid, self.with_children)


def cpu_snapshot(procs: list[Tracked]) -> dict[int, float]:
    return {p.pid: p.cpu() for p in procs}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots; a PID seen only after counts from zero."""
    return sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items())


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat; busy counts steal too (lost to us)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    total = sum(v[:8])  # user..steal; guest time is already inside user
    return total - idle, total


def machine_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Fraction (0..1) of the whole machine's CPU busy between two machine_ticks()."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pid: int) -> dict[str, int]:
    """{"rss_kib", "hwm_kib", "pss_kib"} of a process (zeros once it is gone)."""
    pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except OSError:
        pass
    return {"rss_kib": _status_kib(pid, "VmRSS"), "hwm_kib": _status_kib(pid, "VmHWM"),
            "pss_kib": pss}  # fmt: skip


# ------------------------------------------------------------------------------------ stats


def series(samples: list[float], unit: str) -> dict[str, Any]:
    """The JSON shape of every measured quantity: samples and their median, min and max."""
    vals = [float(s) for s in samples]
    return {
        "unit": unit,
        "samples": vals,
        "median": statistics.median(vals) if vals else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
    }


# ------------------------------------------------------------------------------------ iperf3


@dataclass
class IperfRun:
    """What one iperf3 client reported (receiver side for TCP; for UDP what the server got)."""

    seconds: float
    bits_per_second: float
    retransmits: int = 0
    packets: int = 0
    lost_packets: int = 0

    @property
    def gbit_s(self) -> float:
        return self.bits_per_second / 1e9

    @property
    def lost_percent(self) -> float:
        return 100.0 * self.lost_packets / self.packets if self.packets else 100.0

    @property
    def received_pps(self) -> float:
        got = self.packets - self.lost_packets
        return got / self.seconds if self.seconds > 0 else 0.0


class IperfJob:
    """An iperf3 server in server_ns (one-off, bound to addr:port) and a client in client_ns.

    start() starts both and returns at once, so several jobs can run together; finish() waits.
    udp_rate (bits/s) makes it a UDP test with datagrams of udp_len bytes; reverse (-R) makes
    the server send and the client receive, which measures the other direction of a tunnel."""

    def __init__(
        self,
        server_ns: Namespace,
        client_ns: Namespace,
        addr: str,
        port: int,
        seconds: float,
        streams: int = 1,
        udp_rate: float | None = None,
        udp_len: int = 1392,
        reverse: bool = False,
        cport: int | None = None,
    ) -> None:
        problem = iperf3_problem()
        if problem:
            raise LabError(problem)
        self.server_ns, self.client_ns, self.addr, self.port = server_ns, client_ns, addr, port
        self.seconds, self.streams = seconds, streams
        self.udp_rate, self.udp_len, self.reverse = udp_rate, udp_len, reverse
        self.cport = cport  # the client's first port (iperf3 gives stream i cport + i)
        self.server: subprocess.Popen[Any] | None = None
        self.client: subprocess.Popen[str] | None = None

    def start(self) -> IperfJob:
        return self.start_server().start_client()

    def start_server(self) -> IperfJob:
        self.server = self.server_ns.popen(
            ["iperf3", "-s", "-1", "-B", self.addr, "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        server = self.server
        if not wait_for(lambda: listening(self.server_ns, self.port) or server.poll() is not None,
                        10):  # fmt: skip
            self.stop()
            raise LabError(f"iperf3 server on {self.addr}:{self.port} did not listen")
        if server.poll() is not None:
            err = server.stderr.read().decode(errors="replace") if server.stderr else ""
            raise LabError(f"iperf3 server exited rc={server.returncode}: {err}")
        return self

    def start_client(self) -> IperfJob:
        cmd = ["iperf3", "-c", self.addr, "-p", str(self.port), "-t", f"{self.seconds:g}", "-J",
               "--connect-timeout", "5000", "-P", str(self.streams)]  # fmt: skip
        if self.reverse:
            cmd.append("-R")
        if self.cport is not None:
            cmd += ["--cport", str(self.cport)]
        if self.udp_rate is not None:
            # -w: a 4 MiB socket buffer at both ends, or iperf3 itself drops bursts on a busy host
            cmd += ["-u", "-b", f"{int(self.udp_rate)}", "-l", str(self.udp_len), "-w", "4M"]
        self.client = self.client_ns.popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def finish(self) -> IperfRun:
        assert self.client is not None, "start() first"
        try:
            try:
                out, err = self.client.communicate(timeout=self.seconds + 40)
            except subprocess.TimeoutExpired:
                stop_popen(self.client, grace=1.0)
                raise LabError(f"iperf3 client to {self.addr}:{self.port} overran") from None
            try:
                doc: dict[str, Any] = json.loads(out)
            except json.JSONDecodeError:
                doc = {}
            if self.client.returncode != 0 or "error" in doc or "end" not in doc:
                reason = doc.get("error") or err.strip() or out.strip()[-500:]
                raise LabError(f"iperf3 client rc={self.client.returncode}: {reason}")
            return parse_iperf(doc, udp=self.udp_rate is not None)
        finally:
            self.stop()

    def run(self) -> IperfRun:
        return self.start().finish()

    def stop(self) -> None:
        for proc in (self.client, self.server):
            if proc is not None:
                stop_popen(proc, grace=1.0)


def parse_iperf(doc: dict[str, Any], udp: bool) -> IperfRun:
    """The numbers that matter from iperf3 -J output (3.9+ layout)."""
    end = doc["end"]
    if udp:  # sum_received (3.12+; else "sum"): packets sent, lost_packets of those
        s = end.get("sum_received") or end["sum"]
        packets = int(s.get("packets", 0))
        lost = min(int(s.get("lost_packets", 0)), packets)
        return IperfRun(float(s["seconds"]), float(s["bits_per_second"]), packets=packets,
                        lost_packets=lost)  # fmt: skip
    recv, sent = end["sum_received"], end.get("sum_sent", {})
    return IperfRun(float(recv["seconds"]), float(recv["bits_per_second"]),
                    retransmits=int(sent.get("retransmits", 0)))  # fmt: skip
