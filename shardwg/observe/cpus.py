"""How many cores this process may use (CPU affinity, capped by a cgroup CPU quota), and the
CPU time spent on them: a process's (cpu_seconds) and our cores' idle time (idle_seconds).

`shardwg run` starts one worker per usable core by default, the container entrypoint sizes
SHARDWG_WORKERS=auto the same way, and `shardwg check` reports the three figures.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def affinity_cores() -> int:
    """Cores the scheduler lets this process run on (taskset, cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cgroup_cpu_quota(
    root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"
) -> float | None:
    """CPUs allowed by the tightest CPU quota on this process's cgroup path (v2 cpu.max or
    v1 cfs quota), as a fraction (1.5: one and a half cores); None when unlimited or
    unknown."""
    limits: list[float] = []
    try:
        with open(proc_cgroup) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, rel = entry
        files: tuple[str, ...]
        if controllers == "":  # v2 unified
            base, files = Path(root), ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base, files = Path(root) / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = Path(rel.lstrip("/")).parts
        for depth in range(len(parts), -1, -1):
            d = base.joinpath(*parts[:depth])
            try:
                if len(files) == 1:
                    quota_text, period_text = (d / files[0]).read_text().split()[:2]
                else:
                    quota_text = (d / files[0]).read_text().strip()
                    period_text = (d / files[1]).read_text().strip()
            except (OSError, ValueError):
                continue
            if quota_text not in ("max", "-1") and int(period_text) > 0:
                limits.append(int(quota_text) / int(period_text))
    return min(limits) if limits else None


def cgroup_cpu_limit(
    root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"
) -> int | None:
    """Whole CPUs allowed by the tightest CPU quota (cgroup_cpu_quota), rounded up; None
    when unlimited or unknown."""
    quota = cgroup_cpu_quota(root, proc_cgroup)
    return None if quota is None else max(1, math.ceil(quota))


def default_workers(cores: int | None = None, limit: int | None = -1) -> int:
    """Usable cores: affinity capped by the cgroup quota (the arguments override the probes)."""
    cores = affinity_cores() if cores is None else cores
    limit = cgroup_cpu_limit() if limit == -1 else limit
    return max(1, min(cores, limit) if limit is not None else cores)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` from /proc (0.0 when it is gone)."""
    if pid <= 0:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def idle_seconds(stat: str = "/proc/stat") -> float:
    """Idle CPU seconds so far (idle + iowait) of the cores this process may run on, summed:
    the difference over an interval, divided by it, is how many of our cores sat idle.
    Why only ours: in a cpuset (a container) the host's other idle cores are of no use.
    0.0 when /proc/stat cannot be read (then nothing looks idle)."""
    try:
        mine = os.sched_getaffinity(0)
    except AttributeError:
        mine = set(range(os.cpu_count() or 1))
    total = 0
    try:
        with open(stat) as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *ticks = line.split()
                if name[3:].isdigit() and int(name[3:]) in mine and len(ticks) >= 5:
                    total += int(ticks[3]) + int(ticks[4])
    except (OSError, ValueError):
        return 0.0
    return total / _CLK_TCK
