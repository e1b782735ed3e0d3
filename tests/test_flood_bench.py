"""scripts/flood as a user runs it, kept short: one loaded round in a separate process, judged
by its exit code and its JSON (figures present and sane, not their size: that is the
benchmark's verdict, printed, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import lab_env

pytestmark = [pytest.mark.netns, pytest.mark.interop, pytest.mark.slow]


def test_flood_bench_one_round(tmp_path: Path) -> None:
    out = tmp_path / "flood.json"
    cmd = [sys.executable, "-m", "lab.flood", "--rounds", "1", "--seconds", "2",
           "--rate", "20000", "--json", str(out)]  # fmt: skip
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=lab_env(),
                        stdin=subprocess.DEVNULL)  # fmt: skip
    log = cp.stdout[-6000:] + cp.stderr[-3000:]
    assert cp.returncode == 0, log
    assert "kept " in cp.stdout and ("PASS" in cp.stdout or "MISS" in cp.stdout), log
    doc = json.loads(out.read_text())
    assert len(doc["unloaded_mbit_s"]) == 2 and all(v > 0 for v in doc["unloaded_mbit_s"]), doc
    (rnd,) = doc["rounds"]
    assert rnd["offered_per_s"] > 10_000 and rnd["loaded_mbit_s"] > 0, rnd
    assert rnd["under_load"] and all(share < 1 for share in rnd["shares"]), rnd
    assert rnd["kernel_shed"] > 0 and rnd["cookie_replies_per_s"] > 0, rnd
    assert 0 < rnd["handshakes_read_per_s"] < rnd["offered_per_s"], rnd
    assert doc["ratio"] > 0


def test_flood_bench_refuses_bad_arguments() -> None:
    cp = subprocess.run([sys.executable, "-m", "lab.flood", "--rounds", "0"],
                        capture_output=True, text=True, timeout=30)  # fmt: skip
    assert cp.returncode == 2 and "--rounds" in cp.stderr, cp.stderr
