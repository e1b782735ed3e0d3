"""The cross-platform configuration protocol (UAPI) that `wg` speaks, sans-IO.

Behaviour follows wireguard-go's device/uapi.go so `wg` cannot tell us apart: the key
order of get replies, hex keys, which set lines are accepted and the errno for each
mistake. One deliberate difference: a set request is parsed whole before the backend sees
it, so a bad line rejects the request instead of half-applying it as wireguard-go does.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from errno import EINVAL, EMSGSIZE, EPROTO
from typing import Literal, TypeAlias

from shardwg.uapi import DeviceView, PeerChange, SetRequest, UapiError
from shardwg.uapi import PeerView as PeerView  # re-exported with the rest of the model

KEY_LEN = 32
MAX_LINE = 4096  # wg's longest line is ~80 bytes; a longer one is not wg talking
# A `wg syncconf` restates every kept peer (key, allowed IPs, endpoint, PSK, keepalive: about
# 300 bytes with a few prefixes), so a request must hold the largest table a gateway may have
# (shm.layout.MAX_PEERS = 65,536 peers: ~20 MB). It was 1 MiB: `wg syncconf` on a gateway of
# 10,000 peers failed with EMSGSIZE. Only root can connect (the socket is 0600).
MAX_REQUEST = 32 << 20
_ZERO_KEY = bytes(KEY_LEN)
_DIGITS = re.compile(r"[0-9]+")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_BITS = re.compile(r"0|[1-9][0-9]{0,2}")  # Go refuses leading zeros in prefix lengths
_SAFE_VALUE = re.compile(r"[0-9A-Za-z.:%/\[\]_-]+")  # what may go into a get reply line


def format_errno(n: int) -> bytes:
    """The status trailer exactly as given: b"errno=N\\n\\n"."""
    return b"errno=%d\n\n" % n


def format_status(errno: int, get: bool = False) -> bytes:
    """A failure trailer as `wg` decodes it: for set, wg negates what it reads, so we send
    -errno like wireguard-go and wg prints the right strerror; its get parser only
    decodes non-negative numbers, so a failed get sends +errno."""
    return format_errno(abs(errno) if get else -abs(errno))


def _hex(key: bytes) -> str:
    if len(key) != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes, got {len(key)}")
    return key.hex()


def _safe(value: str) -> str:
    if not _SAFE_VALUE.fullmatch(value):  # a newline or '=' here would forge reply lines
        raise ValueError(f"{value!r} cannot go into a UAPI reply")
    return value


def format_get(view: DeviceView) -> bytes:
    """The whole reply to `get=1`, in wireguard-go's key order, ending in errno=0."""
    out: list[str] = []
    numbers = [view.listen_port, view.fwmark]
    for p in view.peers:
        numbers += [p.last_handshake_sec, p.last_handshake_nsec, p.rx_bytes, p.tx_bytes]
        numbers.append(p.persistent_keepalive)
    if min(numbers) < 0:  # wg would reject the whole reply
        raise ValueError("negative number in a UAPI reply")
    if view.private_key is not None and view.private_key != _ZERO_KEY:
        out.append("private_key=" + _hex(view.private_key))
    if view.listen_port:
        out.append(f"listen_port={view.listen_port:d}")
    if view.fwmark:
        out.append(f"fwmark={view.fwmark:d}")
    for p in view.peers:
        out += [
            f"public_key={_hex(p.public_key)}",
            f"preshared_key={_hex(p.preshared_key or _ZERO_KEY)}",
            "protocol_version=1",
        ]
        if p.endpoint:
            out.append("endpoint=" + _safe(p.endpoint))
        out += [
            f"last_handshake_time_sec={p.last_handshake_sec:d}",
            f"last_handshake_time_nsec={p.last_handshake_nsec:d}",
            f"tx_bytes={p.tx_bytes:d}",
            f"rx_bytes={p.rx_bytes:d}",
            f"persistent_keepalive_interval={p.persistent_keepalive:d}",
        ]
        out += ["allowed_ip=" + _safe(ip) for ip in p.allowed_ips]
    out.append("errno=0")
    return ("\n".join(out) + "\n\n").encode("ascii")


