"""A CPU budget per process, from the kernel's cpu controller (cgroup v1 or v2).

Why: on this 2-core box both tunnel ends, iperf3 and the kernel share the cores, so one
worker per end already keeps the machine busy and a second worker has no core to run on.
Capping every worker at a fraction of a core makes the workers the bottleneck while the load
generators keep spare CPU, which is what a box with a core per worker looks like, scaled
down. The period is short (10 ms) so a throttled worker stalls for milliseconds, not for the
default period's 100 ms, which TCP would see as loss.
"""

from __future__ import annotations

import os
from pathlib import Path

from lab.netns import RUN_PREFIX, LabError

PERIOD_US = 10_000
V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")


def cpu_controller() -> tuple[str, Path] | None:
    """("v1" | "v2", the hierarchy's root) where the cpu controller is mounted, or None."""
    if (V2_ROOT / "cgroup.controllers").exists():
        if "cpu" in (V2_ROOT / "cgroup.controllers").read_text().split():
            return "v2", V2_ROOT
        return None
    if (V1_ROOT / "cpu.cfs_quota_us").exists():
        return "v1", V1_ROOT
    return None


def cpu_cap_problem() -> str | None:
    """Why processes cannot be given a CPU budget here, or None."""
    if os.geteuid() != 0:
        return "CPU caps need root (cgroup files)"
    if cpu_controller() is None:
        return "no cgroup cpu controller is mounted (v1 at /sys/fs/cgroup/cpu or v2)"
    return None


class CpuCap:
    """One cgroup per capped process, each limited to `cores` (a fraction of one core or
    more); close() moves what is left back to the root group and removes the groups.

    Group names carry this run's prefix, so cleanup never touches another run's groups.
    """

    def __init__(self, cores: float, period_us: int = PERIOD_US) -> None:
        """`period_us`: the budget's period; a capped process that spends its budget early
        stalls for the rest of it (the kernel takes at least 1 ms of budget per period)."""
        if not 0.01 <= cores <= 64:
            raise LabError(f"a CPU cap of {cores} cores is out of range (0.01..64)")
        if not 1000 <= period_us <= 1_000_000 or cores * period_us < 1000:
            raise LabError(f"a period of {period_us} us gives {cores} cores less than the "
                           "kernel's 1 ms of budget, or is out of range (1 ms..1 s)")  # fmt: skip
        problem = cpu_cap_problem()
        if problem:
            raise LabError(problem)
        found = cpu_controller()
        assert found is not None
        self.version, self.root = found
        self.cores = cores
        self.period_us = period_us
        self.groups: list[Path] = []

    def add(self, pid: int, tag: str) -> Path:
        """Put process `pid` (all its threads) into a new group of its own under the cap."""
        group = self.root / f"{RUN_PREFIX}cap-{os.getpid()}-{tag}"
        group.mkdir()
        self.groups.append(group)
        quota = max(1000, round(self.cores * self.period_us))
        if self.version == "v1":
            (group / "cpu.cfs_period_us").write_text(f"{self.period_us}\n")
            (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        else:
            if "cpu" not in (self.root / "cgroup.subtree_control").read_text().split():
                (self.root / "cgroup.subtree_control").write_text("+cpu\n")
            (group / "cpu.max").write_text(f"{quota} {self.period_us}\n")
        (group / "cgroup.procs").write_text(f"{pid}\n")
        return group

    def periods(self) -> tuple[int, int]:
        """(periods, periods throttled) summed over the groups (cpu.stat): a throttled period
        is one in which a capped process used up its budget, i.e. it was the bottleneck."""
        seen = throttled = 0
        for group in self.groups:
            for line in (group / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "nr_periods":
                    seen += int(value)
                elif key == "nr_throttled":
                    throttled += int(value)
        return seen, throttled

    def throttled_since(self, before: tuple[int, int]) -> float:
        """The share of periods since `before` (a periods() reading) that were throttled."""
        seen, throttled = (a - b for a, b in zip(self.periods(), before, strict=True))
        return throttled / max(seen, 1)

    def close(self) -> None:
        errors: list[OSError] = []
        for group in reversed(self.groups):
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    try:
                        (self.root / "cgroup.procs").write_text(f"{pid}\n")
                    except ProcessLookupError:
                        pass  # it exited meanwhile
                group.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(e)
        self.groups.clear()
        if errors:
            raise LabError(f"could not remove CPU cap groups: {errors[0]}")
