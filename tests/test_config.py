"""wg-quick config parsing: accepted syntax, every error names file and line, round trips."""

from __future__ import annotations

import os
import random
from pathlib import Path

import msgspec
import pytest

from shardwg.config import model as cfgmod
from shardwg.config.keys import decode_key, encode_key
from shardwg.config.model import (
    Config,
    ConfigError,
    Endpoint,
    InterfaceConfig,
    PeerConfig,
    format_config,
    load_config,
    parse_config,
    private_key_file_warning,
)

PRIV = encode_key(bytes(range(32)))
PUB1 = encode_key(bytes([1]) * 32)
PUB2 = encode_key(bytes([2]) * 32)
PSK = encode_key(bytes([3]) * 32)

EXAMPLE = f"""\
# A server with two peers
[Interface]
PrivateKey = {PRIV}
ListenPort = 51820
Address = 10.0.0.1/24, fd00::1/64
Address = 10.0.1.1/24
DNS = 1.1.1.1,9.9.9.9 example.com
MTU = 1380
FwMark = 0x1234
Table = 1234
SaveConfig = true
PreUp = echo pre
PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -A FORWARD -o %i -j ACCEPT
PostDown = echo down   # a trailing comment

[Peer]
PublicKey = {PUB1}
PresharedKey = {PSK}
AllowedIPs = 10.0.0.2/32, fd00::2/128
AllowedIPs = 192.168.7.0/24
Endpoint = 203.0.113.5:51820
PersistentKeepalive = 25

[Peer]
# no endpoint: it roams to us
PublicKey = {PUB2}
AllowedIPs = 10.0.0.3/32
"""


def _errline(text: str) -> tuple[int, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "wg0.conf")
    err = info.value
    assert str(err) == f"wg0.conf:{err.line}: {err.problem}"
    return err.line, err.problem


def test_full_example() -> None:
    cfg = parse_config(EXAMPLE, "wg0.conf")
    i = cfg.interface
    assert i.private_key == bytes(range(32))
    assert i.listen_port == 51820
    assert i.addresses == ["10.0.0.1/24", "fd00::1/64", "10.0.1.1/24"]
    assert i.dns == ["1.1.1.1", "9.9.9.9", "example.com"]
    assert (i.mtu, i.fwmark, i.table, i.save_config) == (1380, 0x1234, "1234", True)
    assert i.pre_up == ["echo pre"]
    assert i.post_up == ["iptables -A FORWARD -i %i -j ACCEPT; iptables -A FORWARD -o %i -j ACCEPT"]
    assert i.post_down == ["echo down"] and i.pre_down == []
    p1, p2 = cfg.peers
    assert p1.public_key == bytes([1]) * 32 and p1.preshared_key == bytes([3]) * 32
    assert p1.allowed_ips == ["10.0.0.2/32", "fd00::2/128", "192.168.7.0/24"]
    assert p1.endpoint == Endpoint("203.0.113.5", 51820)
    assert p1.persistent_keepalive == 25
    assert p2 == PeerConfig(public_key=bytes([2]) * 32, allowed_ips=["10.0.0.3/32"])


def test_defaults() -> None:
    cfg = parse_config(f"[Interface]\nPrivateKey={PRIV}\n")
    assert cfg.interface == InterfaceConfig(private_key=bytes(range(32)))
    assert cfg.interface.listen_port is None and cfg.interface.mtu == 1420
    assert cfg.interface.table is None and cfg.peers == []


def test_case_insensitive_keys_sections_crlf_bom() -> None:
    text = f"\ufeff[INTERFACE]\r\nprivatekey = {PRIV}\r\nLISTENPORT=1\r\nSaveConfig = TRUE\r\n"
    text += f"[ peer ]\r\npublicKEY={PUB1}\r\nallowedips=\r\npersistentkeepalive = OFF\r\n"
    cfg = parse_config(text)
    assert cfg.interface.listen_port == 1 and cfg.interface.save_config
    assert cfg.peers[0].public_key == bytes([1]) * 32
    assert cfg.peers[0].allowed_ips == [] and cfg.peers[0].persistent_keepalive == 0
    line, problem = _errline(text + "SaveConfig = true\r\n")  # an [Interface] key in [Peer]
    assert (line, problem) == (9, "unknown key 'SaveConfig' in [Peer]")


