from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardwg.proto import crypto, noise
from shardwg.proto.constants import CONSTRUCTION, IDENTIFIER, DropReason
from shardwg.proto.noise import (
    HandshakeError,
    LocalIdentity,
    PeerCrypto,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)

VECTORS = Path(__file__).parent / "vectors"


def _key(seed: int) -> bytes:
    return crypto.generate_private_key(bytes([seed]) * 32)


# --------------------------------------------------------------------------- constants, KDF


def test_construction_and_identifier_hashes() -> None:
    c0 = crypto.hash_(CONSTRUCTION)
    assert c0.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    assert crypto.hash_(c0, IDENTIFIER).hex() == (
        "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"
    )
    st = noise.SymmetricState.initialize(CONSTRUCTION, IDENTIFIER)
    assert st.chaining_key == c0
    assert st.hash.hex().startswith("2211b361")


def test_short_protocol_name_is_padded_not_hashed() -> None:
    st = noise.SymmetricState.initialize(b"Noise_NN", b"")
    assert st.chaining_key == b"Noise_NN" + bytes(24)


@pytest.mark.parametrize(
    "v", json.loads((VECTORS / "wireguard_go_kdf.json").read_text())["vectors"]
)
def test_kdf_vectors_from_wireguard_go(v: dict[str, str]) -> None:
    key, data = bytes.fromhex(v["key"]), bytes.fromhex(v["input"])
    t0, t1, t2 = bytes.fromhex(v["t0"]), bytes.fromhex(v["t1"]), bytes.fromhex(v["t2"])
    assert crypto.kdf3(key, data) == (t0, t1, t2)
    assert crypto.kdf2(key, data) == (t0, t1)
    assert crypto.kdf1(key, data) == t0


# --------------------------------------------------------------------------- Noise vector


def _cacophony() -> dict[str, object]:
    vec: dict[str, object] = json.loads((VECTORS / "noise_ikpsk2_cacophony.json").read_text())[
        "vector"
    ]
    assert vec["protocol_name"] == "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    return vec


def test_cacophony_ikpsk2_vector() -> None:
    v = _cacophony()

    def h(name: str) -> bytes:
        value = v[name]
        assert isinstance(value, str)
        return bytes.fromhex(value)

    psks = v["init_psks"]
    assert isinstance(psks, list) and psks == v["resp_psks"]
    psk = bytes.fromhex(psks[0])
    messages = v["messages"]
    assert isinstance(messages, list)
    prologue = h("init_prologue")
    assert prologue == b"John Galt" == h("resp_prologue")

    i_priv, i_eph, r_priv, r_eph = (
        h("init_static"),
        h("init_ephemeral"),
        h("resp_static"),
        h("resp_ephemeral"),
    )
    i_pub, r_pub = crypto.public_key(i_priv), crypto.public_key(r_priv)
    assert r_pub == h("init_remote_static")

    # Message 1, initiator side.
    ist = noise.ik_initial(prologue, r_pub)
    m0 = messages[0]
    e_pub, enc_s, enc_p = noise.write_initiation(
        ist, i_eph, i_pub, r_pub, crypto.dh(i_priv, r_pub), bytes.fromhex(m0["payload"])
    )
    assert (e_pub + enc_s + enc_p).hex() == m0["ciphertext"]

    # Message 1, responder side.
    ct = bytes.fromhex(m0["ciphertext"])
    rst = noise.ik_initial(prologue, r_pub)
    static = noise.read_initiation_static(rst, r_priv, ct[:32], ct[32:80])
    assert static == i_pub
    payload = noise.read_initiation_payload(rst, crypto.dh(r_priv, static), ct[80:])
    assert payload.hex() == m0["payload"]
    assert rst == ist

    # Message 2 both ways.
    m1 = messages[1]
    e_pub, enc_p = noise.write_response(
        rst, r_eph, ct[:32], i_pub, psk, bytes.fromhex(m1["payload"])
    )
    assert (e_pub + enc_p).hex() == m1["ciphertext"]
    ct = bytes.fromhex(m1["ciphertext"])
    payload = noise.read_response(ist, i_eph, i_priv, ct[:32], psk, ct[32:])
    assert payload.hex() == m1["payload"]
    assert ist.hash == rst.hash == h("handshake_hash")

    # Transport: alternating directions, each with its own nonce counter.
    i2r, r2i = ist.split()
    assert rst.split() == (i2r, r2i)
    for n, m in enumerate(messages[2:]):
        key = i2r if n % 2 == 0 else r2i
        counter = n // 2
        pt, ct = bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])
        assert crypto.aead_encrypt(key, counter, pt, b"") == ct
        assert crypto.aead_decrypt(key, counter, ct, b"") == pt


