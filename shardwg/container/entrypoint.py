"""Container entrypoint: find or build the config, check the container can run a gateway, then
exec `python -m shardwg run` in place (the image ENTRYPOINT runs this module).

The config is the mounted file `$SHARDWG_CONFIG` (default /etc/wireguard/wg0.conf) or, when
that file does not exist, one built from environment variables and written owner-only into
`$SHARDWG_RUNTIME_DIR` (default /run/shardwg, meant to be a tmpfs):

    WG_PRIVATE_KEY | WG_PRIVATE_KEY_FILE        required, exactly one of the two
    WG_ADDRESS                                  comma-separated CIDRs
    WG_LISTEN_PORT  WG_MTU  WG_TABLE  WG_FWMARK  as in wg-quick
    WG_PEER_<N>_PUBLIC_KEY                      one peer per number N (any order, any gaps)
    WG_PEER_<N>_ENDPOINT  WG_PEER_<N>_ALLOWED_IPS  WG_PEER_<N>_PERSISTENT_KEEPALIVE
    WG_PEER_<N>_PRESHARED_KEY | WG_PEER_<N>_PRESHARED_KEY_FILE

and the run itself by SHARDWG_INTERFACE (default: the config file's stem, wg0 for an
environment config), SHARDWG_WORKERS ("auto": usable cores capped by the cgroup CPU quota),
SHARDWG_LOG_FORMAT (text|json) and SHARDWG_METRICS (passed on as --metrics when this shardwg
has it). A mistake exits with status 2 and a message that names the variable or file line at
fault and never contains a key.

Before exec'ing, it checks for CAP_NET_ADMIN (CapEff in /proc/self/status) and an openable
/dev/net/tun, the two things a container must be given (`--cap-add NET_ADMIN --device
/dev/net/tun`). exec, not a child process: the gateway's supervisor becomes the container's
PID 1, so the runtime's SIGTERM reaches it directly; it stops its workers, removes the
interface and UAPI socket and exits 0, and its main loop reaps every child that exits,
orphans re-parented to PID 1 included. The WG_* variables are dropped from the environment
the gateway inherits, so its /proc/<pid>/environ holds no key.

Other modes: `--check` does everything except writing and exec'ing; `--healthcheck` exits 0
when the gateway answers (its /healthz when SHARDWG_METRICS is set, else its UAPI socket);
a first argument that is not an option is exec'd as a command (`... shardwg genkey`); other
options are passed on to `shardwg run` (`--verbose`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import re
import socket
import stat
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shardwg.config.keys import decode_key
from shardwg.config.model import Config, ConfigError, load_config, parse_config

log = logging.getLogger("shardwg.container.entrypoint")

DEFAULT_CONFIG = "/etc/wireguard/wg0.conf"
DEFAULT_RUNTIME_DIR = "/run/shardwg"
DEFAULT_INTERFACE = "wg0"
UAPI_DIR = "/var/run/wireguard"
TUN_PATH = "/dev/net/tun"
CAP_NET_ADMIN = 12
EXIT_USAGE = 2
MAX_SECRET_FILE = 4096
MAX_WORKERS = 256
# wg-quick's rule for interface names (the UAPI server and the kernel accept a superset).
_IFNAME = re.compile(r"[A-Za-z0-9_=+.-]{1,15}")
_PEER_VAR = re.compile(
    r"WG_PEER_([0-9]{1,6})_(PUBLIC_KEY|ENDPOINT|ALLOWED_IPS|PRESHARED_KEY|PRESHARED_KEY_FILE|"
    r"PERSISTENT_KEEPALIVE)"
)
_INTERFACE_VARS = {
    # variable -> wg-quick key; WG_PRIVATE_KEY(_FILE) are handled on their own
    "WG_ADDRESS": "Address",
    "WG_LISTEN_PORT": "ListenPort",
    "WG_MTU": "MTU",
    "WG_TABLE": "Table",
    "WG_FWMARK": "FwMark",
}
_PEER_KEYS = {
    "ENDPOINT": "Endpoint",
    "ALLOWED_IPS": "AllowedIPs",
    "PERSISTENT_KEEPALIVE": "PersistentKeepalive",
}
# WG_* variables that belong to wg, wg-quick or wireguard-go: not ours, not a typo.
_FOREIGN_VARS = {
    "WG_COLOR_MODE",
    "WG_HIDE_KEYS",
    "WG_ENDPOINT_RESOLUTION_RETRIES",
    "WG_QUICK_USERSPACE_IMPLEMENTATION",
    "WG_SUDO",
    "WG_PROCESS_FOREGROUND",
    "WG_TUN_NAME_FILE",
}
_UNSAFE = re.compile(r"[\x00-\x1f\x7f#]")
_VOLATILE_FS = {"tmpfs", "ramfs"}


class EntrypointError(Exception):
    """A problem the operator must fix; the message is safe to print (it holds no secret)."""


@dataclass
class Plan:
    """What the entrypoint found: the config to run and how."""

    config_path: str
    interface: str
    config: Config
    text: str | None = None  # set when built from the environment (still to be written)
    warnings: list[str] = field(default_factory=list)


# -- building a config from the environment ------------------------------------------------


def _value(env: Mapping[str, str], name: str, secret: bool = False) -> str | None:
    """The stripped value of `name`, None when unset or empty; no newline, '#' or control
    characters (they would change the config's meaning)."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if _UNSAFE.search(value):
        shown = "" if secret else f" ({value!r})"
        raise EntrypointError(
            f"{name} contains a newline, '#' or another control character{shown}"
        )
    return value


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """A key from `name` or from the file `name`_FILE (one of them, not both), validated."""
    direct = _value(env, name, secret=True)
    file_var = f"{name}_FILE"
    path = _value(env, file_var)
    if direct is not None and path is not None:
        raise EntrypointError(f"set {name} or {file_var}, not both")
    source = name
    if path is not None:
        source = f"{file_var} ({path})"
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SECRET_FILE + 1)
        except OSError as exc:
            raise EntrypointError(f"cannot read {source}: {exc.strerror or exc}") from None
        if len(data) > MAX_SECRET_FILE:
            raise EntrypointError(f"{source} is not a key file (over {MAX_SECRET_FILE} bytes)")
        try:
            direct = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise EntrypointError(f"{source} is not a base64 key (non-ASCII bytes)") from None
        if _UNSAFE.search(direct):
            raise EntrypointError(f"{source} holds more than one line")
    if direct is None:
        return None
    try:
        decode_key(direct)  # its messages never repeat the key
    except ValueError as exc:
        raise EntrypointError(f"{source}: {exc}") from None
    return direct