def test_allowed_ips_normalised_and_deduplicated() -> None:
    text = f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nPublicKey={PUB1}\n"
    text += "AllowedIPs = 10.1.2.3/8 , fd00::1, 10.0.0.0/8\nAllowedIPs = 0.0.0.0/0,::/0\n"
    cfg = parse_config(text)
    assert cfg.peers[0].allowed_ips == ["10.0.0.0/8", "fd00::1/128", "0.0.0.0/0", "::/0"]


@pytest.mark.parametrize(
    "text, host, port",
    [
        ("1.2.3.4:51820", "1.2.3.4", 51820),
        ("[fd00::1]:51820", "fd00::1", 51820),
        ("[fe80::1%eth0]:1", "fe80::1%eth0", 1),
        ("vpn.example.com:65535", "vpn.example.com", 65535),
        ("localhost:7", "localhost", 7),
    ],
)
def test_endpoint_parse(text: str, host: str, port: int) -> None:
    ep = Endpoint.parse(text)
    assert (ep.host, ep.port) == (host, port)
    assert str(ep) == text
    with pytest.raises(AttributeError):
        ep.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4",
        "1.2.3.4:",
        ":51820",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:port",
        "1.2.3.400:1",
        "fd00::1:51820",
        "[fd00::1]51820",
        "[fd00::1:51820",
        "[not-v6]:1",
        "bad host:1",
        "-x..y:1",
    ],
)
def test_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(text)


HEAD = f"[Interface]\nPrivateKey = {PRIV}\n"  # lines 1-2
PEER = f"[Peer]\nPublicKey = {PUB1}\n"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        (HEAD + "[Peers]\n", 3, "unknown section"),
        (HEAD + "Foo = bar\n", 3, "unknown key 'Foo' in [Interface]"),
        (HEAD + PEER + "ListenPort = 1\n", 5, "unknown key 'ListenPort' in [Peer]"),
        ("# hi\nPrivateKey = x\n" + HEAD, 2, "outside a section"),
        (HEAD + "just words\n", 3, "expected 'Key = Value'"),
        ("[Interface]\nPrivateKey = not-base64!\n", 2, "PrivateKey: key is not"),
        (f"[Interface]\nPrivateKey = {encode_key(bytes(32))[:-2]}=\n", 2, "correct length"),
        (HEAD + "ListenPort = 65536\n", 3, "out of range 0..65535"),
        (HEAD + "ListenPort = -1\n", 3, "not a number"),
        (HEAD + "ListenPort =\n", 3, "not a number"),
        (HEAD + "Address = 10.0.0.1/33\n", 3, "Address '10.0.0.1/33'"),
        (HEAD + "Address = 10.0.0.1/24, nope\n", 3, "Address 'nope'"),
        (HEAD + "MTU = 575\n", 3, "MTU 575 out of range 576..65475"),
        (HEAD + "MTU = 65535\n", 3, "one UDP datagram"),  # + 32 B sealed: over 65,507 B
        (HEAD + "MTU = 65536\n", 3, "out of range"),
        (HEAD + "MTU = 1279\nAddress = fd00::1/64\n", 3, "needed by IPv6"),
        (HEAD + "FwMark = 0x100000000\n", 3, "FwMark"),
        (HEAD + "FwMark = 0xzz\n", 3, "FwMark"),
        (HEAD + "FwMark = on\n", 3, "FwMark"),
        (HEAD + "Table = main2\n", 3, "Table 'main2' is not a number"),
        (HEAD + "SaveConfig = yes\n", 3, "neither true nor false"),
        (HEAD + PEER + "PersistentKeepalive = 65536\n", 5, "out of range 0..65535"),
        (HEAD + PEER + "PersistentKeepalive = -1\n", 5, "not a number"),
        (HEAD + PEER + "AllowedIPs = 10.0.0.0/255.0.0.0\n", 5, "AllowedIPs entry"),
        (HEAD + PEER + "AllowedIPs = 10.0.0.0/33\n", 5, "AllowedIPs entry"),
        (HEAD + PEER + "AllowedIPs = 10.0.0.0/8,,fd00::/8\n", 5, "AllowedIPs entry ''"),
        (HEAD + PEER + "AllowedIPs = +10.0.0.0/8\n", 5, "AllowedIPs entry"),
        (HEAD + PEER + "AllowedIPs = 10.0.0.1 10.0.0.2\n", 5, "AllowedIPs entry"),
        (HEAD + PEER + "Endpoint = fd00::1:51820\n", 5, "needs brackets"),
        (HEAD + PEER + "Endpoint = 1.2.3.4:99999\n", 5, "endpoint port 99999 out of range"),
        (HEAD + PEER + "PresharedKey = abc\n", 5, "PresharedKey: key is not"),
        (HEAD + PEER + PEER, 6, "duplicate peer PublicKey (first at line 4)"),
        ("[Interface]\nListenPort = 1\n", 1, "no PrivateKey"),
        (HEAD + "\n\n[Peer]\nAllowedIPs = 10.0.0.0/8\n", 5, "[Peer] has no PublicKey"),
        ("", 0, "no [Interface] section"),
        (PEER, 0, "no [Interface] section"),
        (HEAD + PEER + HEAD, 5, "second [Interface] (first at line 1)"),
        (HEAD + "ListenPort = 1\x00\x01\n", 3, "control character 0x00"),
    ],
)
def test_errors_name_line_and_problem(text: str, line: int, fragment: str) -> None:
    got_line, problem = _errline(text)
    assert (got_line, fragment in problem) == (line, True), problem