def test_cacophony_vector_fails_with_other_psk() -> None:
    v = _cacophony()
    messages = v["messages"]
    assert isinstance(messages, list)
    r_priv = bytes.fromhex(str(v["resp_static"]))
    i_pub = crypto.public_key(bytes.fromhex(str(v["init_static"])))
    st = noise.ik_initial(b"John Galt", crypto.public_key(r_priv))
    ct = bytes.fromhex(messages[0]["ciphertext"])
    noise.read_initiation_static(st, r_priv, ct[:32], ct[32:80])
    noise.read_initiation_payload(st, crypto.dh(r_priv, i_pub), ct[80:])
    e_pub, enc_p = noise.write_response(
        st, bytes.fromhex(str(v["resp_ephemeral"])), ct[:32], i_pub, bytes(32), b"x"
    )
    assert (e_pub + enc_p).hex() != messages[1]["ciphertext"]


# --------------------------------------------------------------------------- WireGuard handshake


class Pair:
    """Initiator i and responder r that know each other."""

    def __init__(self, psk_i: bytes | None = None, psk_r: bytes | None = None) -> None:
        self.i = LocalIdentity.from_private(_key(1))
        self.r = LocalIdentity.from_private(_key(2))
        self.r_at_i = PeerCrypto.build(self.i, self.r.public, psk_i)
        self.i_at_r = PeerCrypto.build(self.r, self.i.public, psk_r)

    def find(self, static: bytes) -> PeerCrypto | None:
        return self.i_at_r if static == self.i.public else None


TS = bytes.fromhex("400000006553f10a1d000000")


def test_identity_derivations() -> None:
    me = LocalIdentity.from_private(_key(7))
    assert me.public == crypto.public_key(_key(7))
    assert me.mac1_key == crypto.hash_(b"mac1----" + me.public)
    assert me.cookie_key == crypto.hash_(b"cookie--" + me.public)
    other = LocalIdentity.from_private(_key(8))
    pc = PeerCrypto.build(me, other.public, None)
    assert pc.preshared == bytes(32)
    assert pc.mac1_key == other.mac1_key and pc.cookie_key == other.cookie_key
    assert pc.static_static == PeerCrypto.build(other, me.public, None).static_static


def test_low_order_peer_key_accepted_but_never_usable() -> None:
    """Like wireguard-go: the peer exists, no initiation is created for it (issue 13 item 3;
    tests/test_bad_peers.py checks that none is accepted from it either)."""
    me = LocalIdentity.from_private(_key(7))
    pc = PeerCrypto.build(me, bytes(32), None)
    assert not pc.usable and pc.static_static == bytes(32)
    with pytest.raises(HandshakeError) as ei:
        create_initiation(me, pc, 1, _key(3), TS)
    assert ei.value.reason is DropReason.UNKNOWN_PEER


@pytest.mark.parametrize("psk", [None, bytes(range(32))])
def test_two_party_handshake(psk: bytes | None) -> None:
    p = Pair(psk, psk)
    init, state = create_initiation(p.i, p.r_at_i, 0x11223344, _key(3), TS)
    assert len(init) == 148 and init[:4] == b"\x01\x00\x00\x00"
    assert init[4:8] == (0x11223344).to_bytes(4, "little")
    assert init[116:] == bytes(32)

    got = consume_initiation(p.r, bytes(init), p.find)
    assert got.peer is p.i_at_r and got.timestamp == TS and got.remote_index == 0x11223344

    resp, r_keys = create_response(p.r, got, 0x55667788, _key(4))
    assert len(resp) == 92 and resp[:4] == b"\x02\x00\x00\x00"
    assert resp[4:12] == (0x55667788).to_bytes(4, "little") + (0x11223344).to_bytes(4, "little")
    assert resp[60:] == bytes(32)

    i_keys = consume_response(p.i, p.r_at_i, state, bytes(resp))
    assert i_keys.is_initiator and not r_keys.is_initiator
    assert i_keys.send_key == r_keys.recv_key and i_keys.recv_key == r_keys.send_key
    assert i_keys.send_key != i_keys.recv_key
    assert (i_keys.local_index, i_keys.remote_index) == (0x11223344, 0x55667788)
    assert (r_keys.local_index, r_keys.remote_index) == (0x55667788, 0x11223344)
    ct = crypto.aead_encrypt(i_keys.send_key, 0, b"ping", b"")
    assert crypto.aead_decrypt(r_keys.recv_key, 0, ct, b"") == b"ping"


def test_fresh_ephemerals_give_fresh_keys() -> None:
    p = Pair()
    keys = []
    for eph_i, eph_r in ((3, 4), (5, 6)):
        init, state = create_initiation(p.i, p.r_at_i, 1, _key(eph_i), TS)
        resp, _ = create_response(p.r, consume_initiation(p.r, bytes(init), p.find), 2, _key(eph_r))
        keys.append(consume_response(p.i, p.r_at_i, state, bytes(resp)).send_key)
    assert keys[0] != keys[1]