def config_from_env(env: Mapping[str, str]) -> tuple[str, list[str]]:
    """wg-quick text from the WG_* variables, checked with parse_config; and warnings.

    EntrypointError names the variable at fault and never includes a key."""
    unknown = sorted(
        k for k in env
        if k.startswith("WG_") and k not in _FOREIGN_VARS and k not in _INTERFACE_VARS
        and k not in ("WG_PRIVATE_KEY", "WG_PRIVATE_KEY_FILE") and not _PEER_VAR.fullmatch(k)
    )  # fmt: skip
    if unknown:
        raise EntrypointError(
            f"unknown variable(s) {', '.join(unknown)}: the interface takes "
            f"WG_PRIVATE_KEY(_FILE), {', '.join(_INTERFACE_VARS)}; peers take WG_PEER_<N>_"
            "PUBLIC_KEY, _ENDPOINT, _ALLOWED_IPS, _PRESHARED_KEY(_FILE), _PERSISTENT_KEEPALIVE"
        )
    private = _secret(env, "WG_PRIVATE_KEY")
    if private is None:
        raise EntrypointError("WG_PRIVATE_KEY or WG_PRIVATE_KEY_FILE is required")
    lines = ["[Interface]", f"PrivateKey = {private}"]
    origin = {2: "WG_PRIVATE_KEY"}  # config line number -> the variable that wrote it
    secret_lines = {2}
    for var, key in _INTERFACE_VARS.items():
        value = _value(env, var)
        if value is not None:
            lines.append(f"{key} = {value}")
            origin[len(lines)] = var
    numbers = sorted({int(m.group(1)) for k in env if (m := _PEER_VAR.fullmatch(k))})
    warnings: list[str] = []
    for n in numbers:
        prefix = f"WG_PEER_{n}_"
        if not any((env.get(k) or "").strip() for k in env if k.startswith(prefix)):
            continue  # every variable of this peer is empty
        public = _value(env, prefix + "PUBLIC_KEY")
        if public is None:
            raise EntrypointError(f"{prefix}PUBLIC_KEY is required (other {prefix}* are set)")
        try:
            decode_key(public)
        except ValueError as exc:
            raise EntrypointError(f"{prefix}PUBLIC_KEY: {exc}") from None
        lines += ["", "[Peer]", f"PublicKey = {public}"]
        origin[len(lines)] = prefix + "PUBLIC_KEY"
        psk = _secret(env, prefix + "PRESHARED_KEY")
        if psk is not None:
            lines.append(f"PresharedKey = {psk}")
            origin[len(lines)] = prefix + "PRESHARED_KEY"
            secret_lines.add(len(lines))
        for suffix, key in _PEER_KEYS.items():
            value = _value(env, prefix + suffix)
            if value is not None:
                lines.append(f"{key} = {value}")
                origin[len(lines)] = prefix + suffix
        if _value(env, prefix + "ALLOWED_IPS") is None:
            warnings.append(f"{prefix}ALLOWED_IPS is empty: no traffic will go to or come from "
                            f"peer {n}")  # fmt: skip
    text = "\n".join(lines) + "\n"
    try:
        parse_config(text, "<environment>")
    except ConfigError as exc:
        var = origin.get(exc.line, "the WG_* variables")
        # the parser's problems start with the config key ("Address: ..."): the variable
        # name replaces it; secret lines get no detail at all
        problem = "invalid key" if exc.line in secret_lines else exc.problem.split(": ", 1)[-1]
        raise EntrypointError(f"{var}: {problem}") from None
    return text, warnings


