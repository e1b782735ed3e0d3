"""UAPI wire format: get replies byte for byte as wireguard-go writes them, set parsing as
strict as wireguard-go's, and a framing parser that nothing can make raise."""

from __future__ import annotations

import random
from errno import EINVAL, EMSGSIZE, EPROTO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import UNSET

from shardwg.uapi import DeviceView, PeerChange, PeerView, SetRequest, UapiError
from shardwg.uapi.protocol import (
    MAX_REQUEST,
    RequestParser,
    format_errno,
    format_get,
    format_status,
    parse_set,
)

K1, K2, K3 = bytes(range(32)), bytes(range(32, 64)), bytes([0xAB] * 32)
H1, H2, H3 = K1.hex(), K2.hex(), K3.hex()
ZERO = "0" * 64
# key, psk, endpoint, handshake sec + nsec, rx, tx, keepalive
PEER_ARGS = (K2, K3, "[fd00::1]:51820", 1700000000, 123456789, 10, 20, 25)


def test_format_get_matches_wireguard_go_order() -> None:
    view = DeviceView(
        private_key=K1,
        listen_port=51820,
        fwmark=42,
        peers=[
            PeerView(*PEER_ARGS, allowed_ips=["10.0.0.2/32", "fd00::2/128"]),
            PeerView(public_key=K3),
        ],
    )
    expected = (
        f"private_key={H1}\nlisten_port=51820\nfwmark=42\n"
        f"public_key={H2}\npreshared_key={H3}\nprotocol_version=1\nendpoint=[fd00::1]:51820\n"
        "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=123456789\n"
        "tx_bytes=20\nrx_bytes=10\npersistent_keepalive_interval=25\n"
        "allowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n"
        f"public_key={H3}\npreshared_key={ZERO}\nprotocol_version=1\n"
        "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
        "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n"
        "errno=0\n\n"
    )
    assert format_get(view).decode() == expected


def test_format_get_leaves_out_unset_device_values() -> None:
    assert format_get(DeviceView()) == b"errno=0\n\n"
    assert format_get(DeviceView(private_key=bytes(32))) == b"errno=0\n\n"


@pytest.mark.parametrize(
    "view",
    [
        DeviceView(private_key=b"short"),
        DeviceView(peers=[PeerView(public_key=K1 + b"x")]),
        DeviceView(peers=[PeerView(public_key=K1, endpoint="1.2.3.4:5\nerrno=0")]),
        DeviceView(peers=[PeerView(public_key=K1, allowed_ips=["10.0.0.0/8 x"])]),
        DeviceView(peers=[PeerView(public_key=K1, rx_bytes=-1)]),
    ],
)
def test_format_get_refuses_values_that_would_corrupt_the_reply(view: DeviceView) -> None:
    with pytest.raises(ValueError):
        format_get(view)


def test_errno_trailers_follow_what_wg_decodes() -> None:
    assert format_errno(0) == b"errno=0\n\n"
    assert format_status(EINVAL) == b"errno=-22\n\n"  # set: wg negates, like wireguard-go
    assert format_status(-EINVAL) == b"errno=-22\n\n"
    assert format_status(EINVAL, get=True) == b"errno=22\n\n"


def test_parse_set_every_key() -> None:
    text = (
        f"private_key={H1}|listen_port=51820|fwmark=4294967295|replace_peers=true|"
        f"public_key={H2}|update_only=true|preshared_key={H3.upper()}|protocol_version=1|"
        "endpoint=192.0.2.1:51820|persistent_keepalive_interval=65535|replace_allowed_ips=true|"
        "allowed_ip=10.0.0.1/24|allowed_ip=fd00::1/64|allowed_ip=10.0.0.0/24"
    )
    req = parse_set(text.split("|"))
    assert req == SetRequest(
        private_key=K1,
        listen_port=51820,
        fwmark=0xFFFFFFFF,
        replace_peers=True,
        peers=[
            PeerChange(
                public_key=K2,
                update_only=True,
                preshared_key=K3,
                endpoint="192.0.2.1:51820",
                persistent_keepalive=65535,
                replace_allowed_ips=True,
                allowed_ips_add=["10.0.0.0/24", "fd00::/64"],  # masked, deduplicated
            )
        ],
    )


