"""A peer whose public key is a low-order point (issue 13, item 3).

X25519 with such a key gives an all-zero shared secret, so no handshake with it can be
authenticated. wireguard-go and the kernel accept the peer and never complete a handshake
with it; so must we: from the file and from `wg set`, without costing any other peer a
packet. The one thing that must never happen is accepting an initiation that claims to come
from it: anyone can compute DH(anything, low-order point) = 0.
"""

from __future__ import annotations

import base64
import os
import struct
import time

import pytest

from lab.harness import Harness
from lab.netns import unique_ifname
from lab.ping import ping_rtts
from lab.topology import wireguard_go_peer_site
from shardwg.proto import crypto, noise, tai64n
from shardwg.proto.constants import IDENTIFIER, DropReason, MessageType
from shardwg.proto.cookie import CookieGenerator
from shardwg.proto.device import Device
from shardwg.proto.ownership import owner_of

# Low-order points of Curve25519 (0, 1, an order-8 point, p - 1, p + 1); DH with each is 0.
LOW_ORDER = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ec" + "ff" * 30 + "7f"),
    bytes.fromhex("ee" + "ff" * 30 + "7f"),
]
PRIV = crypto.generate_private_key(os.urandom(32))
ADDR = ("192.0.2.9", 51820)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.mark.parametrize("key", LOW_ORDER, ids=lambda k: k[:4].hex())
def test_low_order_peer_is_accepted_and_never_sends_an_initiation(key: bytes) -> None:
    dev = Device(PRIV, os.urandom)
    peer = dev.add_peer(key, allowed_ips=["10.0.0.2/32"], endpoint=ADDR, persistent_keepalive=5)
    good = dev.add_peer(crypto.public_key(crypto.generate_private_key(os.urandom(32))),
                        endpoint=ADDR)  # fmt: skip
    now, wall = time.monotonic(), time.time()
    assert peer.send_initiation(now, wall) is False
    peer.send_keepalive(now, wall)
    for t in range(0, 200, 5):  # timers (keepalive, retries, give-up) run for 200 s
        dev.tick(now + t, wall + t)
    assert [p for p, _ in dev.outbox if p is peer] == []
    assert good.send_initiation(now, wall) is True  # the other peer is untouched
    dev.set_preshared_key(peer, os.urandom(32))  # a live update rebuilds its constants
    assert peer.send_initiation(now + 300, wall + 300) is False


def _initiation_from(claimed_static: bytes, responder_public: bytes) -> bytes:
    """An initiation an attacker forges for a low-order key: DH(anything, it) is 0."""
    st = noise.ik_initial(IDENTIFIER, responder_public)
    ts = tai64n.timestamp(time.time())
    e_pub, enc_static, enc_ts = noise.write_initiation(
        st, os.urandom(32), claimed_static, responder_public, bytes(32), ts
    )
    msg = bytearray(struct.pack("<I", MessageType.INITIATION) + struct.pack("<I", 7) + e_pub
                    + enc_static + enc_ts + bytes(32))  # fmt: skip
    CookieGenerator(crypto.hash_(noise.LABEL_MAC1, responder_public), bytes(32)).add_macs(
        msg, time.monotonic()
    )
    return bytes(msg)


@pytest.mark.parametrize("key", LOW_ORDER[:2], ids=lambda k: k[:4].hex())
def test_forged_initiation_for_a_low_order_peer_is_refused(key: bytes) -> None:
    dev = Device(PRIV, os.urandom)
    dev.add_peer(key, allowed_ips=["10.0.0.2/32"])
    msg = _initiation_from(key, crypto.public_key(PRIV))
    now, wall = time.monotonic(), time.time()
    result = dev.receive_handshake(msg, ADDR, b"\x00" * 6, now, wall)
    assert result == DropReason.UNKNOWN_PEER
    assert dev.outbox == [] and not dev.sessions


# ---------------------------------------------------------------------------- real gateway

@pytest.mark.interop
@pytest.mark.netns
def test_gateway_with_low_order_peers_from_file_and_wg_set(netns_factory: Harness) -> None:
    """2 workers, low-order peers owned by each in the file; one more added live with an
    endpoint and keepalive; a real wireguard-go peer's pings are all answered throughout."""
    gw_ns, p_ns, gw_keys, p_keys, wg = wireguard_go_peer_site(netns_factory)
    in_file = [k for k in LOW_ORDER if owner_of(k, 2) == 0][:1] + [
        k for k in LOW_ORDER if owner_of(k, 2) == 1
    ][:1]
    assert {owner_of(k, 2) for k in in_file} == {0, 1}
    peers = [{"public_key": p_keys[1], "allowed_ips": ["10.0.0.10/32"]}] + [
        {"public_key": b64(k), "allowed_ips": [f"10.0.0.{200 + i}/32"],
         "endpoint": "10.99.0.2:9", "persistent_keepalive": 1}
        for i, k in enumerate(in_file)
    ]  # fmt: skip
    gw = netns_factory.gateway(gw_ns, unique_ifname("swg"), gw_keys[0], 51820, peers,
                               ["10.0.0.1/24"], workers=2)  # fmt: skip
    assert len(ping_rtts(p_ns, "10.0.0.1", 10, 15)) == 10, gw.log_text()
    live = [k for k in LOW_ORDER if k not in in_file]
    for i, k in enumerate(live):
        gw_ns.run(["wg", "set", gw.ifname, "peer", b64(k), "allowed-ips", f"10.0.0.{210 + i}/32",
                   "endpoint", "10.99.0.2:9", "persistent-keepalive", "1"])  # fmt: skip
    dump = gw_ns.run(["wg", "show", gw.ifname, "dump"]).stdout
    for k in in_file + live:
        assert b64(k) in dump
    gw_ns.python("import socket\nfor i in range(20):\n"
                 " socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
                 "(f'10.0.0.{200 + i}', 9))")  # fmt: skip - traffic towards every bad peer
    assert len(ping_rtts(p_ns, "10.0.0.1", 20, 20)) == 20, gw.log_text()
    assert wg.latest_handshake(gw_keys[1]) > 0
    log = gw.log_text()
    assert gw.proc.poll() is None, log
    assert "exited with" not in log and "crashed" not in log, log
    assert "low-order public key" in log, log
