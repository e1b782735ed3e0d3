"""The benchmark as a user runs it, kept short: a quick run in a separate process, judged by its
exit code, its JSON and its chart; plus the parts that need no namespaces (choosing the
wireguard-go to race, the syscall-free microbenchmark)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import bench_micro
from lab.bench_env import BinaryError, resolve_wireguard_go, wireguard_go_version
from lab.netns import lab_env
from lab.wggo import BINARY_ENV, wireguard_go_binary

PAIRS = ("wggo-wggo", "shardwg-wggo", "shardwg-shardwg")


def _positive(entry: dict, metric: str) -> float:
    s = entry[metric]
    assert s["samples"] and all(v > 0 for v in s["samples"]), s
    assert s["median"] > 0, s
    return float(s["median"])


@pytest.mark.netns
@pytest.mark.interop
@pytest.mark.slow
def test_bench_quick(tmp_path: Path) -> None:
    """Both directions, the wireguard-go named on the command line (the one on PATH here, so CI
    needs nothing else) and its version in the report, the microbenchmark beside the tunnels."""
    out = tmp_path / "bench-out"
    wggo = shutil.which("wireguard-go")
    assert wggo is not None
    cmd = [sys.executable, "-m", "lab.bench", "--quick", "--only", "tcp1,rtt,handshakes,micro",
           "--seconds", "2", "--micro-batches", "5", "--directions", "recv,send",
           "--wireguard-go", wggo, "--out", str(out)]  # fmt: skip
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=lab_env(),
                        stdin=subprocess.DEVNULL)  # fmt: skip
    log = cp.stdout[-6000:] + cp.stderr[-3000:]
    assert cp.returncode == 0, log
    doc = json.loads((out / "bench.json").read_text())
    assert doc["errors"] == [], log
    meta = doc["meta"]
    assert meta["reps"] == 1 and meta["status"] == "complete", meta
    assert meta["wireguard_go"]["path"] == os.path.realpath(wggo), meta
    assert meta["wireguard_go"]["version"] == wireguard_go_version(wggo), meta
    assert meta["directions"] == ["recv", "send"], meta
    assert meta["shardwg_datapath"].split()[0] in ("native", "python"), meta
    sections = doc["sections"]
    assert {"tcp1", "tcp1_send", "rtt", "handshakes", "cpu", "micro"} <= set(sections), sections
    for pair in PAIRS:
        for sec in ("tcp1", "tcp1_send"):
            _positive(sections[sec][pair], "gbit_s")
            for side in "ab":  # cores per Gbit/s of each end, in each direction
                _positive(sections["cpu"][pair], f"{sec}_cores_per_gbit_{side}")
        _positive(sections["rtt"][pair], "ms")
    assert "tcp1_send" not in sections or "veth" not in sections["tcp1_send"]
    _positive(sections["micro"]["python"], "open_pps")
    _positive(sections["micro"]["python"], "seal_pps")
    _positive(sections["tcp1"]["veth"], "gbit_s")
    for cfg in ("wggo", "shardwg-1w", "shardwg-2w"):
        _positive(sections["handshakes"][cfg], "per_s")
        _positive(sections["handshakes"][cfg], "per_core_s")
    names = {t["target"] for t in doc["targets"]}
    assert any("handshakes per core-second" in n for n in names), names
    assert any("A (shardwg) sends" in n for n in names), names
    assert sum("microbenchmark" in n for n in names) == 2, names
    table = (out / "bench.md").read_text()
    assert "| TCP, 1 stream, A receives (Gbit/s) |" in table, table
    assert "| TCP, 1 stream, A sends (Gbit/s) |" in table, table
    assert f"(wireguard-go {meta['wireguard_go']['version']})" in table, table
    assert "| per-packet Python path (Device.send_packet" in table, table
    assert "PASS" in table or "MISS" in table, table
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install '.[bench]'): no chart to check")
    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", log
    assert png.stat().st_size > 10_000


def test_bench_refuses_a_binary_that_is_not_wireguard_go(tmp_path: Path) -> None:
    """A wrong --wireguard-go stops the run before any namespace, with a clear reason."""
    missing = tmp_path / "nope"
    with pytest.raises(BinaryError, match="no such executable"):
        resolve_wireguard_go(str(missing))
    fake = tmp_path / "wireguard-go"
    fake.write_text("#!/bin/sh\necho hello\n")
    fake.chmod(0o755)
    assert resolve_wireguard_go(str(fake)) == str(fake)
    with pytest.raises(BinaryError, match="did not print a wireguard-go version"):
        wireguard_go_version(str(fake))
    cp = subprocess.run([sys.executable, "-m", "lab.bench", "--only", "tcp1", "--wireguard-go",
                         str(fake), "--out", str(tmp_path / "out")], capture_output=True,
                        text=True, timeout=60, env=lab_env(), stdin=subprocess.DEVNULL)  # fmt: skip
    assert cp.returncode == 2, cp.stdout + cp.stderr
    assert "did not print a wireguard-go version" in cp.stderr, cp.stderr
    assert not (tmp_path / "out").exists()


def test_lab_runs_the_wireguard_go_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "wg-go-build"
    fake.write_text("#!/bin/sh\necho 'wireguard-go v0.0.20990101'\n")
    fake.chmod(0o755)
    monkeypatch.setenv(BINARY_ENV, str(fake))
    assert wireguard_go_binary() == str(fake)
    assert wireguard_go_version(str(fake)) == "0.0.20990101"
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "gone"))
    assert wireguard_go_binary() is None


def test_microbenchmark_pushes_real_packets_both_ways() -> None:
    """Every sealed message decrypts to the packet sealed (the loops raise on any drop), so the
    figures are for work actually done; the open loop refuses replays, so messages are fresh."""
    session = bench_micro.Session()
    msgs = session.seal_batches(1)
    assert len(msgs) == bench_micro.BATCH
    assert len({bytes(m[8:16]) for m in msgs}) == bench_micro.BATCH  # distinct counters
    # header, packet, tag: a packet of the full 1420 MTU is not padded past the MTU
    assert all(len(m) == 16 + bench_micro.PACKET + 16 for m in msgs)
    res = bench_micro.run_once(2)
    assert res["python"]["open_pps"] > 0 and res["python"]["seal_pps"] > 0, res
    assert res["aead"]["seal_pps"] > 0, res
    for op in bench_micro.kernel_functions():  # the batch kernels
        assert res["python-batch"][f"{op}_pps"] > 0, res
        if bench_micro.native_built():
            assert res["native"][f"{op}_pps"] > 0, res
    # what the open loop is timed on: a fresh message opens to the whole packet, a replay is refused
    session = bench_micro.Session()
    batch = session.seal_batches(1)
    out = memoryview(bytearray(bench_micro.MAX_DATAGRAM))

    def open_one(m: bytearray) -> int:
        return session.b.receive_transport(memoryview(m), len(m), bench_micro.ADDR_A, out,
                                           bench_micro.NOW, bench_micro.WALL)  # fmt: skip

    assert [open_one(m) for m in batch] == [bench_micro.PACKET] * len(batch)
    assert bytes(out[: bench_micro.PACKET]) == bytes(bench_micro.ipv4_packet())
    assert all(open_one(m) < 0 for m in batch)


def test_the_report_compares_capped_runs_with_their_own_one_worker_rows() -> None:
    """bench.md's scaling and onepeer tables: each configuration against the 1-worker row
    of the same peer, streams, direction and CPU cap, never across a cap."""
    from lab.bench import Results
    from lab.bench_report import markdown

    r = Results()
    for cfg, g in (("shardwg-1w", 2.0), ("shardwg-2w", 2.5),
                   ("shardwg-1w cap 0.3", 1.0), ("shardwg-2w cap 0.3", 2.0)):  # fmt: skip
        r.add("scaling", cfg, "gbit_s", g, "Gbit/s")
    r.add("scaling", "shardwg-2w cap 0.3", "throttled", 0.8, "fraction")
    for cfg, g in (("shardwg-wggo 1w spread off 4s A->B", 3.0),
                   ("shardwg-wggo 2w spread on 4s A->B", 3.3),
                   ("shardwg-wggo 1w spread off cap 0.3 4s A->B", 1.2),
                   ("shardwg-wggo 2w spread on cap 0.3 4s A->B", 2.4)):  # fmt: skip
        r.add("onepeer", cfg, "gbit_s", g, "Gbit/s")
        r.add("onepeer", cfg, "retransmits", 7, "segments")
    text = markdown({"sections": r.sections(), "meta": {}})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert "| 1.25x |" in rows["2"]
    assert "| 2.00x |" in rows["2, each capped at 0.3 cores"] and "80% of periods" in rows[
        "2, each capped at 0.3 cores"]  # fmt: skip
    assert "| 1.10x |" in rows["shardwg-wggo 2w spread on 4s A->B"]
    assert "| 2.00x |" in rows["shardwg-wggo 2w spread on cap 0.3 4s A->B"]