def test_parse_set_multiple_peers_remove_and_zero_keys() -> None:
    req = parse_set(
        [
            f"private_key={ZERO}",
            f"public_key={H1}",
            "endpoint=1.2.3.4:5",
            "remove=true",
            "persistent_keepalive_interval=7",  # checked, but the peer is gone
            f"public_key={H2}",
            f"preshared_key={ZERO}",
            "endpoint=[fe80::1%eth0]:9",
            f"public_key={H1}",
        ]
    )
    assert req.private_key is None and req.listen_port is UNSET and not req.replace_peers
    assert req.peers == [
        PeerChange(public_key=K1, remove=True),
        PeerChange(public_key=K2, preshared_key=None, endpoint="[fe80::1%eth0]:9"),
        PeerChange(public_key=K1),
    ]


def test_replace_allowed_ips_drops_earlier_additions() -> None:
    lines = [f"public_key={H1}", "allowed_ip=10.0.0.1/32", "replace_allowed_ips=true"]
    peer = parse_set([*lines, "allowed_ip=10.0.0.2/32"]).peers[0]
    assert peer.replace_allowed_ips and peer.allowed_ips_add == ["10.0.0.2/32"]


def test_parse_set_is_as_liberal_as_go() -> None:
    req = parse_set(["listen_port=00080\r", f"public_key={H1}", "endpoint=10.0.0.1:0", "", "x"])
    assert req.listen_port == 80 and req.peers[0].endpoint == "10.0.0.1:0"
    assert parse_set([]) == SetRequest()


BAD_ENDPOINTS = (
    "1.2.3.4|1.2.3.4:|::1:5|[1.2.3.4]:5|[::1]|[::1]:x|host.example:5|1.2.3.4:65536|01.2.3.4:5"
    "|1.2.3.4 :5|[fe80::1%]:5|[fe80::1%a\tb]:5"
)
BAD_PREFIXES = (
    "10.0.0.1|10.0.0.0/33|fd00::/129|10.0.0.0/08|10.0.0.0/-1|10.0.0.0/255.0.0.0|fe80::%eth0/64"
    "|10.0.0.0/|/8|010.0.0.0/8"
)


@pytest.mark.parametrize(
    ("lines", "errno"),
    [
        (["listen_port"], EPROTO),
        ([f"public_key={H1}", "remove"], EPROTO),
        (["private_key=abc"], EINVAL),
        ([f"private_key={H1}00"], EINVAL),
        ([f"private_key={'zz' * 32}"], EINVAL),
        ([f"private_key= {H1[1:]}"], EINVAL),
        (["listen_port=65536"], EINVAL),
        (["listen_port=-1"], EINVAL),
        (["listen_port=+1"], EINVAL),
        (["listen_port= 1"], EINVAL),
        (["listen_port="], EINVAL),
        (["listen_port=\u0661"], EINVAL),
        (["listen_port=1_0"], EINVAL),
        (["listen_port=" + "9" * 4000], EINVAL),
        (["fwmark=4294967296"], EINVAL),
        (["fwmark=0x10"], EINVAL),
        (["replace_peers=false"], EINVAL),
        (["bogus=1"], EINVAL),
        (["=1"], EINVAL),
        (["protocol_version=1"], EINVAL),
        (["endpoint=1.2.3.4:5"], EINVAL),
        (["public_key=abcd"], EINVAL),
        ([f"public_key={H1}", "listen_port=1"], EINVAL),
        ([f"public_key={H1}", "update_only=yes"], EINVAL),
        ([f"public_key={H1}", "remove=1"], EINVAL),
        ([f"public_key={H1}", "replace_allowed_ips=false"], EINVAL),
        ([f"public_key={H1}", "protocol_version=2"], EINVAL),
        ([f"public_key={H1}", "persistent_keepalive_interval=65536"], EINVAL),
        ([f"public_key={H1}", "preshared_key=00"], EINVAL),
        ([f"public_key={H1}", "remove=true", "endpoint=nope"], EINVAL),
        *(([f"public_key={H1}", f"endpoint={bad}"], EINVAL) for bad in BAD_ENDPOINTS.split("|")),
        *(([f"public_key={H1}", f"allowed_ip={bad}"], EINVAL) for bad in BAD_PREFIXES.split("|")),
    ],
)
def test_parse_set_errors(lines: list[str], errno: int) -> None:
    with pytest.raises(UapiError) as info:
        parse_set(lines)
    assert info.value.errno == errno


