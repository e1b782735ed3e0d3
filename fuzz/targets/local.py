"""Targets on what a local user can hand the gateway: `config` (wg-quick text) and
`uapi` (bytes on the UAPI socket)."""


from __future__ import annotations

from collections.abc import Iterable
from errno import EINVAL, EMSGSIZE, EPROTO
from typing import Any

from fuzz.targets.world import FuzzFailure, check
from shardwg.config.model import ConfigError, format_config, parse_config
from shardwg.uapi import DeviceView, PeerView, SetRequest, UapiError
from shardwg.uapi.protocol import RequestParser, format_get, parse_set


def config(data: bytes) -> None:
    """wg-quick text: parse_config raises only ConfigError ("PATH:LINE: problem").

    An accepted config has 32-byte keys and survives format_config -> parse_config
    unchanged (the SaveConfig promise), unless format_config refuses it with the
    documented ValueError for values a config file cannot hold.
    """
    text = data.decode("utf-8", "replace")
    try:
        cfg = parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        check(str(exc).startswith(f"fuzz.conf:{exc.line}: "), f"bad message {exc}")
        check(0 <= exc.line <= text.count("\n") + 1, f"line {exc.line} out of range")
        return
    check(len(cfg.interface.private_key) == 32, "private key not 32 bytes")
    for p in cfg.peers:
        check(len(p.public_key) == 32, "public key not 32 bytes")
        check(p.preshared_key is None or len(p.preshared_key) == 32, "psk not 32 bytes")
    try:
        saved = format_config(cfg)
    except ValueError:
        return
    try:
        again = parse_config(saved, "saved.conf")
    except ConfigError as exc:
        raise FuzzFailure(f"format_config output does not parse: {exc}\n{saved}") from None
    check(again == cfg, f"config changed in a SaveConfig round trip:\n{cfg!r}\n{again!r}")


# --------------------------------------------------------------------------- uapi

_UAPI_ERRNOS = {EINVAL, EPROTO, EMSGSIZE}


def _uapi_events(parser: Any, chunks: Iterable[bytes]) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    for chunk in chunks:
        parser.feed(chunk)
        events += list(parser)
    return events


def _check_uapi_events(events: list[tuple[str, Any]], parser: Any) -> None:
    for op, value in events:
        if op == "get":
            check(value is None, "get event with a value")
        elif op == "set":
            check(isinstance(value, SetRequest), f"set event holds {value!r}")
            _check_settable(value)
        else:
            check(op == "error" and value in _UAPI_ERRNOS, f"undocumented event {op}={value!r}")
    if parser.closed:
        check(bool(events) and events[-1][0] == "error", "closed without an error event")


def _check_settable(req: Any) -> None:
    """What a set accepted can be reported by get: format_get must not refuse it."""
    if isinstance(req.private_key, bytes):
        check(len(req.private_key) == 32, "private key not 32 bytes")
    peers = []
    for p in req.peers:
        check(len(p.public_key) == 32, "public key not 32 bytes")
        psk = p.preshared_key if isinstance(p.preshared_key, bytes) else None
        peers.append(
            PeerView(
                public_key=p.public_key,
                preshared_key=psk,
                endpoint=p.endpoint if isinstance(p.endpoint, str) else None,
                persistent_keepalive=(
                    p.persistent_keepalive if isinstance(p.persistent_keepalive, int) else 0
                ),
                allowed_ips=list(p.allowed_ips_add),
            )
        )
    view = DeviceView(
        private_key=req.private_key if isinstance(req.private_key, bytes) else None,
        listen_port=req.listen_port if isinstance(req.listen_port, int) else 0,
        fwmark=req.fwmark if isinstance(req.fwmark, int) else 0,
        peers=peers,
    )
    try:
        reply = format_get(view)
    except ValueError as exc:
        raise FuzzFailure(f"set accepted what get cannot report: {exc}") from None
    check(reply.endswith(b"errno=0\n\n"), "get reply lacks its trailer")
    check(b"\n\n" not in reply[:-2], "a set value forged an early end of the get reply")


def uapi(data: bytes) -> None:
    """Bytes on the UAPI socket: RequestParser yields only get, set or error events.

    The same bytes fed whole, in small chunks and under tight limits give only
    documented events (errors are EINVAL, EPROTO or EMSGSIZE), chunking never changes
    them, a closed parser said why, parse_set raises only UapiError, and whatever a
    set accepts can be reported by get.
    """
    whole = RequestParser()
    events = _uapi_events(whole, [data])
    _check_uapi_events(events, whole)
    step = 1 + (len(data) % 7)
    chunked = RequestParser()
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    check(_uapi_events(chunked, pieces) == events, "chunking changed the UAPI events")
    tight = RequestParser(max_line=48, max_request=160)
    _check_uapi_events(_uapi_events(tight, [data]), tight)
    try:
        parse_set(data.decode("latin-1").split("\n"))
    except UapiError as exc:
        check(exc.errno in _UAPI_ERRNOS, f"parse_set errno {exc.errno}")
