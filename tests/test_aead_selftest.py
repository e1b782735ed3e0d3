"""The transport AEAD is checked before a gateway starts (issue 13, item 8).

The data path seals and opens into caller buffers (`encrypt_into`/`decrypt_into`), which
`cryptography` has only from 47.0 (measured: 46.0.0 and 45.0.7 lack both). On an older
release every packet would be an internal error; instead the gateway must refuse to start.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings

from shardwg.config.keys import encode_key, generate_private_key
from shardwg.proto import keypair as K
from shardwg.proto.constants import TRANSPORT_HEADER_SIZE

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_floor_is_the_release_with_the_into_api() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("cryptography"))
    floor = re.fullmatch(r"cryptography>=(\d+)(?:\.\d+)*", spec)
    assert floor is not None, spec
    assert int(floor.group(1)) >= 47, f"{spec}: 46 and older have no encrypt_into/decrypt_into"
    assert hasattr(ChaCha20Poly1305, "encrypt_into") and hasattr(ChaCha20Poly1305, "decrypt_into")


def test_known_vector_is_what_an_independent_aead_computes() -> None:
    """The self-test's expected datagram, recomputed with libsodium (not `cryptography`)."""
    v = K.SELF_TEST
    nonce = bytes(4) + v.counter.to_bytes(8, "little")
    padded = v.plain + bytes(-len(v.plain) % 16)
    sealed = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(padded, None, nonce, v.key)
    header = (4).to_bytes(4, "little") + v.remote_index.to_bytes(4, "little") + nonce[4:]
    assert header + sealed == v.datagram
    assert len(v.datagram) == TRANSPORT_HEADER_SIZE + len(padded) + 16


def test_self_test_passes_on_the_installed_release() -> None:
    K.aead_self_test()


class _NoInto:
    """cryptography <= 46: no encrypt_into/decrypt_into."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        return self._aead.encrypt(nonce, data, aad)


class _WrongOutput:
    """An AEAD that runs but computes garbage (a broken build or a bad backend)."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def encrypt_into(self, nonce: bytes, data: bytes, aad: bytes | None, buf: object) -> None:
        self._aead.encrypt_into(bytes(12), data, aad, buf)  # type: ignore[arg-type]

    def decrypt_into(self, nonce: bytes, data: bytes, aad: bytes | None, buf: object) -> None:
        self._aead.decrypt_into(nonce, data, aad, buf)  # type: ignore[arg-type]


class _OpensAnything(_WrongOutput):
    """Seals right, but its decrypt never checks the tag."""

    def encrypt_into(self, nonce: bytes, data: bytes, aad: bytes | None, buf: object) -> None:
        self._aead.encrypt_into(nonce, data, aad, buf)  # type: ignore[arg-type]

    def decrypt_into(self, nonce: bytes, data: bytes, aad: bytes | None, buf: object) -> None:
        return None


@pytest.mark.parametrize("broken", [_NoInto, _WrongOutput, _OpensAnything])
def test_self_test_refuses_a_broken_aead(monkeypatch: pytest.MonkeyPatch, broken: type) -> None:
    monkeypatch.setattr(K, "AEAD", broken)
    with pytest.raises(K.AeadSelfTestError, match="cryptography >= 47"):
        K.aead_self_test()


_RUN_BROKEN = """
import sys
from shardwg.proto import keypair
class NoInto:
    def __init__(self, key):
        pass
keypair.AEAD = NoInto
from shardwg import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.netns
def test_gateway_refuses_to_start_with_a_broken_aead(tmp_path: Path) -> None:
    """`shardwg run` (in a throwaway network namespace) exits 1 with a clear message and
    creates nothing, instead of serving with a data path that fails every packet."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    name = f"swgst{os.getpid() % 100000}"
    conf = tmp_path / f"{name}.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {generate_private_key()}\nAddress = 10.99.0.1/24\n"
        f"ListenPort = 0\n\n[Peer]\nPublicKey = {encode_key(os.urandom(32))}\n"
        "AllowedIPs = 10.99.0.2/32\n"
    )
    os.chmod(conf, 0o600)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        res = subprocess.run(
            ["unshare", "--net", sys.executable, "-c", _RUN_BROKEN, "run", "-c", str(conf),
             "-w", "1"],
            capture_output=True, text=True, timeout=15, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the gateway started with a broken AEAD: {exc.stderr!r}")
    assert res.returncode == 1, res.stderr
    assert "self-test" in res.stderr and "cryptography >= 47" in res.stderr, res.stderr
    assert not os.path.exists(f"/var/run/wireguard/{name}.sock")