@pytest.mark.parametrize("offset", [8, 40, 60, 87, 100, 115])
def test_tampered_initiation_rejected(offset: int) -> None:
    p = Pair()
    init, _ = create_initiation(p.i, p.r_at_i, 1, _key(3), TS)
    init[offset] ^= 0x01
    with pytest.raises(HandshakeError) as ei:
        consume_initiation(p.r, bytes(init), p.find)
    assert ei.value.reason is DropReason.HANDSHAKE_DECRYPT


@pytest.mark.parametrize("offset", [12, 44, 50, 59])
def test_tampered_response_rejected_and_state_survives(offset: int) -> None:
    p = Pair()
    init, state = create_initiation(p.i, p.r_at_i, 1, _key(3), TS)
    resp, r_keys = create_response(p.r, consume_initiation(p.r, bytes(init), p.find), 2, _key(4))
    bad = bytearray(resp)
    bad[offset] ^= 0x80
    with pytest.raises(HandshakeError) as ei:
        consume_response(p.i, p.r_at_i, state, bytes(bad))
    assert ei.value.reason is DropReason.HANDSHAKE_DECRYPT
    # A forged response must not spoil the real one that arrives afterwards.
    assert consume_response(p.i, p.r_at_i, state, bytes(resp)).send_key == r_keys.recv_key


def test_response_for_other_index_rejected() -> None:
    p = Pair()
    init, state = create_initiation(p.i, p.r_at_i, 1, _key(3), TS)
    resp, _ = create_response(p.r, consume_initiation(p.r, bytes(init), p.find), 2, _key(4))
    state.local_index = 9
    with pytest.raises(HandshakeError) as ei:
        consume_response(p.i, p.r_at_i, state, bytes(resp))
    assert ei.value.reason is DropReason.UNKNOWN_INDEX


def test_unknown_peer_rejected() -> None:
    p = Pair()
    init, _ = create_initiation(p.i, p.r_at_i, 1, _key(3), TS)
    with pytest.raises(HandshakeError) as ei:
        consume_initiation(p.r, bytes(init), lambda static: None)
    assert ei.value.reason is DropReason.UNKNOWN_PEER


def test_initiation_for_another_responder_rejected() -> None:
    p = Pair()
    stranger = LocalIdentity.from_private(_key(9))
    init, _ = create_initiation(p.i, PeerCrypto.build(p.i, stranger.public, None), 1, _key(3), TS)
    with pytest.raises(HandshakeError) as ei:
        consume_initiation(p.r, bytes(init), p.find)
    assert ei.value.reason is DropReason.HANDSHAKE_DECRYPT


def test_wrong_peer_entry_rejected() -> None:
    """find_peer returning some other peer's crypto fails the ss step."""
    p = Pair()
    other = PeerCrypto.build(p.r, LocalIdentity.from_private(_key(9)).public, None)
    init, _ = create_initiation(p.i, p.r_at_i, 1, _key(3), TS)
    with pytest.raises(HandshakeError) as ei:
        consume_initiation(p.r, bytes(init), lambda static: other)
    assert ei.value.reason is DropReason.HANDSHAKE_DECRYPT


@pytest.mark.parametrize(
    ("psk_i", "psk_r"), [(None, bytes(range(32))), (b"\x01" * 32, b"\x02" * 32)]
)
def test_psk_mismatch_rejected(psk_i: bytes | None, psk_r: bytes | None) -> None:
    p = Pair(psk_i, psk_r)
    init, state = create_initiation(p.i, p.r_at_i, 1, _key(3), TS)
    resp, _ = create_response(p.r, consume_initiation(p.r, bytes(init), p.find), 2, _key(4))
    with pytest.raises(HandshakeError) as ei:
        consume_response(p.i, p.r_at_i, state, bytes(resp))
    assert ei.value.reason is DropReason.HANDSHAKE_DECRYPT


def test_low_order_ephemeral_rejected() -> None:
    p = Pair()
    init, _ = create_initiation(p.i, p.r_at_i, 1, _key(3), TS)
    init[8:40] = bytes(32)
    with pytest.raises(HandshakeError) as ei:
        consume_initiation(p.r, bytes(init), p.find)
    assert ei.value.reason is DropReason.HANDSHAKE_DECRYPT


def test_wrong_sizes_rejected() -> None:
    p = Pair()
    init, state = create_initiation(p.i, p.r_at_i, 1, _key(3), TS)
    with pytest.raises(HandshakeError) as ei:
        consume_initiation(p.r, bytes(init[:-1]), p.find)
    assert ei.value.reason is DropReason.BAD_SIZE
    with pytest.raises(HandshakeError):
        consume_response(p.i, p.r_at_i, state, bytes(91))
    with pytest.raises(ValueError):
        create_initiation(p.i, p.r_at_i, 1, _key(3), TS[:11])
