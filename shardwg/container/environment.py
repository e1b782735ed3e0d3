"""Environment variables: reading one safely, and building a wg-quick config from WG_*.

    WG_PRIVATE_KEY | WG_PRIVATE_KEY_FILE        required, exactly one of the two
    WG_ADDRESS                                  comma-separated CIDRs
    WG_LISTEN_PORT  WG_MTU  WG_TABLE  WG_FWMARK  as in wg-quick
    WG_PEER_<N>_PUBLIC_KEY                      one peer per number N (any order, any gaps)
    WG_PEER_<N>_ENDPOINT  WG_PEER_<N>_ALLOWED_IPS  WG_PEER_<N>_PERSISTENT_KEEPALIVE
    WG_PEER_<N>_PRESHARED_KEY | WG_PEER_<N>_PRESHARED_KEY_FILE
    WG_PEER_<N>_SPREAD                          shardwg's own Spread: on, off, auto or packets

A mistake raises EntrypointError naming the variable at fault, never a key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from shardwg.config.keys import decode_key
from shardwg.config.model import ConfigError, parse_config

MAX_SECRET_FILE = 4096
_PEER_VAR = re.compile(
    r"WG_PEER_([0-9]{1,6})_(PUBLIC_KEY|ENDPOINT|ALLOWED_IPS|PRESHARED_KEY|PRESHARED_KEY_FILE|"
    r"PERSISTENT_KEEPALIVE|SPREAD)"
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
    "SPREAD": "Spread",
}
# WG_* variables that belong to wg, wg-quick or wireguard-go: not ours, not a typo.
FOREIGN_VARS = {
    "WG_COLOR_MODE",
    "WG_HIDE_KEYS",
    "WG_ENDPOINT_RESOLUTION_RETRIES",
    "WG_QUICK_USERSPACE_IMPLEMENTATION",
    "WG_SUDO",
    "WG_PROCESS_FOREGROUND",
    "WG_TUN_NAME_FILE",
}
_UNSAFE = re.compile(r"[\x00-\x1f\x7f#]")


class EntrypointError(Exception):
    """A problem the operator must fix; the message is safe to print (it holds no secret)."""


def env_value(env: Mapping[str, str], name: str, secret: bool = False) -> str | None:
    """The stripped value of `name`, None when unset or empty; no newline, '#' or control
    characters (they would change the config's meaning)."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if _UNSAFE.search(value):
        shown = "" if secret else f" ({value!r})"
        raise EntrypointError(f"{name} contains a newline, '#' or another control character{shown}")
    return value


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """A key from `name` or from the file `name`_FILE (one of them, not both), validated."""
    direct = env_value(env, name, secret=True)
    file_var = f"{name}_FILE"
    path = env_value(env, file_var)
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
        if k.startswith("WG_") and k not in FOREIGN_VARS and k not in _INTERFACE_VARS
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
        value = env_value(env, var)
        if value is not None:
            lines.append(f"{key} = {value}")
            origin[len(lines)] = var
    numbers = sorted({int(m.group(1)) for k in env if (m := _PEER_VAR.fullmatch(k))})
    warnings: list[str] = []
    for n in numbers:
        prefix = f"WG_PEER_{n}_"
        if not any((env.get(k) or "").strip() for k in env if k.startswith(prefix)):
            continue  # every variable of this peer is empty
        public = env_value(env, prefix + "PUBLIC_KEY")
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
            value = env_value(env, prefix + suffix)
            if value is not None:
                lines.append(f"{key} = {value}")
                origin[len(lines)] = prefix + suffix
        if env_value(env, prefix + "ALLOWED_IPS") is None:
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
