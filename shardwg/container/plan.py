"""Where the config comes from and where it goes: the mounted file, or one built from
the environment and written owner-only into the runtime directory (meant to be a tmpfs).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shardwg.config.model import Config, ConfigError, load_config, parse_config
from shardwg.container.environment import (
    FOREIGN_VARS,
    EntrypointError,
    config_from_env,
    env_value,
)

DEFAULT_CONFIG = "/etc/wireguard/wg0.conf"
DEFAULT_RUNTIME_DIR = "/run/shardwg"
DEFAULT_INTERFACE = "wg0"
# wg-quick's rule for interface names (the UAPI server and the kernel accept a superset).
_IFNAME = re.compile(r"[A-Za-z0-9_=+.-]{1,15}")
_VOLATILE_FS = {"tmpfs", "ramfs"}


@dataclass
class Plan:
    """What the entrypoint found: the config to run and how."""

    config_path: str
    interface: str
    config: Config
    text: str | None = None  # set when built from the environment (still to be written)
    warnings: list[str] = field(default_factory=list)


def interface_name(env: Mapping[str, str], config_path: str | None) -> str:
    """SHARDWG_INTERFACE, else the config file's stem (wg0 without a file), as wg-quick names."""
    name = env_value(env, "SHARDWG_INTERFACE")
    if name is None:
        name = Path(config_path).stem if config_path else DEFAULT_INTERFACE
        what = f"the config file name's stem {name!r} (from {config_path})"
    else:
        what = f"SHARDWG_INTERFACE {name!r}"
    if not _IFNAME.fullmatch(name):
        raise EntrypointError(
            f"{what} is not a valid interface name: 1-15 of A-Z a-z 0-9 _ = + . -"
        )
    return name


def plan(env: Mapping[str, str]) -> Plan:
    """Find the mounted config, or build one from the environment; validate either."""
    config_path = env_value(env, "SHARDWG_CONFIG") or DEFAULT_CONFIG
    uses_env = any(k.startswith("WG_") and k not in FOREIGN_VARS for k in env)
    if os.path.exists(config_path):
        warnings = []
        if uses_env:
            warnings.append(f"{config_path} exists, so the WG_* variables are ignored")
        try:
            config = load_config(config_path)  # ConfigError text is PATH:LINE: problem
        except ConfigError as exc:
            hint = ""
            if "Permission denied" in str(exc):
                hint = (
                    " (a root process without CAP_DAC_OVERRIDE, e.g. with --cap-drop ALL, "
                    "can only read files owned by uid 0: chown 0 it, keep it 0600)"
                )
            raise EntrypointError(f"{exc}{hint}") from None
        return Plan(config_path, interface_name(env, config_path), config, warnings=warnings)
    if not uses_env:
        raise EntrypointError(
            f"no config: mount one at {config_path} (or point SHARDWG_CONFIG at it), or set "
            "WG_PRIVATE_KEY (or WG_PRIVATE_KEY_FILE), WG_ADDRESS and WG_PEER_1_* variables"
        )
    text, warnings = config_from_env(env)
    interface = interface_name(env, None)
    runtime = env_value(env, "SHARDWG_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR
    path = os.path.join(runtime, f"{interface}.conf")
    return Plan(path, interface, parse_config(text, path), text=text, warnings=warnings)


def _mount_of(path: str) -> tuple[str, str] | None:
    """(mount point, file system type) of the mount holding path, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                point = fields[4].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) >= len(best[0])):
                    best = (point, right.split()[0])
    except OSError:
        return None
    return best


def write_config(path: str, text: str) -> list[str]:
    """Write the environment's config owner-only (0700 directory, 0600 file, atomically);
    returns a warning when the directory is on a disk rather than in memory."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(text.encode())
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
        raise EntrypointError(
            f"cannot write the config to {directory}: {exc.strerror or exc} (set "
            "SHARDWG_RUNTIME_DIR to a writable tmpfs)"
        ) from None
    mount = _mount_of(directory)
    if mount is not None and mount[1] not in _VOLATILE_FS:
        return [
            f"{path} holds the private key on a {mount[1]} file system ({mount[0]}): mount a "
            f"tmpfs at {directory} (docker run --tmpfs {directory}) so it never reaches a disk"
        ]
    return []
