"""An iperf3 TCP run between namespaces: the throughput number people compare with other VPNs."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from lab.netns import LabError, Namespace, listening, stop_popen, wait_for


def iperf3_problem() -> str | None:
    """Why iperf3 runs cannot happen here, or None."""
    return None if shutil.which("iperf3") else "iperf3 is not installed (apt-get install iperf3)"


@dataclass
class IperfResult:
    """Receiver-side throughput (what arrived) and the sender's TCP retransmits."""

    seconds: float
    bytes_received: int
    bits_per_second: float
    retransmits: int

    @property
    def gbit_s(self) -> float:
        return self.bits_per_second / 1e9


def iperf3_tcp(
    server_ns: Namespace,
    client_ns: Namespace,
    addr: str,
    port: int = 5201,
    seconds: float = 5,
    reverse: bool = False,
) -> IperfResult:
    """One TCP test from client_ns to `addr` (an address of server_ns), or the other way with
    reverse. The one-off server (-1) exits after it; both are stopped by PID regardless."""
    problem = iperf3_problem()
    if problem:
        raise LabError(problem)
    server = server_ns.popen(
        ["iperf3", "-s", "-1", "-B", addr, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        if not wait_for(lambda: listening(server_ns, port) or server.poll() is not None, 10):
            raise LabError(f"iperf3 server on {addr}:{port} did not listen")
        if server.poll() is not None:
            err = server.stderr.read().decode(errors="replace") if server.stderr else ""
            raise LabError(f"iperf3 server exited rc={server.returncode}: {err}")
        cmd = ["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J",
               "--connect-timeout", "5000", *(["-R"] if reverse else [])]  # fmt: skip
        cp = client_ns.run(cmd, check=False, timeout=seconds + 30)
        try:
            doc: dict[str, Any] = json.loads(cp.stdout)
        except json.JSONDecodeError:
            doc = {}
        if cp.returncode != 0 or "error" in doc or "end" not in doc:
            reason = doc.get("error") or cp.stderr.strip() or cp.stdout.strip()[-500:]
            raise LabError(f"iperf3 client rc={cp.returncode}: {reason}")
        recv, sent = doc["end"]["sum_received"], doc["end"].get("sum_sent", {})
        return IperfResult(
            seconds=float(recv["seconds"]),
            bytes_received=int(recv["bytes"]),
            bits_per_second=float(recv["bits_per_second"]),
            retransmits=int(sent.get("retransmits", 0)),
        )
    finally:
        stop_popen(server, grace=1.0)
