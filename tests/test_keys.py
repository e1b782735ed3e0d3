"""Key helpers: formats and strictness identical to wg's; cross-checked with /usr/bin/wg."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest

from shardwg.config import keys
from shardwg.proto import crypto

WG = shutil.which("wg")
needs_wg = pytest.mark.skipif(WG is None, reason="wg not installed")

# RFC 7748 section 6.1 test vector (Alice), a fixed known answer.
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def _wg(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    assert WG is not None
    return subprocess.run([WG, *args], input=stdin, capture_output=True, text=True, timeout=10)


def test_known_answer() -> None:
    priv = keys.encode_key(ALICE_PRIV)
    assert keys.public_key_from_private(priv) == keys.encode_key(ALICE_PUB)


def test_generate_format() -> None:
    for gen in (keys.generate_private_key, keys.generate_preshared_key):
        a, b = gen(), gen()
        assert a != b
        assert len(a) == 44 and a.endswith("=") and "\n" not in a
        assert len(keys.decode_key(a)) == 32


def test_private_key_is_clamped() -> None:
    for _ in range(20):
        raw = keys.decode_key(keys.generate_private_key())
        assert raw == crypto.clamp(raw)


def test_round_trip_and_whitespace() -> None:
    raw = bytes(range(32))
    text = keys.encode_key(raw)
    assert keys.decode_key(text) == raw
    assert keys.decode_key(text + "\n") == raw
    assert keys.public_key_from_private(text + "\n") == keys.public_key_from_private(text)


NON_CANONICAL = keys.encode_key(bytes(32))[:42] + "B="  # low bits of the last digit set


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        keys.encode_key(bytes(32))[:-1],  # 43 characters
        keys.encode_key(bytes(32)) + "A",  # 45 characters
        base64.b64encode(bytes(31)).decode() + "A",  # 45 characters
        "A" * 42 + "==",  # 44 characters, two "=" (31 bytes)
        "!" * 43 + "=",
        "é" * 43 + "=",
        NON_CANONICAL,
        keys.encode_key(bytes(32)).replace("A", "A\n", 1),  # embedded newline
    ],
)
def test_decode_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="key is not the correct length or format"):
        keys.decode_key(bad)
    with pytest.raises(ValueError, match="invalid private key"):
        keys.public_key_from_private(bad)


def test_encode_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        keys.encode_key(bytes(31))


@needs_wg
def test_wg_pubkey_agrees_with_ours() -> None:
    for _ in range(5):
        priv = keys.generate_private_key()
        out = _wg("pubkey", stdin=priv + "\n")
        assert out.returncode == 0, out.stderr
        assert out.stdout == keys.public_key_from_private(priv) + "\n"


@needs_wg
def test_wg_genkey_output_is_what_we_parse_and_print() -> None:
    out = _wg("genkey")
    assert out.returncode == 0
    priv = out.stdout
    assert priv.endswith("\n") and len(priv) == 45
    assert keys.encode_key(keys.decode_key(priv)) + "\n" == priv
    assert _wg("pubkey", stdin=priv).stdout == keys.public_key_from_private(priv) + "\n"


@needs_wg
def test_wg_rejects_what_we_reject() -> None:
    assert _wg("pubkey", stdin=NON_CANONICAL + "\n").returncode != 0
    short = base64.b64encode(bytes(31)).decode()
    assert _wg("pubkey", stdin=short + "\n").returncode != 0