# -- where things go -----------------------------------------------------------------------


def _interface(env: Mapping[str, str], config_path: str | None) -> str:
    name = _value(env, "SHARDWG_INTERFACE")
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
    config_path = _value(env, "SHARDWG_CONFIG") or DEFAULT_CONFIG
    uses_env = any(k.startswith("WG_") and k not in _FOREIGN_VARS for k in env)
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
        return Plan(config_path, _interface(env, config_path), config, warnings=warnings)
    if not uses_env:
        raise EntrypointError(
            f"no config: mount one at {config_path} (or point SHARDWG_CONFIG at it), or set "
            "WG_PRIVATE_KEY (or WG_PRIVATE_KEY_FILE), WG_ADDRESS and WG_PEER_1_* variables"
        )
    text, warnings = config_from_env(env)
    interface = _interface(env, None)
    runtime = _value(env, "SHARDWG_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR
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


# -- what the container must provide ------------------------------------------------------


def effective_capabilities(status_path: str = "/proc/self/status") -> int | None:
    """The CapEff bit mask of this process, None when it cannot be read."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_privileges(tun_path: str = TUN_PATH) -> list[str]:
    """Problems that would stop the gateway creating its interface; empty when none."""
    problems = []
    caps = effective_capabilities()
    if caps is not None and not caps >> CAP_NET_ADMIN & 1:
        problems.append(
            "missing capability CAP_NET_ADMIN (needed to create the TUN interface, add its "
            "addresses and routes and mark sockets): docker run --cap-add NET_ADMIN, compose "
            "cap_add: [NET_ADMIN], Kubernetes securityContext.capabilities.add: [NET_ADMIN], "
            "systemd AmbientCapabilities=CAP_NET_ADMIN"
        )
    try:
        st = os.stat(tun_path)
        if not stat.S_ISCHR(st.st_mode):
            raise OSError(errno.ENODEV, "not a character device")
        fd = os.open(tun_path, os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            how = "docker run --device /dev/net/tun, compose devices: [/dev/net/tun]"
        else:
            how = "the container's device rules must allow it (c 10:200 rwm)"
        problems.append(f"cannot open {tun_path}: {exc.strerror or exc}: {how}")
    return problems


# -- the command ---------------------------------------------------------------------------


def cgroup_cpu_limit(
    root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"
) -> int | None:
    """Whole CPUs allowed by the tightest CPU quota on this process's cgroup path (v2 cpu.max
    or v1 cfs quota), rounded up; None when unlimited or unknown."""
    limits: list[float] = []
    try:
        with open(proc_cgroup) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, rel = entry
        files: tuple[str, ...]
        if controllers == "":  # v2 unified
            base, files = Path(root), ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base, files = Path(root) / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = Path(rel.lstrip("/")).parts
        for depth in range(len(parts), -1, -1):
            d = base.joinpath(*parts[:depth])
            try:
                if len(files) == 1:
                    quota_text, period_text = (d / files[0]).read_text().split()[:2]
                else:
                    quota_text = (d / files[0]).read_text().strip()
                    period_text = (d / files[1]).read_text().strip()
            except (OSError, ValueError):
                continue
            if quota_text not in ("max", "-1") and int(period_text) > 0:
                limits.append(int(quota_text) / int(period_text))
    if not limits:
        return None
    return max(1, math.ceil(min(limits)))


def worker_count(env: Mapping[str, str]) -> int | None:
    """SHARDWG_WORKERS as a number, or for auto/unset the usable cores capped by the cgroup
    quota when there is one (None: leave it to shardwg run)."""
    value = _value(env, "SHARDWG_WORKERS")
    if value is None or value.lower() == "auto":
        limit = cgroup_cpu_limit()
        if limit is None:
            return None
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        return max(1, min(cores, limit, MAX_WORKERS))
    if not value.isdigit() or not 1 <= int(value) <= MAX_WORKERS:
        raise EntrypointError(f"SHARDWG_WORKERS must be auto or 1..{MAX_WORKERS}, not {value!r}")
    return int(value)


def run_supports(option: str) -> bool:
    """Whether this shardwg's `run` subcommand has `option` (e.g. --metrics)."""
    from shardwg.cli import build_parser

    for action in build_parser()._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and "run" in choices:
            run_parser = choices["run"]
            return isinstance(run_parser, argparse.ArgumentParser) and any(
                option in a.option_strings for a in run_parser._actions
            )
    return False


