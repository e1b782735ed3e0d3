"""The demo end to end, as a user runs it: a separate process, judged by its exit code and the
sha256 lines of its summary (it is the same lab the interop tests use, driven as a script)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lab.netns import lab_env

pytestmark = [pytest.mark.netns, pytest.mark.interop]

TRANSFER = re.compile(
    r"^\s+(peer\d+) -> site-a: (\d+) bytes .*sha256 (match|MISMATCH)\n"
    r"\s+sent\s+([0-9a-f]{64})\n"
    r"\s+received\s+([0-9a-f]{64})$",
    re.M,
)


def test_demo_two_peers() -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "lab.demo", "--peers", "2"],
        capture_output=True,
        text=True,
        timeout=180,
        env=lab_env(),
        stdin=subprocess.DEVNULL,
    )
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out
    transfers = TRANSFER.findall(cp.stdout)
    assert [t[0] for t in transfers] == ["peer1", "peer2"], out
    for peer, size, verdict, sent, received in transfers:
        assert verdict == "match" and sent == received, f"{peer}: {sent} != {received}\n{out}"
        assert int(size) == 50 << 20, f"{peer}: {size} bytes\n{out}"
    assert "demo OK" in cp.stdout, out
