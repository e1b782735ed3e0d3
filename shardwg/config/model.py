"""wg-quick configuration files, parsed into frozen msgspec Structs.

Accepts what `wg-quick` + `wg setconf` accept (case-insensitive keys and section
names, `#` comments, comma-separated lists that accumulate over repeated lines,
later singular keys override earlier ones) and rejects mistakes wg would only
notice later, with "PATH:LINE: problem" messages. Host names in Endpoint are
kept as text: resolution is I/O and happens in `shardwg.config.endpoints`.
One key is shardwg's own: `Spread = on|off|auto` in a [Peer] (one peer over several
workers). `wg` itself rejects keys it does not know, so it lives only in the file shardwg
reads (start, SIGHUP, SaveConfig); the UAPI (`wg set`, `wg showconf`) neither sends nor
shows it, and a UAPI change keeps a peer's setting (config/diff.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable

import msgspec

from shardwg.config.keys import decode_key, encode_key
from shardwg.proto.constants import DEFAULT_MTU, TRANSPORT_MIN_SIZE

__all__ = [
    "Config",
    "ConfigError",
    "Endpoint",
    "InterfaceConfig",
    "PeerConfig",
    "format_config",
    "load_config",
    "parse_config",
    "private_key_file_warning",
    "spread_settings",
    "packet_spread_peers",
]

MAX_CONFIG_BYTES = 16 << 20  # ~80k peers; anything bigger is a wrong file, not a config
MIN_MTU, MIN_MTU_IPV6 = 576, 1280
# A sealed packet is the MTU plus 32 bytes (header and tag) and must fit one UDP datagram
# over IPv4: 65535 - 20 (IPv4) - 8 (UDP) - 32 = 65475.
MAX_MTU = 65535 - 20 - 8 - TRANSPORT_MIN_SIZE
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?"
)
_CIDR = re.compile(r"[^/\s]+(/[0-9]{1,3})?")
_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ConfigError(Exception):
    """A config the user must fix; str() is "PATH:LINE: problem" (LINE 0: whole file)."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


class Endpoint(msgspec.Struct, frozen=True):
    """A peer's address: an IP literal (IPv6 without brackets) or a host name, and a port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """From "1.2.3.4:51820", "[fd00::1]:51820" or "host.example:51820"; ValueError if bad."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]")
            if not sep:
                raise ValueError(f"missing ']' in endpoint {text!r}")
            if not port.startswith(":"):
                raise ValueError(f"missing port in endpoint {text!r}")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
            port = port[1:]
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"missing port in endpoint {text!r} (use HOST:PORT)")
            if ":" in host:
                raise ValueError(f"IPv6 endpoint needs brackets, like [{host}]:{port}")
            if re.fullmatch(r"[0-9.]+", host):
                try:
                    ipaddress.IPv4Address(host)
                except ValueError:
                    raise ValueError(f"{host!r} is not a valid IPv4 address") from None
            elif not _HOSTNAME.fullmatch(host):
                raise ValueError(f"{host!r} is not a valid host name")
        return cls(host, _int(port, 1, 65535, "endpoint port"))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _redacted_repr(obj: msgspec.Struct, secret: str) -> str:
    """Struct repr with the secret key hidden, so logging a config leaks nothing."""
    parts = []
    for name in obj.__struct_fields__:
        value = getattr(obj, name)
        parts.append(f"{name}={'<redacted>' if name == secret and value else repr(value)}")
    return f"{type(obj).__name__}({', '.join(parts)})"


class InterfaceConfig(msgspec.Struct, frozen=True):
    private_key: bytes
    listen_port: int | None = None
    addresses: list[str] = msgspec.field(default_factory=list)  # CIDR strings as written
    mtu: int = DEFAULT_MTU
    fwmark: int = 0
    table: str | None = None  # None or "auto": main table; "off": no routes; or a number
    save_config: bool = False
    dns: list[str] = msgspec.field(default_factory=list)
    # Run by shardwg.engine.hooks at wg-quick's moments (and kept for SaveConfig round trips).
    pre_up: list[str] = msgspec.field(default_factory=list)
    post_up: list[str] = msgspec.field(default_factory=list)
    pre_down: list[str] = msgspec.field(default_factory=list)
    post_down: list[str] = msgspec.field(default_factory=list)

    def __repr__(self) -> str:
        return _redacted_repr(self, "private_key")


