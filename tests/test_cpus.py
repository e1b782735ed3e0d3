"""observe/cpus.py: the idle time of our own cores, which `--spread auto` needs (a spread
peer's other workers need a core to run on)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from shardwg.observe.cpus import idle_seconds

_STAT = """cpu  900 0 300 5000 100 0 20 0 0 0
cpu0 400 0 100 2000 50 0 10 0 0 0
cpu1 500 0 200 3000 50 0 10 0 0 0
intr 12345
"""


def test_idle_counts_idle_and_iowait_of_our_cores_only(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(_STAT)
    tick = os.sysconf("SC_CLK_TCK")
    mine = os.sched_getaffinity(0)
    want = sum(t for c, t in ((0, 2050), (1, 3050)) if c in mine) / tick
    assert idle_seconds(str(stat)) == want
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try:  # in a cpuset, the host's other idle cores are of no use to us
        assert idle_seconds(str(stat)) == {0: 2050, 1: 3050}.get(min(old), 0) / tick
    finally:
        os.sched_setaffinity(0, old)


def test_unreadable_stat_means_nothing_idle(tmp_path: Path) -> None:
    assert idle_seconds(str(tmp_path / "missing")) == 0.0
    (tmp_path / "bad").write_text("cpu0 a b c d e\n")
    assert idle_seconds(str(tmp_path / "bad")) == 0.0


def test_the_real_stat_moves_with_time() -> None:
    """Bounded by wall time: over 0.2 s our cores cannot be idle for longer than 0.2 s each."""
    a = idle_seconds()
    time.sleep(0.2)
    d = idle_seconds() - a
    assert 0.0 <= d <= 0.2 * len(os.sched_getaffinity(0)) + 2 / os.sysconf("SC_CLK_TCK")
