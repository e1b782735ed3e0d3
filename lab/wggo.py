"""A real wireguard-go peer in a namespace: the interop baseline shardwg is measured against."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lab import wgconf
from lab.keys import pubkey
from lab.netns import (
    RUN_PREFIX,
    LabError,
    Namespace,
    add_address,
    is_v6,
    lab_env,
    missing_tools,
    stop_popen,
    wait_for,
)

UAPI_DIR = Path("/var/run/wireguard")
_INSTALL_HINT = "apt-get install wireguard-go wireguard-tools"
# A wireguard-go binary to run instead of the one on PATH (set by `scripts/bench --wireguard-go`;
# also lets the interop tests race another build).
BINARY_ENV = "LAB_WIREGUARD_GO"


def wireguard_go_binary() -> str | None:
    """The wireguard-go executable the lab runs: $LAB_WIREGUARD_GO, else the one on PATH."""
    chosen = os.environ.get(BINARY_ENV)
    if chosen:
        return chosen if os.path.isfile(chosen) and os.access(chosen, os.X_OK) else None
    return shutil.which("wireguard-go")


def wireguard_go_problem() -> str | None:
    """Why wireguard-go peers cannot run here, or None."""
    missing = missing_tools("wg")
    if wireguard_go_binary() is None:
        chosen = os.environ.get(BINARY_ENV)
        missing.insert(0, f"{BINARY_ENV}={chosen} (not executable)" if chosen else "wireguard-go")
    return f"missing {', '.join(missing)} ({_INSTALL_HINT})" if missing else None


class WireguardGo:
    """wireguard-go on `ifname` in `ns`, configured with `wg setconf`, addressed and routed.

    Debian's 0.0.20220316 takes `-f/--foreground IFNAME` and nothing else (any other first
    argument, "-h" included, is taken as an interface name and daemonizes!). Logs go to a temp
    file (log_text()); LOG_LEVEL=verbose makes them useful. Closing the namespace closes it too.
    """

    def __init__(
        self,
        ns: Namespace,
        ifname: str,
        private_key_b64: str,
        listen_port: int,
        peers: list[dict[str, Any]],
        addresses: list[str],
        mtu: int = 1420,
        routes: list[str] | None = None,
        log_level: str = "verbose",
        start_timeout: float = 10,
    ) -> None:
        problem = wireguard_go_problem()
        if problem:
            raise LabError(f"cannot start a wireguard-go peer: {problem}")
        self.ns, self.ifname = ns, ifname
        self.private_key, self.public_key = private_key_b64, pubkey(private_key_b64)
        self.listen_port = listen_port
        self.peers, self.addresses, self.mtu = peers, addresses, mtu
        self.sock_path = UAPI_DIR / f"{ifname}.sock"
        if self.sock_path.exists():
            raise LabError(f"{self.sock_path} exists: interface names must be unique per run")
        self.proc: subprocess.Popen[Any] | None = None
        self._tmp = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{ifname}-")
        self.log_path = Path(self._tmp) / "wireguard-go.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        ns.on_close(self.close)
        try:
            self.proc = ns.popen(
                [str(wireguard_go_binary()), "-f", ifname],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=lab_env({"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": log_level}),
            )
            self._start(routes or [], start_timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, routes: list[str], t: float) -> None:
        proc = self.proc
        assert proc is not None
        if not wait_for(lambda: self.sock_path.exists() or proc.poll() is not None, t):
            raise LabError(f"wireguard-go {self.ifname}: no uapi socket after {t}s")
        if proc.poll() is not None:
            raise LabError(f"wireguard-go {self.ifname} exited: {self.log_text()}")
        conf = wgconf.config_text(
            wgconf.interface_section(self.private_key, self.listen_port), self.peers
        )
        self.wg("setconf", self.ifname, self._secret_file("wg.conf", conf))
        for cidr in self.addresses:
            add_address(self.ns, self.ifname, cidr)
        self.ns.ip("link", "set", self.ifname, "mtu", str(self.mtu), "up")
        for prefix in routes:
            self.ns.ip("-6" if is_v6(prefix) else "-4", "route", "add", prefix, "dev", self.ifname)

    def _secret_file(self, name: str, text: str) -> str:
        return str(wgconf.write_secret(os.path.join(self._tmp, name), text))

    def config_text(self, redacted: bool = True) -> str:
        """What this peer runs, as the wg-quick file an operator would write."""
        text = wgconf.config_text(
            wgconf.interface_section(
                self.private_key, self.listen_port, self.addresses, self.mtu
            ),
            self.peers,
        )
        return wgconf.redact(text) if redacted else text

    def wg(self, *args: str) -> str:
        """Run `wg ...` in the namespace (it finds the uapi socket by interface name)."""
        return self.ns.run(["wg", *args]).stdout

    def set_peer(
        self,
        public_key: str,
        *,
        allowed_ips: list[str] | None = None,
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
        preshared_key: str | None = None,
        remove: bool = False,
    ) -> None:
        """`wg set <if> peer ...`: only the given fields change (allowed_ips replaces the list)."""
        args = ["set", self.ifname, "peer", public_key]
        if remove:
            args.append("remove")
        if endpoint is not None:
            args += ["endpoint", endpoint]
        if allowed_ips is not None:
            args += ["allowed-ips", ",".join(allowed_ips)]
        if persistent_keepalive is not None:
            args += ["persistent-keepalive", str(persistent_keepalive or "off")]
        if preshared_key is not None:
            args += ["preshared-key", self._secret_file("psk", preshared_key + "\n")]
        self.wg(*args)

    def show(self) -> str:
        """`wg show <if>`: the human view (wg hides the private key itself)."""
        return self.wg("show", self.ifname)

    def show_dump(self) -> str:
        return self.wg("show", self.ifname, "dump")

    def _peer_field(self, peer_pub_b64: str, field: str) -> str | None:
        for line in self.wg("show", self.ifname, field).splitlines():
            parts = line.split("\t")
            if parts[0] == peer_pub_b64:
                return "\t".join(parts[1:])
        return None

    def latest_handshake(self, peer_pub_b64: str) -> int:
        """Unix time of the last handshake with the peer, 0 for never (or unknown peer)."""
        return int(self._peer_field(peer_pub_b64, "latest-handshakes") or 0)

    def transfer(self, peer_pub_b64: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) for the peer."""
        rx, _, tx = (self._peer_field(peer_pub_b64, "transfer") or "0\t0").partition("\t")
        return int(rx), int(tx)

    def endpoint(self, peer_pub_b64: str) -> str | None:
        ep = self._peer_field(peer_pub_b64, "endpoints")
        return None if ep in (None, "", "(none)") else ep

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop by PID; remove the uapi socket it may leave (exact path); drop temp files unless
        SWG_KEEP_LOGS is set. Idempotent."""
        if self.proc is not None:
            stop_popen(self.proc)
            self.proc = None
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
        if not self._log.closed:
            self._log.close()
        if not os.environ.get("SWG_KEEP_LOGS"):
            shutil.rmtree(self._tmp, ignore_errors=True)
