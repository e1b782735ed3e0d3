"""The benchmark as a user runs it, kept short: a quick run of three sections in a separate
process, judged by its exit code, its JSON and its chart."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import lab_env

pytestmark = [pytest.mark.netns, pytest.mark.interop, pytest.mark.slow]

PAIRS = ("wggo-wggo", "shardwg-wggo", "shardwg-shardwg")


def _positive(entry: dict, metric: str) -> float:
    s = entry[metric]
    assert s["samples"] and all(v > 0 for v in s["samples"]), s
    assert s["median"] > 0, s
    return float(s["median"])


def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench-out"
    cmd = [sys.executable, "-m", "lab.bench", "--quick", "--only", "tcp1,rtt,handshakes",
           "--seconds", "2", "--out", str(out)]  # fmt: skip
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=lab_env(),
                        stdin=subprocess.DEVNULL)  # fmt: skip
    log = cp.stdout[-6000:] + cp.stderr[-3000:]
    assert cp.returncode == 0, log
    doc = json.loads((out / "bench.json").read_text())
    assert doc["errors"] == [], log
    assert doc["meta"]["reps"] == 1 and doc["meta"]["status"] == "complete", doc["meta"]
    sections = doc["sections"]
    assert {"tcp1", "rtt", "handshakes", "cpu"} <= set(sections), sorted(sections)
    for pair in PAIRS:
        _positive(sections["tcp1"][pair], "gbit_s")
        _positive(sections["rtt"][pair], "ms")
        _positive(sections["cpu"][pair], "tcp1_cores_per_gbit_a")
    _positive(sections["tcp1"]["veth"], "gbit_s")
    for cfg in ("wggo", "shardwg-1w", "shardwg-2w"):
        _positive(sections["handshakes"][cfg], "per_s")
        _positive(sections["handshakes"][cfg], "per_core_s")
    names = {t["target"] for t in doc["targets"]}
    assert any("handshakes per core-second" in n for n in names), names
    table = (out / "bench.md").read_text()
    assert "| TCP, 1 stream (Gbit/s) |" in table and ("PASS" in table or "MISS" in table), table
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install '.[bench]'): no chart to check")
    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", log
    assert png.stat().st_size > 10_000