@pytest.mark.parametrize(
    "value, expected",
    [("off", 0), ("OFF", 0), ("0", 0), ("51820", 51820), ("0x1f", 31), ("0XFF", 255)],
)
def test_fwmark_forms(value: str, expected: int) -> None:
    assert parse_config(HEAD + f"FwMark = {value}\n").interface.fwmark == expected


@pytest.mark.parametrize(
    "value, expected", [("off", "off"), ("Auto", "auto"), ("1234", "1234"), ("007", "7")]
)
def test_table_forms(value: str, expected: str) -> None:
    assert parse_config(HEAD + f"Table = {value}\n").interface.table == expected


def test_mtu_up_to_what_one_udp_datagram_carries() -> None:
    assert parse_config(HEAD + "MTU = 9000\n").interface.mtu == 9000
    assert parse_config(HEAD + "MTU = 65475\n").interface.mtu == 65475  # 65475 + 32 + 28 = 65535


def test_mtu_ipv4_only_may_be_small_and_later_keys_override() -> None:
    cfg = parse_config(HEAD + "MTU = 1400\nAddress = 10.0.0.1/24\nMTU = 576\n")
    assert cfg.interface.mtu == 576


def test_huge_text_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfgmod, "MAX_CONFIG_BYTES", 1000)
    line, problem = _errline(HEAD + "#" * 2000)
    assert line == 0 and "larger than 1000 bytes" in problem


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "wg0.conf"
    path.write_text(EXAMPLE)
    assert load_config(str(path)) == parse_config(EXAMPLE)


