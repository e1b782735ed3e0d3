"""`--healthcheck`: is the gateway serving? Its /healthz when SHARDWG_METRICS is set,
else a UAPI get on its socket (the reply holds the private key: read, never printed).
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping

from shardwg.container.command import run_supports
from shardwg.container.environment import EntrypointError, env_value
from shardwg.container.plan import DEFAULT_CONFIG, interface_name

UAPI_DIR = "/var/run/wireguard"


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
        path = env_value(env, "SHARDWG_CONFIG") or DEFAULT_CONFIG
        interface = interface_name(env, path if os.path.exists(path) else None)
    except EntrypointError as exc:
        print(f"unhealthy: {exc}")
        return 1
    metrics = env_value(env, "SHARDWG_METRICS")
    problem = _healthz(metrics) if metrics and run_supports("--metrics") else _uapi_alive(interface)
    print(f"unhealthy: {problem}" if problem else f"ok: {interface}")
    return 1 if problem else 0
