"""A real `shardwg run` process in a namespace, started with this interpreter so it runs the
shardwg being tested, not whatever `shardwg` is on PATH."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lab import wgconf
from lab.netns import RUN_PREFIX, LabError, Namespace, stop_pid, wait_for

peer_section = wgconf.peer_section  # the name tests knew it by


class ShardwgGateway:
    """`shardwg run --config <ifname>.conf --workers N` in `ns`, stopped with SIGTERM.

    Started when the log says `ready_marker`; closing the namespace closes it too. The config
    and log live in a temp directory that close() removes unless SWG_KEEP_LOGS is set.
    """

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
        ready_marker: str = "serving",
    ) -> None:
        self.ns, self.ifname, self.workers = ns, ifname, workers
        self.listen_port = listen_port
        self.tmp = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{ifname}-")
        self.config_path = Path(self.tmp) / f"{ifname}.conf"
        text = wgconf.config_text(
            wgconf.interface_section(private_key_b64, listen_port, addresses, mtu, extra_interface),
            peers,
        )
        wgconf.write_secret(self.config_path, text)
        self.log_path = Path(self.tmp) / "shardwg.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self._closed = False
        self.command = [sys.executable, "-m", "shardwg", "run", "--config",
                        str(self.config_path), "--workers", str(workers),
                        *(extra_args or [])]  # fmt: skip
        ns.on_close(self.close)
        self.proc: subprocess.Popen[Any] = ns.popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT
        )
        ok = wait_for(
            lambda: ready_marker in self.log_text() or self.proc.poll() is not None, start_timeout
        )
        if not ok or self.proc.poll() is not None:
            log = self.log_text()
            self.close()
            raise LabError(f"shardwg did not start ({' '.join(self.command)}):\n{log}")

    @property
    def closed(self) -> bool:
        return self._closed

    def config_text(self, redacted: bool = True) -> str:
        """The config the gateway runs, private and preshared keys redacted by default."""
        text = self.config_path.read_text()
        return wgconf.redact(text) if redacted else text

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def show(self, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """`shardwg show <ifname>` in the namespace, unchecked: it may not exist in this build."""
        cmd = [sys.executable, "-m", "shardwg", "show", self.ifname]
        return self.ns.run(cmd, check=False, timeout=timeout)

    def show_json(self, interval: float = 0, timeout: float = 30) -> dict[str, Any]:
        """`shardwg show <ifname> --json` in the namespace, parsed; interval 0 reads the
        counters as they are (no rate sample)."""
        cmd = [sys.executable, "-m", "shardwg", "show", self.ifname, "--json",
               "--interval", str(interval)]  # fmt: skip
        doc: dict[str, Any] = json.loads(self.ns.run(cmd, timeout=timeout).stdout)
        return doc

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait for a graceful exit; SIGKILL the process group (its workers) if it
        overruns. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_pid(self.proc.pid, grace=0, alive=lambda: self.proc.poll() is None)
                self.proc.wait(timeout=5)
        return int(self.proc.returncode)

    def close(self) -> None:
        """Stop, close the log, remove the temp directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if getattr(self, "proc", None) is not None:
            self.stop()
        self._log.close()
        if not os.environ.get("SWG_KEEP_LOGS"):
            shutil.rmtree(self.tmp, ignore_errors=True)