def test_load_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError, match=rf"^{missing}:0: cannot read config"):
        load_config(str(missing))
    with pytest.raises(ConfigError, match=":0: cannot read config"):
        load_config(str(tmp_path))
    binary = tmp_path / "bin.conf"
    binary.write_bytes(HEAD.encode() + b"\n\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=rf"^{binary}:4: not UTF-8"):
        load_config(str(binary))
    nul = tmp_path / "nul.conf"
    nul.write_bytes(bytes(64))
    with pytest.raises(ConfigError, match=r":1: control character 0x00"):
        load_config(str(nul))
    huge = tmp_path / "huge.conf"
    with open(huge, "wb") as f:
        f.truncate(cfgmod.MAX_CONFIG_BYTES + 10)  # sparse: costs no disk
    with pytest.raises(ConfigError, match=r":0: config is larger than"):
        load_config(str(huge))


def test_private_key_file_warning(tmp_path: Path) -> None:
    path = tmp_path / "wg0.conf"
    path.write_text(EXAMPLE)
    os.chmod(path, 0o600)
    assert private_key_file_warning(str(path)) is None
    for mode in (0o640, 0o604, 0o644, 0o660):
        os.chmod(path, mode)
        warning = private_key_file_warning(str(path))
        assert warning is not None and str(path) in warning and f"{mode:04o}" in warning
    assert private_key_file_warning(str(tmp_path / "missing")) is None


def test_format_round_trips_example() -> None:
    cfg = parse_config(EXAMPLE)
    text = format_config(cfg)
    assert parse_config(text) == cfg
    assert format_config(parse_config(text)) == text
    assert "FwMark = 0x1234" in text and "Endpoint = 203.0.113.5:51820" in text


def _random_config(rng: random.Random) -> Config:
    def key() -> bytes:
        return rng.randbytes(32)

    endpoints = [None, Endpoint("192.0.2.1", 1), Endpoint("fd00::5", 51820), Endpoint("h.io", 9)]
    peers = [
        PeerConfig(
            public_key=key(),
            preshared_key=rng.choice([None, key()]),
            allowed_ips=rng.sample(["10.0.0.0/8", "0.0.0.0/0", "fd00::/64", "::/0"], k=2),
            endpoint=rng.choice(endpoints),
            persistent_keepalive=rng.choice([0, 1, 25, 65535]),
        )
        for _ in range(rng.randrange(4))
    ]
    iface = InterfaceConfig(
        private_key=key(),
        listen_port=rng.choice([None, 0, 51820, 65535]),
        addresses=rng.choice([[], ["10.0.0.1/24"], ["10.0.0.1/24", "fd00::1/64"]]),
        mtu=rng.choice([1280, 1420, 9000]),
        fwmark=rng.choice([0, 1, 0xFFFFFFFF]),
        table=rng.choice([None, "off", "auto", "51820"]),
        save_config=rng.choice([False, True]),
        dns=rng.choice([[], ["1.1.1.1", "corp.example"]]),
        pre_up=rng.choice([[], ["ip rule add x", "sysctl -w y=1"]]),
        post_down=rng.choice([[], ["echo a=b"]]),
    )
    return Config(iface, peers)


@pytest.mark.parametrize("seed", range(20))
def test_format_round_trips_random(seed: int) -> None:
    cfg = _random_config(random.Random(seed))
    assert parse_config(format_config(cfg)) == cfg


def test_format_refuses_unwritable_hook() -> None:
    cfg = Config(InterfaceConfig(private_key=bytes(32), post_up=["echo # not a comment"]))
    with pytest.raises(ValueError, match="cannot be written"):
        format_config(cfg)


def test_structs_are_frozen_and_repr_hides_secrets() -> None:
    cfg = parse_config(EXAMPLE)
    with pytest.raises(AttributeError):
        cfg.interface.mtu = 1  # type: ignore[misc]
    text = repr(cfg)
    assert "<redacted>" in text
    assert repr(bytes(range(32))) not in text and repr(bytes([3]) * 32) not in text
    assert repr(bytes([1]) * 32) in text  # public keys stay visible
    changed = msgspec.structs.replace(cfg.interface, mtu=1300)
    assert changed.mtu == 1300 and changed.private_key == decode_key(PRIV)
