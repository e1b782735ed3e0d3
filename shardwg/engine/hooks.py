"""wg-quick's PreUp/PostUp/PreDown/PostDown hooks and DNS, at the moments wg-quick runs them.

wg-quick (a bash script under `set -e -o pipefail`) runs every hook as `(eval "$hook")` with
each `%i` replaced by the interface name, in the order written, and:

- `up`: PreUp, create the interface, configure it, addresses, MTU and link up, DNS
  (`resolvconf -a IFACE -m 0 -x`), routes, PostUp. If anything fails on the way, its EXIT trap
  deletes the interface (and the DNS entry) and nothing further runs: no later hook, no
  PreDown, no PostDown.
- `down`: PreDown, delete the interface, remove the DNS entry, PostDown.

Here every hook is `bash -e -o pipefail -c HOOK`, which keeps wg-quick's semantics (a command
failing inside a hook fails the hook, `a; b` stops at `a`), with stdin from /dev/null and the
gateway's stdout and stderr. The supervisor calls the phases (`engine/supervisor.py`); while a
PostUp or PreDown hook runs it keeps serving the UAPI through `pump`, so hooks that call
`wg set %i ...` (a common PostUp) work instead of deadlocking.

Hooks run as root from the config file: whoever can write that file can run commands as root.
As wg-quick does, we rely on the file being root's alone; a hook-bearing config writable by
group or others, or owned by another user, is refused (SECURITY.md).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shardwg.config.model import InterfaceConfig

log = logging.getLogger("shardwg.engine.hooks")

SHELL = ("bash", "-e", "-o", "pipefail", "-c")  # wg-quick's own `set -e -o pipefail`
PHASES = ("PreUp", "PostUp", "PreDown", "PostDown")
PUMP_INTERVAL = 0.05  # seconds between `pump` calls while a hook runs
INTERFACE_ORDER = "/etc/resolvconf/interface-order"
_NAMESERVER = re.compile(r"^[0-9.]+$|^.*:.*$")  # wg-quick's test: an IP is a server


class HookError(Exception):
    """A hook (or resolvconf) failed; str() says which and how."""


def substitute(hook: str, ifname: str) -> str:
    """wg-quick's `${hook//%i/$INTERFACE}`: every %i, literally."""
    return hook.replace("%i", ifname)


def split_dns(entries: Sequence[str]) -> tuple[list[str], list[str]]:
    """DNS = entries -> (name servers, search domains), by wg-quick's rule."""
    servers = [e for e in entries if _NAMESERVER.match(e)]
    return servers, [e for e in entries if not _NAMESERVER.match(e)]


def resolvconf_input(entries: Sequence[str]) -> str:
    """What wg-quick pipes into resolvconf: nameserver lines, then one search line."""
    servers, search = split_dns(entries)
    lines = [f"nameserver {s}" for s in servers]
    if search:
        lines.append(f"search {' '.join(search)}")
    return "".join(line + "\n" for line in lines)


def resolvconf_name(ifname: str, order_file: str = INTERFACE_ORDER) -> str:
    """The record name: wg-quick prefixes the first `NAME*` pattern of Debian resolvconf's
    interface-order ("tun." for `tun*`) so our record sorts where VPNs belong."""
    try:
        with open(order_file) as f:
            for line in f:
                m = re.fullmatch(r"([A-Za-z0-9-]+)\*", line.strip())
                if m:
                    return f"{m.group(1)}.{ifname}"
    except OSError:
        pass
    return ifname


def trust_problem(path: str | None) -> str | None:
    """Why the hooks in `path` must not run as root, or None: the file must be writable by
    its owner alone, and that owner must be root or us."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot stat {path}: {exc.strerror}"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {st.st_mode & 0o777:04o})"
    return None


@dataclass
class Hooks:
    """One gateway's hooks and DNS; the supervisor calls the phases in wg-quick's order."""

    ifname: str
    interface: InterfaceConfig
    run_hooks: bool = True  # False: --no-hooks
    set_dns_enabled: bool = True  # False: --no-dns
    up: bool = False  # PostUp finished: PreDown/PostDown are due at shutdown
    dns_set: bool = False
    _resolvconf: str | None = field(default=None, repr=False)

    def commands(self, phase: str) -> list[str]:
        i = self.interface
        raw = {"PreUp": i.pre_up, "PostUp": i.post_up, "PreDown": i.pre_down,
               "PostDown": i.post_down}[phase]  # fmt: skip
        return [substitute(h, self.ifname) for h in raw]

    def configured(self) -> int:
        return sum(len(self.commands(p)) for p in PHASES)

    def run(self, phase: str, pump: Callable[[], bool] | None = None) -> None:
        """Run `phase`'s hooks in order; HookError at the first failure (later ones do not run).

        `pump` is called every PUMP_INTERVAL while a hook runs; returning False abandons the
        hook (SIGTERM to its process group) and fails it: the gateway is being stopped."""
        if not self.run_hooks:
            return
        for cmd in self.commands(phase):
            log.info("[#] %s", cmd)  # wg-quick echoes each hook the same way
            code = _run_one(cmd, pump)
            if code != 0:
                why = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
                raise HookError(f"{phase} hook failed ({why}): {cmd}")

    def set_dns(self) -> None:
        """`DNS =` through resolvconf, as wg-quick does; a warning when there is none."""
        entries = self.interface.dns
        if not entries or not self.set_dns_enabled:
            return
        tool = self._resolvconf or shutil.which("resolvconf")
        if tool is None:
            log.warning(
                "DNS = %s not applied: resolvconf is not installed (apt install openresolv, "
                "or resolvconf; with systemd-resolved: resolvectl dns %s ...; or --no-dns)",
                ", ".join(entries), self.ifname,
            )  # fmt: skip
            return
        self._resolvconf = tool
        name = resolvconf_name(self.ifname)
        cmd = [tool, "-a", name, "-m", "0", "-x"]
        log.info("[#] %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, input=resolvconf_input(entries), text=True,
                                  capture_output=True, timeout=30, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HookError(f"resolvconf failed: {exc}") from exc
        if done.returncode != 0:
            raise HookError(
                f"resolvconf -a {name} failed (exit code {done.returncode}): "
                f"{done.stderr.strip()[:200]}"
            )
        self.dns_set = True

    def unset_dns(self) -> None:
        """Remove our resolvconf record (only if we added it); failures are logged."""
        if not self.dns_set or self._resolvconf is None:
            return
        self.dns_set = False
        cmd = [self._resolvconf, "-d", resolvconf_name(self.ifname), "-f"]
        log.info("[#] %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("resolvconf -d failed: %s", exc)
            return
        if done.returncode != 0:
            log.warning("resolvconf -d failed (exit code %d): %s", done.returncode,
                        done.stderr.strip()[:200])  # fmt: skip


def _run_one(cmd: str, pump: Callable[[], bool] | None) -> int:
    """Run one hook through bash; its exit code (negative: the signal that ended it)."""
    try:
        proc = subprocess.Popen([*SHELL, cmd], stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise HookError(f"cannot run bash for a hook: {exc}") from exc
    if pump is None:
        return proc.wait()
    while True:
        try:
            return proc.wait(timeout=PUMP_INTERVAL)
        except subprocess.TimeoutExpired:
            pass
        if not pump():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                return proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait()
