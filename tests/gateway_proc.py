"""A real `shardwg run` process inside a test namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from netns import RUN_PREFIX, Namespace, wait_for


def peer_section(p: dict[str, Any]) -> str:
    lines = ["[Peer]", f"PublicKey = {p['public_key']}"]
    if p.get("preshared_key"):
        lines.append(f"PresharedKey = {p['preshared_key']}")
    if p.get("allowed_ips"):
        lines.append(f"AllowedIPs = {', '.join(p['allowed_ips'])}")
    if p.get("endpoint"):
        lines.append(f"Endpoint = {p['endpoint']}")
    if p.get("persistent_keepalive"):
        lines.append(f"PersistentKeepalive = {p['persistent_keepalive']}")
    return "\n".join(lines)


class ShardwgGateway:
    """`shardwg run --config <ifname>.conf --workers N` in `ns`, stopped with SIGTERM."""

    def __init__(
        self,
        ns: Namespace,
        ifname: str,
        private_key_b64: str,
        listen_port: int,
        peers: list[dict[str, Any]],
        addresses: list[str],
        *,
        workers: int = 1,
        mtu: int = 1420,
        extra_interface: str = "",
        extra_args: list[str] | None = None,
        start_timeout: float = 15,
    ) -> None:
        self.ns, self.ifname = ns, ifname
        self.tmp = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{ifname}-")
        self.config_path = Path(self.tmp) / f"{ifname}.conf"
        iface = [
            "[Interface]",
            f"PrivateKey = {private_key_b64}",
            f"ListenPort = {listen_port}",
            f"Address = {', '.join(addresses)}",
            f"MTU = {mtu}",
        ]
        if extra_interface:
            iface.append(extra_interface)
        text = "\n".join(iface) + "\n\n" + "\n\n".join(peer_section(p) for p in peers) + "\n"
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.log_path = Path(self.tmp) / "shardwg.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        cmd = [sys.executable, "-m", "shardwg", "run", "--config", str(self.config_path),
               "--workers", str(workers), *(extra_args or [])]  # fmt: skip
        self.proc: subprocess.Popen[Any] = ns.popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        ok = wait_for(
            lambda: "serving" in self.log_text() or self.proc.poll() is not None, start_timeout
        )
        if not ok or self.proc.poll() is not None:
            log = self.log_text()
            self.close()
            raise RuntimeError(f"shardwg did not start:\n{log}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return int(self.proc.returncode)

    def close(self) -> None:
        self.stop()
        self._log.close()
