"""lab/cpucap.py: a CPU budget per process really caps it, and the lab's groups go away.

The bench's `--worker-cpu` rests on this: if the cap did not hold, a "worker-bound" scaling
figure would be the same shared-core figure under another name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.cpucap import CpuCap, cpu_cap_problem
from lab.harness import Harness
from lab.keys import keypair
from lab.netns import LabError, unique_ifname

BUSY = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 30: pass\n"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_of(pid: int) -> str:
    """The process's group in the hierarchy that holds the cpu controller (v1's cpu line,
    else v2's single line)."""
    lines = [ln.split(":", 2) for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    for _num, controllers, path in lines:
        if "cpu" in controllers.split(","):
            return path
    return next(path for num, _c, path in lines if num == "0")


@pytest.fixture
def cap_ok() -> None:
    problem = cpu_cap_problem()
    if problem:
        pytest.skip(problem)


def test_a_capped_busy_loop_gets_its_budget_and_no_more(cap_ok: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    cap = CpuCap(0.25)
    try:
        group = cap.add(child.pid, "busy")
        assert _group_of(child.pid).endswith(group.name)
        before = cap.periods()
        start, t0 = _cpu_seconds(child.pid), time.monotonic()
        time.sleep(1.5)
        used = (_cpu_seconds(child.pid) - start) / (time.monotonic() - t0)
        seen, throttled = cap.periods()
        # uncapped it would use a whole core; the budget is a quarter (clock ticks: +-0.05)
        assert used < 0.35, used
        assert used > 0.1, used
        assert throttled > seen / 2, (seen, throttled)
        assert cap.throttled_since(before) > 0.5
    finally:
        child.kill()
        child.wait()
        cap.close()
    assert not group.exists()


def test_close_returns_a_live_process_to_the_root_group(cap_ok: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    cap = CpuCap(0.5)
    try:
        group = cap.add(child.pid, "back")
        cap.close()
        assert not group.exists()
        assert _group_of(child.pid) == "/", _group_of(child.pid)
    finally:
        child.kill()
        child.wait()
        cap.close()


@pytest.mark.parametrize("cores", [0, -1, 0.001, 100])
def test_a_budget_out_of_range_is_refused(cores: float) -> None:
    with pytest.raises(LabError, match="out of range"):
        CpuCap(cores)


@pytest.mark.parametrize(("cores", "period_us"), [(0.3, 2000), (1, 999), (1, 2_000_000)])
def test_a_period_without_the_kernels_minimum_budget_is_refused(
    cores: float, period_us: int
) -> None:
    with pytest.raises(LabError, match="1 ms"):
        CpuCap(cores, period_us)


def test_the_period_is_what_the_group_gets(cap_ok: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    cap = CpuCap(0.3, 3400)
    try:
        group = cap.add(child.pid, "period")
        if cap.version == "v2":
            assert (group / "cpu.max").read_text().split() == ["1020", "3400"]
        else:
            assert (group / "cpu.cfs_period_us").read_text().strip() == "3400"
            assert (group / "cpu.cfs_quota_us").read_text().strip() == "1020"
    finally:
        child.kill()
        child.wait()
        cap.close()


@pytest.mark.netns
def test_the_harness_caps_each_worker_of_a_gateway(netns_factory: Harness, cap_ok: None) -> None:
    (ns,) = netns_factory(1, "cap")
    priv, _pub = keypair()
    gw = netns_factory.gateway(ns, unique_ifname("cap"), priv, 51899, [], ["10.77.0.1/24"],
                               workers=2)  # fmt: skip
    cap = netns_factory.cap_workers(gw, 0.4)
    pids = [int(w["pid"]) for w in gw.show_json()["worker_stats"]]
    assert len(cap.groups) == 2
    assert sorted(_group_of(p).rsplit("/", 1)[1] for p in pids) == sorted(
        g.name for g in cap.groups)  # fmt: skip
    groups = list(cap.groups)
    netns_factory.close()
    assert not any(g.exists() for g in groups)
