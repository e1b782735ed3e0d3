"""The seed corpus: genuine messages minted by the live worlds, edge cases, valid texts."""


from __future__ import annotations

import base64
from pathlib import Path

from fuzz.targets import open_batch
from fuzz.targets.handshakes import datagram_world
from fuzz.targets.seal import seeds as seal_seeds
from fuzz.targets.world import ADDR_A, MAX_UDP_PAYLOAD, World, reset_worlds, set_load
from shardwg.proto import crypto
from shardwg.proto.constants import (
    REPLAY_WINDOW,
)

CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"


def _corpus_entries() -> dict[str, dict[str, bytes]]:
    """Seed inputs per target: genuine messages for the live worlds, edges, valid texts."""
    w = datagram_world()
    # A world under load supplies a genuine cookie reply; another seed, foreign keys.
    fw = World(seed=5)
    set_load(fw.b, True)
    fw.peer_b.send_initiation(fw.now, fw.wall)
    foreign_init = fw.take_outbox(fw.a)[0]
    foreign_cookie = fw.deliver(fw.b, foreign_init, ADDR_A)
    assert isinstance(foreign_cookie, bytes)
    dg: dict[str, bytes] = dict(w.seeds)
    dg["initiation_foreign"] = foreign_init
    dg["cookie_reply_foreign"] = foreign_cookie
    for t, n in ((1, 148), (2, 92), (3, 64), (4, 32)):
        dg[f"type{t}_zero_{n}"] = bytes([t, 0, 0, 0]) + bytes(n - 4)
        dg[f"type{t}_short_{n - 1}"] = bytes([t, 0, 0, 0]) + bytes(n - 5)
        dg[f"type{t}_long_{n + 1}"] = bytes([t, 0, 0, 0]) + bytes(n - 3)
    dg["empty"] = b""
    dg["three_bytes"] = b"\x04\x00\x00"
    dg["reserved_nonzero"] = b"\x04\x01\x00\x00" + bytes(28)
    dg["type5"] = b"\x05\x00\x00\x00" + bytes(60)
    dg["ones_1500"] = b"\xff" * 1500
    dg["transport_max"] = b"\x04\x00\x00\x00" + bytes(MAX_UDP_PAYLOAD - 4)
    hs: dict[str, bytes] = {}
    for sel, name in ((0, "initiation"), (1, "response"), (2, "cookie_reply")):
        hs[f"{name}_unchanged"] = bytes([sel])
        hs[f"{name}_flip_first_field"] = bytes([sel, 0, 4, 0, 1])
        hs[f"{name}_truncated"] = bytes([sel, 2, 60, 0, 0])
    hs["initiation_mac2_flip"] = bytes([0, 0, 140, 0, 0x80])
    hs["initiation_sender_fixmac1"] = bytes([8, 0, 5, 0, 0x11])
    hs["initiation_ephemeral_zero_fixmac1"] = bytes([8, 5, 8, 0, 0, 0, 8, 0, 0]) + bytes(
        [5, 16, 0, 0, 5, 24, 0, 0, 5, 32, 0, 0]
    )
    hs["initiation_load_mac2_flip"] = bytes([4, 0, 140, 0, 0x80])
    hs["initiation_load_unchanged"] = bytes([4])
    hs["response_load_unchanged"] = bytes([5])
    hs["response_receiver_fixmac1"] = bytes([9, 0, 9, 0, 0x01])
    hs["response_sender_fixmac1"] = bytes([9, 0, 5, 0, 0x01])
    hs["cookie_receiver_flip"] = bytes([2, 0, 5, 0, 0x01])
    hs["cookie_nonce_flip"] = bytes([2, 0, 10, 0, 0x01])
    tr: dict[str, bytes] = {
        "keepalive_unchanged": b"\x00\x00\x00\x00",
        "ipv4_unchanged": b"\x01\x10\x00\x00",
        "ipv6_unchanged_b_to_a": b"\x06\x10\x00\x00",
        "ipv4_window_edge": b"\x09\x08" + (REPLAY_WINDOW - 1).to_bytes(2, "little"),
        "ipv4_past_window": b"\x09\x08" + REPLAY_WINDOW.to_bytes(2, "little"),
        "keepalive_counter_flip": b"\x00\x00\x00\x00" + bytes([0, 8, 0, 1]),
        "ipv4_receiver_flip": b"\x01\x10\x00\x00" + bytes([0, 4, 0, 1]),
        "ipv4_truncated": b"\x01\x10\x00\x00" + bytes([2, 40, 0, 0]),
        "ipv4_extended": b"\x01\x10\x00\x00" + bytes([3, 255, 255, 0]),
        "ipv6_tag_flip": b"\x02\x10\x00\x00" + bytes([0, 255, 255, 0x80]),
        # campaign finding (harness): a 64-byte datagram retyped 4 -> 3 is a cookie reply
        "ipv4_retyped_as_cookie_reply": b"\x01\x00\x00\x00" + bytes([0, 0, 0, 7]),
    }
    pub = crypto.public_key(w.key_a)
    key_b64 = base64.b64encode(w.key_b).decode()
    pub_b64 = base64.b64encode(pub).decode()
    cf: dict[str, bytes] = {
        "minimal": f"[Interface]\nPrivateKey = {key_b64}\n".encode(),
        "full": (
            f"# gateway\n[Interface]\nPrivateKey = {key_b64}\nListenPort = 51820\n"
            "Address = 10.0.0.1/24, fd00::1/64\nDNS = 10.0.0.53, example.com\nMTU = 1420\n"
            "FwMark = 0x1234\nTable = off\nSaveConfig = true\nPostUp = echo up\n\n"
            f"[Peer]\nPublicKey = {pub_b64}\nPresharedKey = {key_b64}\n"
            "AllowedIPs = 10.0.0.2/32, fd00::2/128\nAllowedIPs = 0.0.0.0/0\n"
            "Endpoint = [2001:db8::1]:51820\nPersistentKeepalive = 25\n"
        ).encode(),
        "hostname_endpoint": (
            f"\ufeff[interface]\r\nprivatekey={key_b64}\r\n[peer]\r\npublickey={pub_b64}\r\n"
            "endpoint = vpn.example.com:51820\r\nallowedips =\r\n"
        ).encode(),
        "bad_key": b"[Interface]\nPrivateKey = AAAA\n",
        "duplicate_interface": f"[Interface]\nPrivateKey = {key_b64}\n[Interface]\n".encode(),
        "control_char": b"[Interface]\x01\n",
        "empty": b"",
    }
    hex_a, hex_b = w.key_b.hex(), pub.hex()
    ua: dict[str, bytes] = {
        "get": b"get=1\n\n",
        "get_get": b"get=1\n\nget=1\n\n",
        "set_device": f"set=1\nprivate_key={hex_a}\nlisten_port=51820\nfwmark=0\n\n".encode(),
        "set_peer": (
            f"set=1\nreplace_peers=true\npublic_key={hex_b}\npreshared_key={hex_a}\n"
            "endpoint=[fe80::1%eth0]:51820\npersistent_keepalive_interval=25\n"
            "replace_allowed_ips=true\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::/64\n"
            "protocol_version=1\n\n"
        ).encode(),
        "set_remove": f"set=1\npublic_key={hex_b}\nremove=true\n\n".encode(),
        "set_update_only_crlf": f"set=1\r\npublic_key={hex_b}\r\nupdate_only=true\r\n\r\n".encode(),
        "set_bad_value": b"set=1\nlisten_port=99999\n\nget=1\n\n",
        "bad_op": b"put=1\n\n",
        "get_no_blank": b"get=1\nx",
        "long_line": b"set=1\n" + b"a" * 5000 + b"\n\n",
    }
    co: dict[str, bytes] = {
        "empty": b"",
        "reply_size": bytes(range(64)),
        "response_size": bytes(range(92)),
        "initiation_size": bytes(range(148)),
        "genuine_reply": foreign_cookie,
        "genuine_initiation": foreign_init,
        "ones_200": b"\xff" * 200,
    }
    return {
        "datagram": dg,
        "mutated_handshake": hs,
        "transport": tr,
        "config": cf,
        "uapi": ua,
        "cookie": co,
        "seal": seal_seeds(),
        "open_batch": open_batch.corpus_entries(),
    }


def make_corpus(directory: Path = CORPUS_DIR) -> dict[str, int]:
    """(Re)write the seed corpus; returns the number of files per target."""
    counts: dict[str, int] = {}
    for target, entries in _corpus_entries().items():
        d = directory / target
        d.mkdir(parents=True, exist_ok=True)
        for name, blob in entries.items():
            (d / name).write_bytes(blob)
        counts[target] = len(entries)
    reset_worlds()
    return counts


def load_corpus(target: str, directory: Path = CORPUS_DIR) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every seed of `target`, sorted by name."""
    d = directory / target
    if not d.is_dir():
        return []
    return [(p.name, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()]
