"""What a benchmark run raced and on what: the wireguard-go binary (chosen, checked, versioned)
and the machine's facts, recorded in bench.json so a figure always says what it was against.

The wireguard-go under test is whatever binary the user points at (`--wireguard-go PATH`, default
the one on PATH). Its version comes from `wireguard-go --version`, which every build since 2019
answers without starting an interface; a Debian package version is recorded beside it when the
binary is the packaged one.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from typing import Any

from lab.netns import REPO_ROOT
from lab.wggo import BINARY_ENV
from shardwg.datapath import select

_VERSION = re.compile(r"wireguard-go v?(\S+)")


class BinaryError(Exception):
    """The wireguard-go the user named cannot be raced (missing, not executable, not one)."""


def resolve_wireguard_go(spec: str | None) -> str:
    """An absolute path for --wireguard-go: a path, a name looked up on PATH, or None (PATH)."""
    name = spec or "wireguard-go"
    found = name if os.sep in name else shutil.which(name)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise BinaryError(f"--wireguard-go {name}: no such executable"
                          + ("" if spec else " on PATH (apt-get install wireguard-go)"))
    return os.path.realpath(found)


def wireguard_go_version(path: str, timeout: float = 10) -> str:
    """The version `path --version` prints (e.g. "0.0.20250522"); BinaryError if it prints none.

    Run with a private environment and a timeout: a binary that took "--version" for an
    interface name would try to create one, and that must fail fast, not daemonize."""
    try:
        cp = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env={"PATH": os.environ.get("PATH", "")})
    except (OSError, subprocess.SubprocessError) as e:
        raise BinaryError(f"{path} --version: {e}") from None
    m = _VERSION.search(cp.stdout)
    if cp.returncode != 0 or m is None:
        raise BinaryError(f"{path} --version did not print a wireguard-go version "
                          f"(rc={cp.returncode}): {(cp.stdout + cp.stderr).strip()[:200]}")
    return m.group(1)


def use_wireguard_go(spec: str | None) -> dict[str, str]:
    """Choose the wireguard-go every lab peer of this process runs; returns what was chosen."""
    path = resolve_wireguard_go(spec)
    version = wireguard_go_version(path)
    os.environ[BINARY_ENV] = path
    facts = {"path": path, "version": version}
    pkg = _first(["dpkg-query", "-S", path])
    if pkg.startswith("wireguard-go:"):
        facts["debian_package"] = _first(["dpkg-query", "-W", "-f=${Version}", "wireguard-go"])
    return facts


def shardwg_datapath() -> str:
    """Which data path the shardwg ends of this run use: the batch kernel's choice (native, or
    its pure-Python reference under SHARDWG_NATIVE=0 or without the extension)."""
    name = select.current().name
    forced = os.environ.get("SHARDWG_NATIVE")
    return name + (f" (SHARDWG_NATIVE={forced})" if forced is not None else "")


def _first(cmd: list[str]) -> str:
    """The first line a command prints, or "" when it cannot run."""
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (cp.stdout.strip().splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       "")  # fmt: skip
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    commit = _first(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _first(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "machine": {
            "cpu": cpu,
            "cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(mem_gib, 1),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "iperf3": _first(["iperf3", "--version"]),
        },
        "shardwg_commit": commit + ("-dirty" if dirty else ""),
        "shardwg_datapath": shardwg_datapath(),
    }