# -- set values: as strict as Go's strconv / hex / netip parsers ------------------------


def _uint(value: str, bits: int, what: str) -> int:
    digits = value.lstrip("0") or "0"
    if not _DIGITS.fullmatch(value) or len(digits) > 20 or int(digits) >> bits:
        raise UapiError(EINVAL, f"{what} {value[:32]!r} is not a {bits}-bit unsigned number")
    return int(digits)


def _key(value: str, what: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        raise UapiError(EINVAL, f"{what} is not {KEY_LEN * 2} hex digits")
    return bytes.fromhex(value)


def _true(value: str, what: str) -> bool:
    if value != "true":
        raise UapiError(EINVAL, f"{what} must be 'true', got {value[:32]!r}")
    return True


def parse_endpoint(value: str) -> str:
    """netip.ParseAddrPort rules (IP literal, IPv6 in brackets, zones allowed), normalised."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 1
    try:
        if not sep or not port or not value.isascii():
            raise ValueError(value)
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)  # no leading-zero octets
        if bracketed != (ip.version == 6):
            raise ValueError(value)
    except ValueError:
        raise UapiError(EINVAL, f"endpoint {value[:64]!r} is not IP:PORT") from None
    number = _uint(port, 16, "endpoint port")
    text = f"[{ip}]:{number}" if ip.version == 6 else f"{ip}:{number}"
    if not _SAFE_VALUE.fullmatch(text):  # an odd zone name would break our get replies
        raise UapiError(EINVAL, f"endpoint {value[:64]!r} has an unusable zone")
    return text


def parse_allowed_ip(value: str) -> str:
    """netip.ParsePrefix rules (explicit /bits, no zone), host bits masked like Insert."""
    addr, sep, bits = value.partition("/")
    try:
        if not sep or "%" in addr or not addr.isascii() or not _BITS.fullmatch(bits):
            raise ValueError(value)
        ip = ipaddress.ip_address(addr)
        return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))
    except ValueError:
        raise UapiError(EINVAL, f"allowed_ip {value[:64]!r} is not IP/BITS") from None


def _maybe_zero_key(value: str, what: str) -> bytes | None:
    raw = _key(value, what)
    return None if raw == _ZERO_KEY else raw  # zero means "remove", as FromMaybeZeroHex


_Handler = tuple[str, Callable[[str, str], object]]  # (SetRequest/PeerChange field, parser)
_DEVICE_KEYS: dict[str, _Handler] = {
    "private_key": ("private_key", _maybe_zero_key),
    "listen_port": ("listen_port", lambda v, k: _uint(v, 16, k)),
    "fwmark": ("fwmark", lambda v, k: _uint(v, 32, k)),
    "replace_peers": ("replace_peers", _true),
}
_PEER_KEYS: dict[str, _Handler] = {
    "update_only": ("update_only", _true),
    "remove": ("remove", _true),
    "preshared_key": ("preshared_key", _maybe_zero_key),
    "endpoint": ("endpoint", lambda v, k: parse_endpoint(v)),
    "persistent_keepalive_interval": ("persistent_keepalive", lambda v, k: _uint(v, 16, k)),
    "replace_allowed_ips": ("replace_allowed_ips", _true),
}


def _peer_line(peer: PeerChange, key: str, value: str) -> None:
    if key == "allowed_ip":
        peer.allowed_ips_add.append(parse_allowed_ip(value))  # repeats go at the end
    elif key == "protocol_version":
        if value != "1":
            raise UapiError(EINVAL, f"protocol_version {value[:32]!r} is not 1")
    elif key in _PEER_KEYS:
        field, parse = _PEER_KEYS[key]
        setattr(peer, field, parse(value, key))
        if key == "replace_allowed_ips":
            peer.allowed_ips_add.clear()  # wireguard-go clears at this point in the stream
    else:
        raise UapiError(EINVAL, f"invalid UAPI peer key {key[:32]!r}")


def parse_set(lines: list[str]) -> SetRequest:
    """The body of a set request (lines after "set=1", up to an empty line); UapiError if bad.

    Keys before the first public_key are device keys, later ones belong to that peer.
    Lines after a peer's remove=true are checked but have no effect, as in wireguard-go.
    """
    req = SetRequest()
    peer: PeerChange | None = None
    for raw in lines:
        line = raw[:-1] if raw.endswith("\r") else raw  # Go's line scanner drops one CR
        if not line:
            break
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(EPROTO, f"line without '=': {line[:64]!r}")
        if key == "public_key":
            peer = PeerChange(public_key=_key(value, key))
            req.peers.append(peer)
        elif peer is None:
            if key not in _DEVICE_KEYS:
                raise UapiError(EINVAL, f"invalid UAPI device key {key[:32]!r}")
            field, parse = _DEVICE_KEYS[key]
            setattr(req, field, parse(value, key))
        else:
            _peer_line(peer, key, value)
    req.peers = [PeerChange(p.public_key, remove=True) if p.remove else p for p in req.peers]
    for p in req.peers:  # each prefix once, where it came first (one pass, not one per line)
        if len(p.allowed_ips_add) > 1:
            p.allowed_ips_add = list(dict.fromkeys(p.allowed_ips_add))
    return req


# -- framing ---------------------------------------------------------------------------

Event: TypeAlias = (
    tuple[Literal["get"], None] | tuple[Literal["set"], SetRequest] | tuple[Literal["error"], int]
)


class RequestParser:
    """Splits one connection's byte stream into requests, lazily and within bounds.

    `feed()` bytes, then take events from `next_event()` (or iterate) until None. An error
    in a set body is reported once its blank line arrives and the stream stays usable; a
    framing error (unknown operation, "get=1" not followed by a blank line, a line over
    `max_line` or a request over `max_request` bytes) sets `closed`: reply, then hang up.
    """

    def __init__(self, max_line: int = MAX_LINE, max_request: int = MAX_REQUEST) -> None:
        self.max_line, self.max_request = max_line, max_request
        self.closed = False
        self._buf = bytearray()
        self._pos = 0
        self._op: Literal["get", "set"] | None = None
        self._lines: list[str] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        if not self.closed:
            self._buf += data

    def __iter__(self) -> Iterator[Event]:
        while (event := self.next_event()) is not None:
            yield event

    def next_event(self) -> Event | None:
        while not self.closed:
            if self._op == "get":
                if self._pos >= len(self._buf):
                    return None
                blank = self._buf[self._pos] == 0x0A
                self._pos += 1
                self._op = None
                return ("get", None) if blank else self._fail(EINVAL)
            end = self._buf.find(b"\n", self._pos, self._pos + self.max_line + 1)
            if end < 0:
                return self._fail(EMSGSIZE) if len(self._buf) - self._pos > self.max_line else None
            line = bytes(self._buf[self._pos : end])
            self._pos = end + 1
            if self._pos > 65536 or self._pos == len(self._buf):
                del self._buf[: self._pos]
                self._pos = 0
            if self._op is None:
                if line not in (b"get=1", b"set=1"):
                    return self._fail(EPROTO)
                self._op = "get" if line == b"get=1" else "set"
                self._lines, self._size = [], len(line) + 1
                continue
            self._size += len(line) + 1
            if self._size > self.max_request:
                return self._fail(EMSGSIZE)
            text = line.decode("latin-1")  # bytes 1:1; anything non-ASCII fails parsing
            if text not in ("", "\r"):
                self._lines.append(text)
                continue
            lines, self._lines, self._op = self._lines, [], None
            try:
                return ("set", parse_set(lines))
            except UapiError as exc:
                return ("error", exc.errno)
        return None

    def _fail(self, errno: int) -> Event:
        self.closed = True
        self._buf.clear()
        self._pos = 0
        self._lines = []
        return ("error", errno)
