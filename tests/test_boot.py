"""A worker's boot, in process and without root: its shard, its failures, its hooks.

`build_shard` runs here on the same BootContext the supervisor forks with (an in-memory
TUN queue, loopback sockets, a real /dev/shm region); the loop itself runs in
tests/test_worker.py.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator

import pytest

from lab.enginetest import MemoryGateway, config, key_owned_by, new_key, peer
from shardwg.engine import control
from shardwg.engine.boot import Shard, boot_worker, build_shard
from shardwg.engine.exits import EXIT_BOOT_FAILURE
from shardwg.io.udp import sockaddr_bytes
from shardwg.proto.ownership import owner_of
from shardwg.shm import counters as C
from shardwg.shm.layout import decode_global, encode_global
from shardwg.shm.secrets import CookieSecrets, decode_cookie, encode_cookie


@pytest.fixture
def gw() -> Iterator[MemoryGateway]:
    """A two-worker gateway with two peers per worker; no worker started."""
    keys = [key_owned_by(i % 2, 2)[1] for i in range(4)]
    g = MemoryGateway(
        config(new_key()[0], [peer(k, [f"10.8.0.{10 + i}/32"]) for i, k in enumerate(keys)]),
        workers=2,
    )
    yield g
    g.close()


def shard(g: MemoryGateway, index: int, restarts: int = 0) -> Shard:
    s = build_shard(g.boot_context(index), index, restarts)
    s.greet()  # the first heartbeat flushes the counters
    return s


def test_a_shard_owns_its_peers_and_routes_the_others(gw: MemoryGateway) -> None:
    for index in (0, 1):
        s = shard(gw, index, restarts=3)
        dev = s.worker.device
        mine = {p.public_key for p in gw.live.config.peers if owner_of(p.public_key, 2) == index}
        assert set(dev.peers) == mine and len(mine) == 2
        assert {k: r.owner for k, r in dev.remote.items()} == {
            p.public_key: 1 - index for p in gw.live.config.peers if p.public_key not in mine
        }
        assert s.worker.mesh is not None  # two workers: handoff rings are wired
        st = gw.stats()[index]
        assert (st.peers_owned, st.restarts, st.heartbeat > 0) == (2, 3, True)
        for key in mine:  # tracked: show/UAPI see the peer before any session
            rec = gw.record(key)
            assert rec is not None and rec.owner == index and rec.current is None


def test_a_configuration_that_cannot_work_exits_with_boot_failure(gw: MemoryGateway) -> None:
    bad = config(new_key()[0], [peer(new_key()[1], ["not-a-prefix"])])
    gw.live.config = bad
    handler = signal.getsignal(signal.SIGTERM)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        assert boot_worker(gw.boot_context(0), 0, 0, theirs) == EXIT_BOOT_FAILURE
    finally:
        ours.close()
        theirs.close()
    assert signal.getsignal(signal.SIGTERM) == handler  # failed before taking any signal


def test_global_sync_follows_the_supervisors_block(gw: MemoryGateway) -> None:
    s = shard(gw, 0)
    intake = s.worker.device.intake
    assert s.worker.on_tick is not None
    g = decode_global(gw.layout.global_slot(gw.region.buf).read())
    cookie = decode_cookie(gw.secrets.cookie_slot().read())  # the workers' anonymous mapping
    assert g is not None and cookie is not None
    now = time.monotonic()
    assert intake.checker.current_secret(now)[0] == cookie.current
    assert not intake.under_load(now)
    # The supervisor moves on: a new current secret and its successor, switching at now + 5.
    new, following = bytes(range(32)), bytes(range(1, 33))
    gw.secrets.cookie_slot().write(encode_cookie(CookieSecrets(new, now, following, now + 5)))
    g.under_load_until = now + 10
    gw.layout.global_slot(gw.region.buf).write(encode_global(g))
    s.worker.on_tick(s.worker, now + 1, time.time())
    assert intake.checker.current_secret(now + 1) == (new, now)
    assert intake.checker.current_secret(now + 5) == (following, now + 5)  # switched by itself
    assert intake.under_load(now + 1)


def test_known_endpoints_come_from_every_owners_list(gw: MemoryGateway) -> None:
    """Each owner publishes its peers' recent endpoints (shm/endpoints.py); any worker's
    filter reads them all, most recent handshake first, without decoding peer slots."""
    s0, s1 = shard(gw, 0), shard(gw, 1)
    rows = [(s0, ("192.0.2.1", 1000), 5.0), (s1, ("192.0.2.2", 2000), 9.0)]
    for s, endpoint, when in rows:
        p = next(iter(s.worker.device.peers.values()))
        p.endpoint, p.last_handshake_wall = endpoint, when
        s.worker.recent.touch(p.public_key, p)
        s.worker.admission_tick(time.monotonic())  # the list changed: rewritten
    assert s0.worker.known_endpoints() == [
        sockaddr_bytes(("192.0.2.2", 2000)),
        sockaddr_bytes(("192.0.2.1", 1000)),
    ]


def test_shard_control_applies_live_changes(gw: MemoryGateway) -> None:
    s = shard(gw, 0)
    dev, handle = s.worker.device, s.worker.on_control
    assert handle is not None
    now, wall = time.monotonic(), time.time()

    def send(msg: control.Control) -> bool:
        return handle(control.encode(msg), now, wall)

    assert handle(b"\xc1garbage", now, wall)  # logged and ignored: the worker goes on
    mine, theirs = key_owned_by(0, 2)[1], key_owned_by(1, 2)[1]
    spec = control.PeerSpec(mine, allowed_ips=["10.8.1.0/24"], endpoint=["127.0.0.1", 9])
    assert send(control.AddPeer(spec, slot=9))
    assert mine in dev.peers and dev.peers[mine].endpoint == ("127.0.0.1", 9)
    rec = gw.record_at(9)
    assert rec is not None and rec.public_key == mine  # published to the slot it was given
    assert send(control.AddPeer(control.PeerSpec(theirs, allowed_ips=["10.8.2.0/24"]), slot=10))
    assert dev.remote[theirs].owner == 1 and gw.record_at(10) is None  # its owner publishes
    assert s.worker.counters.v[C.PEERS_OWNED] == 3

    moved = control.PeerSpec(mine, allowed_ips=["10.8.3.0/24"], endpoint=["127.0.0.1", 10],
                             persistent_keepalive=25)  # fmt: skip
    assert send(control.UpdatePeer(moved, endpoint_changed=True))
    p = dev.peers[mine]
    assert (p.endpoint, p.persistent_keepalive) == (("127.0.0.1", 10), 25)
    assert dev.route(_packet_to("10.8.3.4"), 20) is p
    assert dev.route(_packet_to("10.8.1.4"), 20) is None
    assert send(control.UpdatePeer(control.PeerSpec(theirs, allowed_ips=["10.8.4.0/24"])))
    assert dev.route(_packet_to("10.8.4.1"), 20) is dev.remote[theirs]
    broken = control.PeerSpec(mine, allowed_ips=["10.8.5.0/24", "bad"], endpoint=["127.0.0.1", 10])
    assert send(control.UpdatePeer(broken))  # refused whole: the old prefixes stay
    assert dev.route(_packet_to("10.8.3.4"), 20) is p
    assert dev.route(_packet_to("10.8.5.1"), 20) is None

    for owner in (0, 1):  # refused whole: no half-added peer stays behind
        bad = key_owned_by(owner, 2)[1]
        assert send(control.AddPeer(control.PeerSpec(bad, allowed_ips=["10.8.9.0/24", "bad"])))
        assert bad not in dev.peers and bad not in dev.remote
        assert dev.route(_packet_to("10.8.9.1"), 20) is None
    assert send(control.RemovePeer(mine)) and send(control.RemovePeer(theirs))
    assert mine not in dev.peers and theirs not in dev.remote
    assert s.worker.counters.v[C.PEERS_OWNED] == 2
    assert not send(control.Stop())


def _packet_to(dst: str) -> memoryview:
    """Just enough of an IPv4 header for routing (the device routes by destination)."""
    hdr = bytearray(20)
    hdr[0] = 0x45
    hdr[16:20] = socket.inet_aton(dst)
    return memoryview(hdr + bytes(64))