class PeerConfig(msgspec.Struct, frozen=True):
    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: list[str] = msgspec.field(default_factory=list)  # normalised, host bits off
    endpoint: Endpoint | None = None
    persistent_keepalive: int = 0
    # shardwg's own `Spread = on|off|auto|packets`: True/False override `--spread`, None
    # (auto) not; packets is on, and each packet to the peer takes the next TUN queue, so
    # one flow's packets are sealed by every worker (io/tun_steering.py)
    spread: bool | None = None
    spread_packets: bool = False

    def __repr__(self) -> str:
        return _redacted_repr(self, "preshared_key")


class Config(msgspec.Struct, frozen=True):
    interface: InterfaceConfig
    peers: list[PeerConfig] = msgspec.field(default_factory=list)


# -- value parsers (ValueError with a readable message) --------------------------------


def _int(text: str, lo: int, hi: int, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{what} {text!r} is not a number")
    value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{what} {value} out of range {lo}..{hi}")
    return value


def _mtu(text: str) -> int:
    value = _int(text, 0, 1 << 32, "MTU")
    if not MIN_MTU <= value <= MAX_MTU:
        raise ValueError(
            f"MTU {value} out of range {MIN_MTU}..{MAX_MTU}: a sealed packet (MTU + "
            f"{TRANSPORT_MIN_SIZE} bytes) must fit one UDP datagram over IPv4"
        )
    return value


def _fwmark(text: str) -> int:
    if text.lower() == "off":
        return 0
    if text[:2].lower() == "0x" and len(text) > 2:
        try:
            value = int(text[2:], 16)
        except ValueError:
            raise ValueError(f"FwMark {text!r} is not a hex number") from None
        if text[2:].strip("0123456789abcdefABCDEF") or value > 0xFFFFFFFF:
            raise ValueError(f"FwMark {text!r} is neither off nor 0..0xffffffff")
        return value
    return _int(text, 0, 0xFFFFFFFF, "FwMark")


def _keepalive(text: str) -> int:
    return 0 if text.lower() == "off" else _int(text, 0, 65535, "PersistentKeepalive")


def _table(text: str) -> str:
    if text.lower() in ("off", "auto"):
        return text.lower()
    return str(_int(text, 0, 0xFFFFFFFF, "Table"))


def _bool(text: str) -> bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise ValueError(f"{text!r} is neither true nor false")


_SPREAD: dict[str, tuple[bool | None, bool]] = {
    "on": (True, False), "off": (False, False), "auto": (None, False), "packets": (True, True),
}


def _spread(text: str) -> tuple[bool | None, bool]:
    """shardwg's per-peer `Spread`: on, off, auto (follow `shardwg run --spread`) or
    packets (on, and one flow's packets over every worker): (spread, spread_packets)."""
    try:
        return _SPREAD[text.lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not on, off, auto or packets") from None


def format_spread(value: bool | None, packets: bool = False) -> str:
    if packets:
        return "packets"
    return "auto" if value is None else "on" if value else "off"


def spread_settings(cfg: Config) -> dict[bytes, bool]:
    """Each peer's `Spread` that is not auto: placement's per-peer overrides."""
    return {p.public_key: p.spread for p in cfg.peers if p.spread is not None}


def packet_spread_peers(cfg: Config) -> set[bytes]:
    """The peers set to `Spread = packets`."""
    return {p.public_key for p in cfg.peers if p.spread_packets}


def _words(text: str) -> list[str]:
    """wg-quick splits Address and DNS on commas and whitespace."""
    return text.replace(",", " ").split()


def _addresses(text: str) -> list[str]:
    out = _words(text)
    for item in out:
        try:
            ipaddress.ip_interface(item)
        except ValueError:
            raise ValueError(f"Address {item!r} is not an IP address or CIDR") from None
    return out


def _allowed_ips(text: str) -> list[str]:
    if not text:
        return []  # "AllowedIPs =" is legal and routes nothing
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not _CIDR.fullmatch(item):  # ipaddress would also take netmasks; wg does not
            raise ValueError(f"AllowedIPs entry {item!r} is not an IP address or CIDR")
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"AllowedIPs entry {item!r} is not an IP address or CIDR") from None
    return out


# -- the line parser -------------------------------------------------------------------

_Fields = dict[str, object]
# key (lowercase) -> (InterfaceConfig/PeerConfig field, how repeats combine, value parser)
_Spec = tuple[str, str, Callable[[str], object]]


def _ranged(lo: int, hi: int, what: str) -> Callable[[str], int]:
    return lambda text: _int(text, lo, hi, what)


_INTERFACE_KEYS: dict[str, _Spec] = {
    "privatekey": ("private_key", "set", decode_key),
    "listenport": ("listen_port", "set", _ranged(0, 65535, "ListenPort")),
    "fwmark": ("fwmark", "set", _fwmark),
    "address": ("addresses", "extend", _addresses),
    "dns": ("dns", "extend", _words),
    "mtu": ("mtu", "set", _mtu),
    "table": ("table", "set", _table),
    "saveconfig": ("save_config", "set", _bool),
    "preup": ("pre_up", "append", str),
    "postup": ("post_up", "append", str),
    "predown": ("pre_down", "append", str),
    "postdown": ("post_down", "append", str),
}
_PEER_KEYS: dict[str, _Spec] = {
    "publickey": ("public_key", "set", decode_key),
    "presharedkey": ("preshared_key", "set", decode_key),
    "allowedips": ("allowed_ips", "extend", _allowed_ips),
    "endpoint": ("endpoint", "set", Endpoint.parse),
    "persistentkeepalive": ("persistent_keepalive", "set", _keepalive),
    # shardwg's own (wg has no such key): in the file we read, never sent over the UAPI
    "spread": ("spread", "pair", _spread),  # sets spread and spread_packets
}


class _Section:
    def __init__(self, name: str, line: int) -> None:
        self.name, self.line = name, line
        self.fields: _Fields = {}
        self.lines: dict[str, int] = {}  # field -> line that last set it

    def apply(self, spec: _Spec, value: str, line: int) -> None:
        field, how, parse = spec
        parsed = parse(value)
        if how == "set":  # like wg, a repeated singular key overrides
            self.fields[field] = parsed
        elif how == "pair":  # one key, two fields: `field` and `field`_packets
            assert isinstance(parsed, tuple)
            self.fields[field], self.fields[f"{field}_packets"] = parsed
        else:
            items = self.fields.setdefault(field, [])
            assert isinstance(items, list)
            new = parsed if isinstance(parsed, list) else [parsed]
            items[:] = list(dict.fromkeys(items + new)) if how == "extend" else items + new
        self.lines[field] = line


def _sections(text: str, path: str) -> list[_Section]:
    """Split into sections and parse each value; every error names its line."""
    sections: list[_Section] = []
    for number, raw in enumerate(text.split("\n"), 1):
        bad = _BINARY.search(raw)
        if bad:
            problem = f"control character {ord(bad.group()):#04x}: not a text config"
            raise ConfigError(path, number, problem)
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        if line.startswith("["):
            name = "".join(line.split()).lower()
            if name not in ("[interface]", "[peer]"):
                raise ConfigError(path, number, f"unknown section {line}")
            sections.append(_Section(name, number))
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sections:
            raise ConfigError(path, number, f"{key!r} is outside a section ([Interface]/[Peer])")
        if not sep:
            raise ConfigError(path, number, f"expected 'Key = Value', got {line!r}")
        section = sections[-1]
        is_interface = section.name == "[interface]"
        spec = (_INTERFACE_KEYS if is_interface else _PEER_KEYS).get(key.lower())
        if spec is None:
            where = "[Interface]" if is_interface else "[Peer]"
            raise ConfigError(path, number, f"unknown key {key!r} in {where}")
        try:
            section.apply(spec, value, number)
        except ValueError as exc:
            raise ConfigError(path, number, f"{key}: {exc}") from None
    return sections


def parse_config(text: str, path: str = "<string>") -> Config:
    """Parse wg-quick text; ConfigError("PATH:LINE: problem") on the first problem."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(path, 0, f"config is larger than {MAX_CONFIG_BYTES} bytes")
    sections = _sections(text.removeprefix("\ufeff"), path)
    interfaces = [s for s in sections if s.name == "[interface]"]
    if not interfaces:
        raise ConfigError(path, 0, "no [Interface] section")
    if len(interfaces) > 1:
        first = interfaces[0].line
        raise ConfigError(path, interfaces[1].line, f"second [Interface] (first at line {first})")
    iface = interfaces[0]
    if "private_key" not in iface.fields:
        raise ConfigError(path, iface.line, "[Interface] has no PrivateKey")
    interface = msgspec.convert(iface.fields, InterfaceConfig)
    if any(":" in a for a in interface.addresses) and interface.mtu < MIN_MTU_IPV6:
        line = iface.lines.get("mtu", iface.line)
        raise ConfigError(
            path, line, f"MTU {interface.mtu} is below {MIN_MTU_IPV6}, needed by IPv6"
        )
    peers: list[PeerConfig] = []
    seen: dict[bytes, int] = {}
    for section in sections:
        if section.name != "[peer]":
            continue
        if "public_key" not in section.fields:
            raise ConfigError(path, section.line, "[Peer] has no PublicKey")
        peer = msgspec.convert(section.fields, PeerConfig)
        line = section.lines["public_key"]
        if peer.public_key in seen:
            problem = f"duplicate peer PublicKey (first at line {seen[peer.public_key]})"
            raise ConfigError(path, line, problem)
        seen[peer.public_key] = line
        peers.append(peer)
    return Config(interface, peers)


def load_config(path: str) -> Config:
    """Read and parse a config file; unreadable, huge or non-UTF-8 files are ConfigErrors."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, 0, f"cannot read config: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, 0, f"config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, line, "not UTF-8 text (is this a binary file?)") from None
    return parse_config(text, path)


def private_key_file_warning(path: str) -> str | None:
    """A warning if group or others may access the file holding the private key, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # load_config reports unreadable files
    if mode & 0o077:
        return (
            f"{path} is accessible by group or others (mode {mode & 0o777:04o}) and holds a "
            f"private key; run: chmod 600 {path}"
        )
    return None


def _check_writable(value: str, what: str) -> str:
    if "#" in value or "\n" in value or "\r" in value:
        raise ValueError(f"{what} {value!r} cannot be written to a config (contains # or newline)")
    return value


def format_config(cfg: Config) -> str:
    """wg-quick text for `cfg` (SaveConfig); parse_config(format_config(c)) == c."""
    i = cfg.interface
    out = ["[Interface]", f"PrivateKey = {encode_key(i.private_key)}"]
    if i.listen_port is not None:
        out.append(f"ListenPort = {i.listen_port}")
    if i.fwmark:
        out.append(f"FwMark = {i.fwmark:#x}")
    out += [f"Address = {a}" for a in i.addresses]
    if i.dns:
        out.append(f"DNS = {', '.join(i.dns)}")
    if i.mtu != DEFAULT_MTU:
        out.append(f"MTU = {i.mtu}")
    if i.table is not None:
        out.append(f"Table = {i.table}")
    if i.save_config:
        out.append("SaveConfig = true")
    for key, hooks in (
        ("PreUp", i.pre_up),
        ("PostUp", i.post_up),
        ("PreDown", i.pre_down),
        ("PostDown", i.post_down),
    ):
        out += [f"{key} = {_check_writable(h, key)}" for h in hooks]
    for p in cfg.peers:
        out += ["", "[Peer]", f"PublicKey = {encode_key(p.public_key)}"]
        if p.preshared_key is not None:
            out.append(f"PresharedKey = {encode_key(p.preshared_key)}")
        if p.allowed_ips:
            out.append(f"AllowedIPs = {', '.join(p.allowed_ips)}")
        if p.endpoint is not None:
            out.append(f"Endpoint = {p.endpoint}")
        if p.persistent_keepalive:
            out.append(f"PersistentKeepalive = {p.persistent_keepalive}")
        if p.spread is not None:
            out.append(f"Spread = {format_spread(p.spread, p.spread_packets)}")
    return "\n".join(out) + "\n"
