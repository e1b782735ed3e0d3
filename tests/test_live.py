"""Live configuration against real workers, without root: peers added, updated, removed.

The real `LiveConfig` diffs and broadcasts control messages to real forked workers
(lab/enginetest); traffic through in-memory TUN queues and loopback sockets shows each
change took effect in the owner (protocol state) and in the other worker (routing of a
remote peer), and that the sessions of untouched peers survive.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from msgspec.structs import replace

from lab.enginetest import MemoryGateway, config, key_owned_by, new_key, peer, start_all, wait_for
from lab.tuntest import ipv4_udp
from shardwg.config.model import Config, format_config, load_config
from shardwg.engine.live import SLOT_REUSE_DELAY, LiveConfig
from shardwg.engine.supervisor import Supervisor
from shardwg.shm.secrets import decode_keys, encode_keys
from shardwg.uapi import PeerChange, SetRequest

GW_IP, P_IP, Q_IP, Q_NET_HOST = "10.7.0.1", "10.7.0.2", "10.7.0.3", "10.7.9.5"
STALE_INDEX = 0x123400  # a session index a slot's previous peer (or key) may have left behind


def gateway_and_peer(
    gateways: list[MemoryGateway], g_key: tuple[bytes, bytes], p_key: tuple[bytes, bytes]
) -> tuple[MemoryGateway, MemoryGateway]:
    """Gateway G (2 workers) with peer P at P_IP, and P (1 worker) with G at G's address, both
    running; no packet has crossed yet."""
    (g_priv, g_pub), (p_priv, p_pub) = g_key, p_key
    g = MemoryGateway(config(g_priv, [peer(p_pub, [f"{P_IP}/32"])]), workers=2)
    gateways.append(g)
    p = MemoryGateway(config(p_priv, [peer(g_pub, [f"{GW_IP}/32"], g.addr)]))
    gateways.append(p)
    start_all(g, p)
    return g, p


def exchange(g: MemoryGateway, peer_gw: MemoryGateway, peer_ip: str, queue: int,
             src: str | None = None) -> bool:  # fmt: skip
    """One packet each way between the gateway (host writes on `queue`) and a peer."""
    up = ipv4_udp(src or peer_ip, GW_IP, 5000, 4000, os.urandom(40))
    peer_gw.tun[0].write(up)
    got_up = g.read_tun(timeout=5)
    down = ipv4_udp(GW_IP, src or peer_ip, 4000, 5000, os.urandom(40))
    g.tun[queue].write(down)
    got_down = peer_gw.read_tun(timeout=5)
    return got_up is not None and got_up[1] == up and got_down == (0, down)


def current_index(g: MemoryGateway, key: bytes) -> int:
    """The gateway's receiver index of the peer's current session (its identity)."""
    rec = g.session(key)
    assert rec.current is not None
    return rec.current.local_index


def test_live_peer_add_update_remove(gateways: list[MemoryGateway]) -> None:
    g_priv, g_pub = new_key()
    p_priv, p_pub = key_owned_by(0, 2)
    q_priv, q_pub = key_owned_by(1, 2)  # each worker owns one peer: every change crosses both
    g, p = gateway_and_peer(gateways, (g_priv, g_pub), (p_priv, p_pub))
    assert exchange(g, p, P_IP, queue=0)

    # add Q (SIGHUP / syncconf path: a whole new Config)
    g.tun[0].write(ipv4_udp(GW_IP, Q_IP, 4000, 5000, b"nobody yet"))
    assert wait_for(lambda: g.total().drops["no_route"] == 1)
    cfg = g.live.config
    added = config(g_priv, [*cfg.peers, peer(q_pub, [f"{Q_IP}/32"])])
    assert g.live.apply(added, "test") == 0
    assert g.slot_of[q_pub] == 1 and g.live.config is added
    q = MemoryGateway(config(q_priv, [peer(g_pub, [f"{GW_IP}/32"], g.addr)]))
    gateways.append(q)
    q.start()
    q.wait_ready()
    assert exchange(g, q, Q_IP, queue=1)  # the owner learned Q
    assert exchange(g, q, Q_IP, queue=0)  # the other worker routes Q's prefix to the owner
    assert wait_for(lambda: [s.peers_owned for s in g.stats()] == [1, 1])
    view = {pv.public_key: pv for pv in g.live.uapi_get().peers}
    assert set(view) == {p_pub, q_pub}
    assert wait_for(lambda: (r := g.record(q_pub)) is not None and r.last_handshake_wall > 0)
    view = {pv.public_key: pv for pv in g.live.uapi_get().peers}
    assert view[q_pub].endpoint == f"127.0.0.1:{q.group.port}"
    assert view[q_pub].last_handshake_sec > 0

    # update Q's allowed IPs (`wg set` path); its session survives
    q.tun[0].write(ipv4_udp(Q_NET_HOST, GW_IP, 5000, 4000, b"not yet allowed"))
    assert wait_for(lambda: g.total().drops["source_not_allowed"] == 1)
    assert g.read_tun(timeout=0.1) is None
    change = PeerChange(public_key=q_pub, update_only=True, allowed_ips_add=["10.7.9.0/24"])
    assert g.live.uapi_set(SetRequest(peers=[change])) == 0
    assert [pc.allowed_ips for pc in g.live.config.peers if pc.public_key == q_pub] == [
        [f"{Q_IP}/32", "10.7.9.0/24"]
    ]
    assert wait_for(lambda: g.total().handshakes_completed == 2)  # P's and Q's
    session = current_index(g, q_pub)
    assert exchange(g, q, Q_IP, queue=0, src=Q_NET_HOST)
    assert exchange(g, q, Q_IP, queue=1, src=Q_NET_HOST)
    time.sleep(0.2)  # a few worker turns: a new handshake would be in the counters by now
    assert g.total().handshakes_completed == 2 and current_index(g, q_pub) == session

    # remove Q; P is untouched
    slot = g.slot_of[q_pub]
    assert g.live.uapi_set(SetRequest(peers=[PeerChange(public_key=q_pub, remove=True)])) == 0
    assert q_pub not in g.slot_of
    routed = g.total().drops["no_route"]
    g.tun[0].write(ipv4_udp(GW_IP, Q_IP, 4000, 5000, b"gone"))
    g.tun[1].write(ipv4_udp(GW_IP, Q_NET_HOST, 4000, 5000, b"gone"))
    assert wait_for(lambda: g.total().drops["no_route"] == routed + 2)
    unknown = g.total().drops["unknown_index"]
    q.tun[0].write(ipv4_udp(Q_IP, GW_IP, 5000, 4000, b"still sending"))
    assert wait_for(lambda: g.total().drops["unknown_index"] == unknown + 1)
    assert g.read_tun(timeout=0.1) is None
    p_session = current_index(g, p_pub)
    assert exchange(g, p, P_IP, queue=1)
    time.sleep(0.2)
    assert g.total().handshakes_completed == 2 and current_index(g, p_pub) == p_session

    # the freed slot is wiped once its old owner can no longer write it
    g.live.tick(time.monotonic())
    assert g.record_at(slot) is not None
    g.live.tick(time.monotonic() + SLOT_REUSE_DELAY + 1)
    assert g.record_at(slot) is None


def test_new_private_key_restarts_workers_without_sessions(
    gateways: list[MemoryGateway],
) -> None:
    p_priv, p_pub = new_key()
    g, p = gateway_and_peer(gateways, new_key(), (p_priv, p_pub))
    assert exchange(g, p, P_IP, queue=0)
    g.session(p_pub)
    pids = list(g.pids)
    stale = g.layout.spread_area(g.region.buf).peer(g.slot_of[p_pub])
    stale.publish_base(STALE_INDEX, 4096)  # as if the old key's session had been spread

    new_priv, _ = new_key()
    assert g.live.uapi_set(SetRequest(private_key=new_priv)) == 0
    g.wait_ready()
    assert set(g.pids).isdisjoint(pids)
    assert [s.restarts for s in g.stats()] == [1, 1]
    rec = g.record(p_pub)
    assert rec is not None and rec.current is None, "a session of the old key survived"
    assert stale.base(STALE_INDEX) == -1, "the old key's spread ledger survived"


def test_a_freed_slot_is_wiped_whole(gateways: list[MemoryGateway]) -> None:
    """Record, keys and spread ledger cells: the next peer given the slot finds nothing of
    its predecessor's (a stale ledger tag equal to a new session's index would hand that
    session the old counter base)."""
    g_priv, _ = new_key()
    _, p_pub = new_key()
    g = MemoryGateway(config(g_priv, [peer(p_pub, [f"{P_IP}/32"])]), workers=2)
    gateways.append(g)
    slot = g.slot_of[p_pub]
    ledger = g.layout.spread_area(g.region.buf).peer(slot)
    ledger.publish_base(STALE_INDEX, 4096)
    ledger.publish(1, STALE_INDEX, 8192)
    g.secrets.key_slot(slot).write(encode_keys([(STALE_INDEX, bytes(32), bytes([1]) * 32)]))
    assert g.live.apply(config(g_priv, []), "test") == 0
    g.live.tick(time.monotonic() + SLOT_REUSE_DELAY + 1)
    assert decode_keys(g.secrets.key_slot(slot).read()) == {}
    assert ledger.base(STALE_INDEX) == -1 and ledger.front(STALE_INDEX) == 0


def test_sighup_reload_and_save_config(gateways: list[MemoryGateway], tmp_path: Path) -> None:
    """The file paths of live configuration: a reload applies the file's difference to the
    running workers (P gains a prefix, its session stays); SaveConfig writes the running
    configuration back, owner-only."""
    p_priv, p_pub = new_key()
    g, p = gateway_and_peer(gateways, new_key(), (p_priv, p_pub))
    assert exchange(g, p, P_IP, queue=0)
    session = current_index(g, p_pub)

    path = tmp_path / "gw.conf"
    wider = Config(
        replace(g.live.config.interface, save_config=True),
        [peer(p_pub, [f"{P_IP}/32", "10.7.9.0/24"])],
    )
    path.write_text(format_config(wider))
    g.live.config_path = str(path)
    g.live.reload()
    assert g.live.config == wider
    for queue in (0, 1):
        assert exchange(g, p, P_IP, queue=queue, src=Q_NET_HOST)
    assert current_index(g, p_pub) == session

    path.unlink()
    g.live.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config(str(path)) == wider
    path.write_text("[Interface]\nthis is not a config\n")
    g.live.reload()  # refused: logged, the running configuration stays
    assert g.live.config == wider


def test_the_supervisor_reads_the_running_configuration(
    gateways: list[MemoryGateway],
) -> None:
    """After a live change the supervisor's `config` (forked workers boot from it, /metrics
    lists its peers) is the running one, not the one it started with."""
    started = config(new_key()[0], [peer(new_key()[1], [f"{P_IP}/32"])])
    g = MemoryGateway(started)  # for its shared memory; no worker runs
    gateways.append(g)
    sup = Supervisor(started, g.ifname, 1)
    assert sup.config is started
    changed = config(started.interface.private_key, [])
    sup.live = LiveConfig(started, None, ifname=g.ifname, slot_of=dict(g.slot_of), engine=sup,
                          memory=g.live.memory)  # fmt: skip
    assert sup.live.apply(changed, "test") == 0  # removes the peer: nothing running to tell
    assert sup.config is changed and sup.start_config is started