WG_SET = (
    f"set=1\nprivate_key={H1}\nlisten_port=51820\nreplace_peers=true\n"
    f"public_key={H2}\npreshared_key={H3}\nendpoint=127.0.0.1:51820\n"
    f"persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.0.0.2/32\n\n"
).encode()


def _events(parser: RequestParser, data: bytes, chunks: list[int]) -> list[object]:
    out: list[object] = []
    pos = 0
    for size in [*chunks, len(data)]:
        parser.feed(data[pos : pos + size])
        pos += size
        out.extend(parser)
    return out


def test_request_parser_split_and_merged_chunks() -> None:
    stream = b"get=1\n\n" + WG_SET + b"get=1\n\n"
    whole = _events(RequestParser(), stream, [])
    assert [e[0] for e in whole] == ["get", "set", "get"]  # type: ignore[index]
    assert whole[1] == ("set", parse_set(WG_SET.decode().split("\n")[1:]))
    assert _events(RequestParser(), stream, [1] * len(stream)) == whole
    rng = random.Random(5)
    for _ in range(50):
        cuts = [rng.randrange(1, 40) for _ in range(10)]
        assert _events(RequestParser(), stream, cuts) == whole


def test_request_parser_set_error_keeps_the_stream() -> None:
    parser = RequestParser()
    parser.feed(b"set=1\nlisten_port=99999\nfwmark=1\n\nget=1\n\nset=1\n")
    assert list(parser) == [("error", EINVAL), ("get", None)]
    assert not parser.closed


@pytest.mark.parametrize(
    ("data", "errno"),
    [
        (b"get=1\nx", EINVAL),
        (b"get=2\n\n", EPROTO),
        (b"\n", EPROTO),
        (b"get=1\r\n\r\n", EPROTO),
        (b"x" * 5000, EMSGSIZE),
        (b"set=1\n" + b"a" * 4097 + b"\n", EMSGSIZE),
    ],
)
def test_request_parser_framing_errors_close(data: bytes, errno: int) -> None:
    parser = RequestParser()
    parser.feed(data)
    assert list(parser) == [("error", errno)]
    assert parser.closed
    parser.feed(b"get=1\n\n")
    assert list(parser) == []


def test_request_parser_bounds_the_request() -> None:
    parser = RequestParser(max_request=1000)
    parser.feed(b"set=1\n" + b"fwmark=1\n" * 200)
    assert list(parser) == [("error", EMSGSIZE)] and parser.closed
    line = f"public_key={H1}\nallowed_ip=10.0.0.0/8\n".encode()
    big = b"set=1\n" + line * ((MAX_REQUEST // len(line)) + 1) + b"\n"
    parser = RequestParser()
    parser.feed(big)
    assert list(parser) == [("error", EMSGSIZE)]  # just over the default (32 MiB)


def test_truncated_requests_yield_nothing_and_never_raise() -> None:
    for cut in range(len(WG_SET)):
        parser = RequestParser()
        parser.feed(WG_SET[:cut])
        assert list(parser) == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20))
def test_fuzz_random_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    for event in _events(RequestParser(max_line=200), data, cuts):
        assert event[0] in ("get", "set", "error")  # type: ignore[index]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_wg_requests_never_raise(data: st.DataObject) -> None:
    raw = bytearray(WG_SET)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.sampled_from(b"\n\r=:/[]%0aZ\x00\xff "))
    cut = data.draw(st.integers(0, len(raw)))
    parser = RequestParser()
    parser.feed(bytes(raw[:cut]))
    for event in parser:
        if event[0] == "set":
            assert isinstance(event[1], SetRequest)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=12))
def test_fuzz_parse_set_raises_only_uapi_error(lines: list[str]) -> None:
    try:
        parse_set(lines)
    except UapiError as exc:
        assert exc.errno in (EINVAL, EPROTO)


def test_a_peer_with_thousands_of_allowed_ips() -> None:
    """`wg syncconf` sends a site peer's every prefix, some more than once: all arrive, once
    each, in first-seen order (a list scan per line made this quadratic)."""
    prefixes = [f"10.{i >> 8 & 255}.{i & 255}.0/24" for i in range(20_000)]
    repeated = [p for pair in zip(prefixes, prefixes[::-1], strict=True) for p in pair]
    req = parse_set([f"public_key={H1}", *(f"allowed_ip={p}" for p in repeated)])
    seen: dict[str, None] = {}
    for p in repeated:
        seen.setdefault(p)
    assert req.peers[0].allowed_ips_add == list(seen) and len(seen) == 20_000
