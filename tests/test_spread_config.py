"""A peer's own `Spread = on|off|auto|packets` (shardwg's key in a [Peer]): parsed with its line in
every error, written back by SaveConfig, kept across UAPI changes (which cannot say it), and
fed to the placement table at start and on every reload, where real workers act on it
without a restart."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from msgspec.structs import replace

from lab.enginetest import MemoryGateway, config, new_key, peer, start_all, wait_for
from lab.tuntest import ipv4_udp
from shardwg.config.diff import config_from_set, diff_configs
from shardwg.config.keys import encode_key
from shardwg.config.model import ConfigError, format_config, parse_config, spread_settings
from shardwg.engine import control
from shardwg.engine.placement import TrafficSpread
from shardwg.engine.placer import Placer
from shardwg.shm.layout import Layout
from shardwg.shm.placement import Mode, SpreadWhy, decode_table
from shardwg.uapi import PeerChange, SetRequest

GW_IP, P_IP = "10.7.0.1", "10.7.0.2"
PRIV, A, B = new_key()[0], new_key()[1], new_key()[1]


def _text(*peer_lines: str) -> str:
    out = ["[Interface]", f"PrivateKey = {encode_key(PRIV)}"]
    for i, extra in enumerate(peer_lines):
        out += ["", "[Peer]", f"PublicKey = {encode_key((A, B)[i])}", f"AllowedIPs = 10.0.{i}.0/24"]
        if extra:
            out.append(extra)
    return "\n".join(out) + "\n"


def test_spread_values_and_round_trip() -> None:
    cfg = parse_config(_text("Spread = on", "spread=OFF"))
    assert [p.spread for p in cfg.peers] == [True, False]
    assert spread_settings(cfg) == {A: True, B: False}
    assert parse_config(_text("Spread = auto", "")).peers[0].spread is None
    assert spread_settings(parse_config(_text("Spread = auto", ""))) == {}
    text = format_config(cfg)  # SaveConfig keeps it
    assert "Spread = on" in text and "Spread = off" in text
    assert parse_config(text) == cfg
    assert "Spread" not in format_config(parse_config(_text("Spread = auto", "")))


def test_spread_packets_is_on_with_packet_turns_and_round_trips() -> None:
    cfg = parse_config(_text("Spread = Packets", "Spread = on"))
    assert [(p.spread, p.spread_packets) for p in cfg.peers] == [(True, True), (True, False)]
    assert spread_settings(cfg) == {A: True, B: True}  # placement: spread by override
    text = format_config(cfg)
    assert "Spread = packets" in text and "Spread = on" in text
    assert parse_config(text) == cfg
    later = parse_config(_text("Spread = packets\nSpread = off", ""))  # the last one counts
    assert (later.peers[0].spread, later.peers[0].spread_packets) == (False, False)


def test_tun_routes_send_each_peers_prefixes_where_its_packets_are_sealed() -> None:
    """The TUN steering program's routes: an unspread peer's prefixes to its owner's queue,
    a spread peer's to the flow turns, a `Spread = packets` peer's to the packet turns
    (only when the table spreads it for that reason)."""
    from shardwg.engine.placement import tun_routes
    from shardwg.io.tun_steering import FLOW_TURNS, PACKET_TURNS

    c = bytes(range(32))
    allowed = {A: ["0.0.0.0/0", "fd00::/16"], B: ["10.1.0.0/16", "fd00:1::/64"], c: ["10.2.0.0/16"]}
    owners = {A: 0, B: 1, c: 1}
    got = tun_routes(allowed, owners, {A: SpreadWhy.PACKETS, c: SpreadWhy.OVERRIDE})
    assert got == {"0.0.0.0/0": PACKET_TURNS, "fd00::/16": PACKET_TURNS, "10.1.0.0/16": 1,
                   "fd00:1::/64": 1, "10.2.0.0/16": FLOW_TURNS}  # fmt: skip
    got = tun_routes(allowed, owners, {A: SpreadWhy.POLICY})  # spread, but not for packets
    assert got["0.0.0.0/0"] == FLOW_TURNS and got["10.2.0.0/16"] == 1
    none = tun_routes(allowed, owners, {})  # nothing spread: every prefix to its owner
    assert none == {"0.0.0.0/0": 0, "fd00::/16": 0, "10.1.0.0/16": 1, "fd00:1::/64": 1,
                    "10.2.0.0/16": 1}  # fmt: skip
    assert tun_routes(allowed, {}, {B: SpreadWhy.OVERRIDE})["0.0.0.0/0"] == FLOW_TURNS  # no owner


@pytest.mark.parametrize("value", ["yes", "1", "", "on off", "true"])
def test_a_bad_spread_names_its_line(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_text("", f"Spread = {value}"), "wg9.conf")
    assert e.value.line == 11, str(e.value)
    assert str(e.value).startswith("wg9.conf:11: Spread:")
    assert "on, off, auto or packets" in str(e.value)


def test_spread_is_a_peer_key_only() -> None:
    text = _text("").replace("[Interface]\n", "[Interface]\nSpread = on\n")
    with pytest.raises(ConfigError, match=r":2: unknown key 'Spread' in \[Interface\]"):
        parse_config(text)


def test_a_spread_change_is_not_a_peer_update() -> None:
    """Only placement cares: no worker message, no route change for it."""
    old = parse_config(_text("", "Spread = on"))
    new = parse_config(_text("Spread = off", ""))
    d = diff_configs(old, new)
    assert not d.empty() and not d.updated and not d.added and not d.removed
    assert [p.public_key for p in d.spread_changed] == [A, B]
    both = replace(new, peers=[replace(new.peers[0], persistent_keepalive=25), new.peers[1]])
    d = diff_configs(old, both)
    assert [p.public_key for p in d.spread_changed] == [A, B]
    assert [n.public_key for _o, n in d.updated] == [A]
    assert diff_configs(old, old).empty()
    packets = parse_config(_text("", "Spread = packets"))
    d = diff_configs(old, packets)  # on -> packets: still the placement's business only
    assert [p.public_key for p in d.spread_changed] == [B] and not d.updated


def test_uapi_changes_keep_the_setting() -> None:
    """`wg set` / `wg syncconf` cannot say Spread; a peer they rewrite keeps it."""
    cfg = parse_config(_text("Spread = packets", "Spread = off"))
    own = new_key()[1]
    req = SetRequest(replace_peers=True, peers=[
        PeerChange(public_key=A, allowed_ips_add=["10.0.0.0/24"], replace_allowed_ips=True),
        PeerChange(public_key=B, persistent_keepalive=5),
    ])  # fmt: skip
    out = config_from_set(cfg, req, own)
    assert [(p.spread, p.spread_packets) for p in out.peers] == [(True, True), (False, False)]
    req = SetRequest(peers=[PeerChange(public_key=A, persistent_keepalive=9)])
    assert config_from_set(cfg, req, own).peers[0].spread is True
    gone = config_from_set(cfg, SetRequest(replace_peers=True, peers=[]), own)
    assert gone.peers == []


def _placer(policy: str, workers: int = 2) -> tuple[Placer, list[int]]:
    layout = Layout.sized(workers, 8)
    buf = bytearray(layout.total_size)
    layout.write_to(buf)
    nudges: list[int] = []
    placer = Placer(Mode.COUNT, workers, layout, buf, lambda: nudges.append(1))
    placer.spread_policy = policy
    return placer, nudges


def _table(placer: Placer) -> tuple[set[int], dict[int, SpreadWhy]]:
    t = decode_table(placer.layout.placement_slot(placer.buf).read())
    assert t is not None
    return t.spread, t.spread_why


def test_overrides_reach_the_table_with_their_reason() -> None:
    placer, nudges = _placer("auto")
    placer.set_overrides({A: True}, write=False)
    placer.start([A, B], {A: 0, B: 1})
    assert _table(placer) == ({0}, {0: SpreadWhy.OVERRIDE}) and not nudges
    assert not placer.set_overrides({A: True})  # unchanged: no write, no nudge
    assert placer.set_overrides({A: False, B: True})
    assert _table(placer) == ({1}, {1: SpreadWhy.OVERRIDE}) and nudges == [1]
    assert placer.set_overrides({A: False, B: True}, packets={B})  # on -> packets: a change
    assert _table(placer) == ({1}, {1: SpreadWhy.PACKETS}) and nudges == [1, 1]
    told: list[dict] = []
    placer.on_spread = told.append
    placer.announce()
    assert told == [{B: SpreadWhy.PACKETS}]
    placer.on_spread = None
    assert placer.set_overrides({})  # auto again: 2 peers on 2 workers is not fewer
    assert _table(placer) == (set(), {})
    one, _ = _placer("auto")
    one.set_overrides({A: False}, write=False)
    one.start([A], {A: 0})
    assert _table(one) == (set(), {})  # off wins over auto
    one.set_overrides({})
    assert _table(one) == (set(), {})  # auto decides by measured load, not at start
    one.traffic = TrafficSpread(frozenset({A}))  # its owner was busy, a core idle
    one.set_overrides({A: False})
    one.set_overrides({})
    assert _table(one) == ({0}, {0: SpreadWhy.FEWER})  # auto: fewer peers than workers
    off, _ = _placer("off")
    off.set_overrides({A: True}, write=False)
    off.start([A], {A: 0})
    assert _table(off) == (set(), {})  # --spread off is off for every peer
    assert off.set_overrides({A: True}, packets={A})
    assert _table(off) == (set(), {})  # packets too


def test_reload_flips_one_peer_on_real_workers(gateways: list[MemoryGateway]) -> None:
    """Gateway G, 2 real workers, peers P (worker 0) and D (worker 1), --spread auto (so
    nothing is spread by policy). A packet for P read by worker 1 is handed to the owner;
    after a reload with `Spread = on` for P worker 1 seals it itself; after a reload back
    to auto it hands over again. No restart, the session stays."""
    (g_priv, g_pub), (p_priv, p_pub), d_pub = new_key(), new_key(), new_key()[1]
    peers = [peer(p_pub, [f"{P_IP}/32"]), peer(d_pub, ["10.7.5.0/24"])]
    g = MemoryGateway(config(g_priv, peers), workers=2)
    gateways.append(g)
    placer = Placer(Mode.COUNT, 2, g.layout, g.region.buf,
                    lambda: g.broadcast(control.encode(control.Placement())))  # fmt: skip
    placer.spread_policy = "auto"
    placer.start([p_pub, d_pub], g.slot_of)
    g.live.placer = placer
    assert placer.owner(p_pub) == 0
    p = MemoryGateway(config(p_priv, [peer(g_pub, [f"{GW_IP}/32"], g.addr)]))
    gateways.append(p)
    start_all(g, p)
    p.tun[0].write(ipv4_udp(P_IP, GW_IP, 5000, 4000, b"hello"))  # P's handshake, then data
    assert g.read_tun(timeout=5) is not None

    written = [0]

    def down_via_worker_1() -> tuple[int, int]:
        """(worker 1's handoffs out, datagrams it sent) after one packet it read for P: each
        such packet is one or the other (its counters are flushed a little later)."""
        pkt = ipv4_udp(GW_IP, P_IP, 4000, 5000, os.urandom(40))
        g.tun[1].write(pkt)
        written[0] += 1
        assert p.read_tun(timeout=5) == (0, pkt)
        assert wait_for(lambda: sum(counts()) == written[0]), (counts(), written)
        return counts()

    def raw() -> tuple[int, int]:
        s = g.stats()[1]
        return s.handoffs_out, s.tx_packets

    time.sleep(0.5)  # P's initiation may have reached worker 1 and been handed over: not ours
    base = raw()

    def counts() -> tuple[int, int]:
        now = raw()
        return now[0] - base[0], now[1] - base[1]

    assert down_via_worker_1() == (1, 0)
    on = config(g_priv, [replace(peers[0], spread=True), peers[1]])
    assert g.live.apply(on, "reload") == 0
    assert _table(placer)[0] == {0}
    assert wait_for(lambda: down_via_worker_1()[1] >= 1, timeout=10)  # worker 1 seals for P
    handed, sent = down_via_worker_1()
    assert down_via_worker_1() == (handed, sent + 1)  # sealed there, every packet
    assert g.live.apply(config(g_priv, peers), "reload") == 0
    assert _table(placer)[0] == set()
    assert wait_for(lambda: down_via_worker_1()[0] > handed, timeout=10)
    again = down_via_worker_1()
    assert down_via_worker_1() == (again[0] + 1, again[1])  # handed over, every packet


def test_the_placer_says_when_any_peer_is_spread() -> None:
    """What switches the TUN's flow-hash steering on and off (io/tun_steering.py)."""
    placer, _ = _placer("auto")
    said: list[bool] = []
    placer.on_spread = lambda now: said.append(bool(now))
    placer.start([A, B], {A: 0, B: 1})
    placer.set_overrides({A: True})
    placer.set_overrides({A: True, B: True})
    placer.set_overrides({B: False})
    assert said == [False, True, True, False]


def test_the_container_environment_says_spread_too() -> None:
    from shardwg.container.environment import EntrypointError, config_from_env

    env = {"WG_PRIVATE_KEY": encode_key(PRIV), "WG_PEER_1_PUBLIC_KEY": encode_key(A),
           "WG_PEER_1_ALLOWED_IPS": "10.0.0.0/24", "WG_PEER_1_SPREAD": "off"}  # fmt: skip
    text, _warnings = config_from_env(env)
    assert parse_config(text).peers[0].spread is False
    text, _warnings = config_from_env({**env, "WG_PEER_1_SPREAD": "packets"})
    assert parse_config(text).peers[0].spread_packets is True
    with pytest.raises(EntrypointError, match="WG_PEER_1_SPREAD: 'yes' is not on, off, auto or"):
        config_from_env({**env, "WG_PEER_1_SPREAD": "yes"})


def test_wg_showconf_and_syncconf_leave_spread_alone(
    gateways: list[MemoryGateway], tmp_path: Path
) -> None:
    """The real `wg` against the UAPI of a gateway whose file says Spread: showconf prints
    a config wg itself accepts (no Spread in it), syncconf and setconf (which replaces every
    peer) of that output keep each peer's Spread, and wg refuses a file that has it (which
    is why only shardwg reads it)."""
    import shutil
    import subprocess
    import threading

    from shardwg.uapi.server import SOCKET_DIR, UapiServer

    if os.geteuid() != 0 or shutil.which("wg") is None:
        pytest.skip("needs root (for /var/run/wireguard) and the wg tool")
    cfg = parse_config(_text("Spread = on", "Spread = off"))
    g = MemoryGateway(cfg, workers=1)
    gateways.append(g)

    def wg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["wg", *args], capture_output=True, text=True, timeout=10)

    with UapiServer(g.ifname, g.live, SOCKET_DIR) as server:
        stop = threading.Event()
        thread = threading.Thread(
            target=lambda: [server.poll(0.02) for _ in iter(stop.is_set, True)]
        )
        thread.start()
        try:
            shown = wg("showconf", g.ifname)
            assert shown.returncode == 0 and "PublicKey" in shown.stdout, shown.stderr
            assert "spread" not in shown.stdout.lower()
            (conf := tmp_path / "shown.conf").write_text(shown.stdout)
            synced = wg("syncconf", g.ifname, str(conf))
            assert synced.returncode == 0, synced.stderr
            assert [p.spread for p in g.live.config.peers] == [True, False]
            replaced = wg("setconf", g.ifname, str(conf))  # replace_peers: peers made anew
            assert replaced.returncode == 0, replaced.stderr
            assert [p.spread for p in g.live.config.peers] == [True, False]
            (with_spread := tmp_path / "file.conf").write_text(format_config(cfg))
            refused = wg("setconf", g.ifname, str(with_spread))
            assert refused.returncode != 0 and "Spread" in refused.stderr
        finally:
            stop.set()
            thread.join(5)
    assert [p.spread for p in g.live.config.peers] == [True, False]