def run_command(p: Plan, env: Mapping[str, str], extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "shardwg", "run", "--config", p.config_path]
    if p.interface != Path(p.config_path).stem:
        cmd += ["--interface", p.interface]
    workers = worker_count(env)
    if workers is not None:
        cmd += ["--workers", str(workers)]
    fmt = log_format(env)
    if fmt == "json":
        cmd += ["--log-format", "json"]
    metrics = _value(env, "SHARDWG_METRICS")
    if metrics is not None:
        if run_supports("--metrics"):
            cmd += ["--metrics", metrics]
        else:
            p.warnings.append("this shardwg has no --metrics option: SHARDWG_METRICS ignored")
    return cmd + extra


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment the gateway inherits: without the WG_* variables this entrypoint
    consumed (keys must not linger in /proc/<pid>/environ)."""
    return {k: v for k, v in env.items() if not k.startswith("WG_") or k in _FOREIGN_VARS}


def log_format(env: Mapping[str, str]) -> str:
    fmt = (env.get("SHARDWG_LOG_FORMAT") or "text").strip().lower()
    if fmt not in ("text", "json"):
        raise EntrypointError(f"SHARDWG_LOG_FORMAT must be text or json, not {fmt!r}")
    return fmt


# -- health --------------------------------------------------------------------------------


def _uapi_alive(interface: str, timeout: float = 3.0) -> str | None:
    """None if the UAPI socket answers a get with errno=0, else why not. The reply (which
    holds the private key) is read into memory, never printed."""
    path = os.path.join(UAPI_DIR, f"{interface}.sock")
    reply = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"get=1\n\n")
            while not reply.endswith(b"\n\n") and len(reply) < 1 << 24:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    ok = reply.endswith(b"errno=0\n\n")
    reply[:] = bytes(len(reply))
    return None if ok else f"{path}: the gateway answered with an error"


def _healthz(address: str, timeout: float = 3.0) -> str | None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return None if resp.status == 200 else f"{url}: HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def healthcheck(env: Mapping[str, str]) -> int:
    """0 when the gateway serves: /healthz with metrics on, else a UAPI get."""
    try:
        path = _value(env, "SHARDWG_CONFIG") or DEFAULT_CONFIG
        interface = _interface(env, path if os.path.exists(path) else None)
    except EntrypointError as exc:
        print(f"unhealthy: {exc}")
        return 1
    metrics = _value(env, "SHARDWG_METRICS")
    problem = (
        _healthz(metrics) if metrics and run_supports("--metrics") else _uapi_alive(interface)
    )
    print(f"unhealthy: {problem}" if problem else f"ok: {interface}")
    return 1 if problem else 0


# -- main ----------------------------------------------------------------------------------


def _setup_logging(env: Mapping[str, str]) -> None:
    from shardwg.cli import setup_logging

    try:
        fmt = log_format(env)
    except EntrypointError:
        fmt = "text"
    setup_logging(fmt, verbose=False)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ if env is None else env)
    if args and not args[0].startswith("-"):
        try:  # a command instead of the gateway: `docker run IMAGE shardwg genkey`
            os.execvpe(args[0], args, child_environment(environ))
        except OSError as exc:
            print(f"shardwg entrypoint: cannot run {args[0]}: {exc.strerror}", file=sys.stderr)
            return 127
    if "--healthcheck" in args:
        return healthcheck(environ)
    check_only = "--check" in args
    extra = [a for a in args if a != "--check"]
    _setup_logging(environ)
    try:
        p = plan(environ)
        cmd = run_command(p, environ, extra)
        problems = check_privileges()
        if problems:
            raise EntrypointError("; ".join(problems))
        if p.text is not None and not check_only:
            p.warnings += write_config(p.config_path, p.text)
    except EntrypointError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    for warning in p.warnings:
        log.warning("%s", warning)
    source = "environment" if p.text is not None else "file"
    log.info("config %s (from the %s): interface %s, %d peer(s)",
             p.config_path, source, p.interface, len(p.config.peers))  # fmt: skip
    if check_only:
        print(" ".join(cmd))
        return 0
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execvpe(cmd[0], cmd, child_environment(environ))
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
