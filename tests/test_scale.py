"""Many peers on one gateway (issue 14 item 1): a peer table sized for MAX_PEERS up front
(sparse), so live changes can grow a gateway far past what it started with, and a clear
refusal beyond the maximum. Figures (time to ready, memory, CPU) are in `scripts/bench
--only peers`, not here."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from lab.bench_peers import Fleet, Gateway, first_ping
from lab.harness import Harness
from lab.keys import keypair
from shardwg.config.model import parse_config
from shardwg.engine import supervisor as supervisor_mod
from shardwg.engine.live import LiveConfig
from shardwg.shm.layout import MAX_PEERS, Layout


def test_the_table_is_sized_for_the_maximum_and_refuses_beyond_it() -> None:
    lay = Layout(2, 4)
    live = LiveConfig(
        parse_config(f"[Interface]\nPrivateKey = {keypair()[0]}\n"), None, ifname="swgscale0",
        slot_of={b"a": 0, b"b": 2}, engine=SimpleNamespace(),  # type: ignore[arg-type]
        memory=SimpleNamespace(layout=lay),  # type: ignore[arg-type]
    )  # fmt: skip
    assert live._free_slots(2, set()) == [1, 3]  # lowest first: the high-water mark stays low
    assert live._free_slots(3, set()) is None
    assert MAX_PEERS == 65536


def test_a_config_beyond_the_maximum_is_refused_before_anything_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_mod, "MAX_PEERS", 2)
    priv = keypair()[0]
    text = f"[Interface]\nPrivateKey = {priv}\n" + "".join(
        f"[Peer]\nPublicKey = {keypair()[1]}\n" for _ in range(3)
    )
    sup = supervisor_mod.Supervisor(parse_config(text), "swgscale0", 1)
    with pytest.raises(supervisor_mod.SupervisorError, match="at most 2"):
        sup.start()
    assert sup.uapi is None and sup.region is None


@pytest.mark.netns
@pytest.mark.interop
def test_one_syncconf_grows_a_one_peer_gateway_past_the_old_table(netns_factory: Harness) -> None:
    """It refused with ENOSPC ("No space left on device"): the table held 256 slots. (300,
    not 1,000: each added peer still costs a dump of every route, see issue 13 item 4.)"""
    fleet = Fleet(netns_factory, 300, 0)
    gw = Gateway(fleet, 0)
    first_ping(fleet)
    gw.syncconf(fleet.conf(300))
    assert gw.dump_peers() == 301, gw.gw.log_text()[-2000:]
    first_ping(fleet)  # the real peer's session survived the change
    # and back down to one: the slots are freed, the real peer keeps its session
    gw.syncconf(fleet.conf(0))
    assert gw.dump_peers() == 1
    first_ping(fleet)


def _foreign_check_scans(ifname: str) -> list[int]:
    """In a namespace: how many /proc scans the supervisor's once-a-second foreign-queue check
    makes (a) with only our queues attached, (b) once someone else attaches one, (c) after
    FOREIGN_SCAN_INTERVAL."""
    import fcntl
    import struct

    from shardwg.io import tun as tun_io

    scans = [0]
    real = tun_io.queue_holders

    def counting(name: str, **kw: object) -> dict[int, int]:
        scans[0] += 1
        return real(name)

    tun_io.queue_holders = counting  # type: ignore[assignment]
    tun = tun_io.TunDevice.create(ifname, queues=2, multi_queue=True, vnet_hdr=True)
    sup = supervisor_mod.Supervisor(None, ifname, 2)  # type: ignore[arg-type]
    sup.gateway = SimpleNamespace(tun=tun)  # type: ignore[assignment]
    sup._next_scan = 100.0
    out = []
    for k in range(5):
        sup._check_foreign_queues(10.0 + k)
    out.append(scans[0])
    fd = os.open("/dev/net/tun", os.O_RDWR)  # someone else's queue on our TUN
    fcntl.ioctl(fd, tun_io.TUNSETIFF, struct.pack("16sH", ifname.encode(), tun.flags))
    sup._check_foreign_queues(20.0)
    out.append(scans[0])
    os.close(fd)
    sup._check_foreign_queues(100.0 + supervisor_mod.FOREIGN_SCAN_INTERVAL)
    out.append(scans[0])
    tun.close()
    return out


@pytest.mark.netns
def test_the_foreign_queue_check_scans_proc_only_when_the_count_says_so(
    netns_factory: Harness,
) -> None:
    """It read every process's fds from /proc every second (5 scans in 5 s here)."""
    (ns,) = netns_factory(1, "sc")
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); from test_scale import "
            "_foreign_check_scans as f; print(f('sctq0'))")  # fmt: skip
    # `ip netns exec` (ns.run) mounts the namespace's own /sys, as a gateway started in it has
    assert ns.run([sys.executable, "-c", code]).stdout.strip() == "[0, 1, 2]"


def test_uapi_get_never_resolves_a_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """`wg show` is answered in the supervisor's loop: it looked host names up there, so a
    slow resolver stalled the whole gateway (workers' control, heartbeats, metrics)."""
    import socket

    calls = []

    def no_dns(*args: object, **kw: object) -> list[object]:
        calls.append(args)
        raise socket.gaierror(-2, "no DNS in the supervisor loop")

    text = (
        f"[Interface]\nPrivateKey = {keypair()[0]}\n"
        f"[Peer]\nPublicKey = {keypair()[1]}\nEndpoint = peer.example.invalid:51820\n"
        f"[Peer]\nPublicKey = {keypair()[1]}\nEndpoint = 192.0.2.7:51820\n"
    )
    live = LiveConfig(
        parse_config(text), None, ifname="swgscale0", slot_of={},
        engine=SimpleNamespace(listen_port=lambda: 0),  # type: ignore[arg-type]
    )  # fmt: skip
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    view = live.uapi_get()
    assert not calls
    assert [p.endpoint for p in view.peers] == [None, "192.0.2.7:51820"]


def test_a_syncconf_of_ten_thousand_peers_fits_one_uapi_request() -> None:
    """`wg syncconf` restates every kept peer in one set: on 10,000 peers that is ~1.5 MB,
    which the parser refused with EMSGSIZE (limit 1 MiB)."""
    from shardwg.uapi.protocol import RequestParser

    lines = ["set=1", "private_key=" + "11" * 32, "listen_port=51820"]
    for i in range(10000):
        lines += [f"public_key={i:064x}", "replace_allowed_ips=true",
                  f"allowed_ip=10.{128 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32",
                  "preshared_key=" + "00" * 32, "persistent_keepalive_interval=0"]  # fmt: skip
    data = ("\n".join(lines) + "\n\n").encode()
    assert len(data) > 1 << 20
    parser = RequestParser()
    parser.feed(data)
    kind, req = parser.next_event()  # type: ignore[misc]
    assert kind == "set", req
    assert len(req.peers) == 10000


def _routes_in_batches() -> list[int]:
    import ipaddress
    import subprocess

    from shardwg.io import netlink

    subprocess.run(["ip", "tuntap", "add", "scd0", "mode", "tun"], check=True)
    subprocess.run(["ip", "addr", "add", "10.9.0.1/24", "dev", "scd0"], check=True)
    subprocess.run(["ip", "link", "set", "scd0", "up"], check=True)
    v4 = [f"10.{128 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32" for i in range(600)]
    v6 = [f"fd00:9::{i:x}/128" for i in range(100)]
    prefixes = v4 + v6 + ["10.9.0.7/32"]  # the last is covered by the link's own /24
    before = set(netlink.list_routes("scd0"))
    netlink.add_routes("scd0", prefixes)
    netlink.add_routes("scd0", prefixes[:50])  # again: idempotent
    got = set(netlink.list_routes("scd0")) - before
    added = len(got)
    netlink.remove_routes("scd0", v4[:300] + v6[:50] + ["10.9.0.0/24"])
    netlink.remove_routes("scd0", v4[:10])  # absent now: ignored
    left = set(netlink.list_routes("scd0"))
    want = {str(ipaddress.ip_network(p)) for p in v4 + v6}
    return [added, len(left - before), int("10.9.0.0/24" in left), int(got == want)]


@pytest.mark.netns
def test_routes_go_in_batches_and_keep_their_rules(netns_factory: Harness) -> None:
    """Hundreds of routes in several batches: every one added (covered ones skipped), adding
    twice is harmless, removal takes only ours and leaves the connected route."""
    (ns,) = netns_factory(1, "rt")
    assert ns.call(_routes_in_batches) == [700, 350, 1, 1]


def test_a_backlog_is_deep_when_it_takes_over_a_second_to_drain() -> None:
    """1,000 peers initiating at once after a restart queue ~500 per worker: at 128 that was
    under load, and 94 % of them got a cookie reply instead of an answer (served after their
    5 s retransmission) though the queue drained in a fraction of a second."""
    from shardwg.proto import crypto
    from shardwg.proto.constants import UNDER_LOAD_QUEUE_SIZE
    from shardwg.proto.intake import HandshakeIntake
    from shardwg.proto.noise import LocalIdentity

    local = LocalIdentity.from_private(crypto.generate_private_key(b"k" * 32))
    intake = HandshakeIntake(local, os.urandom)
    intake.note_cost(0.016 * 0.5, 16)  # measured: 0.5 ms per handshake (EWMA over 16)
    for _ in range(10):
        intake.note_cost(0.016 * 0.5, 16)
    intake.note_backlog(500, 0.0)
    assert not intake.under_load(0.0)  # 0.25 s of work
    intake.note_backlog(2500, 0.0)
    assert intake.under_load(0.0)  # > 1 s of work
    slow = HandshakeIntake(local, os.urandom)
    for _ in range(10):
        slow.note_cost(16 * 0.01, 16)  # a starved worker: 10 ms each
    slow.note_backlog(UNDER_LOAD_QUEUE_SIZE - 1, 0.0)
    assert not slow.under_load(0.0)  # never below wireguard-go's floor
    slow.note_backlog(UNDER_LOAD_QUEUE_SIZE, 0.0)
    assert slow.under_load(0.0)


def _rss_shmem_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def test_wiping_the_secret_area_for_the_maximum_allocates_nothing() -> None:
    """Sized for MAX_PEERS the secret area is 16 MiB, mostly never written; wiping it at exit
    wrote zeros over all of it, allocating every page first (+16 MiB of shared memory)."""
    from shardwg.shm.secrets import SecretArea, encode_keys

    area = SecretArea(MAX_PEERS)
    area.key_slot(MAX_PEERS - 1).write(encode_keys([(7, b"s" * 32, b"r" * 32)]))
    before = _rss_shmem_kib()
    area.wipe()
    assert _rss_shmem_kib() - before < 1024
    assert bytes(area.key_slot(MAX_PEERS - 1).read()) == bytes(area.key_slot(0).payload_size)
    area.close()


def test_workers_copy_the_placement_table_only_when_it_changed() -> None:
    """Every worker re-read the whole placement table every tick (50 ms); sized for 65,536
    peers that is ~13 ms of copying and decoding each time."""
    import mmap

    from shardwg.engine import adoption
    from shardwg.shm import placement

    lay = Layout.sized(2, MAX_PEERS)
    buf = mmap.mmap(-1, lay.total_size)
    t = placement.PlacementTable(placement.Mode.COUNT, [0, 1, 0])
    scratch = bytearray(placement.table_size(3))
    placement.encode_table(t, scratch)
    lay.placement_slot(buf).write(scratch)
    decoded = []
    real = adoption.decode_table
    w = adoption.ShardPlacement.__new__(adoption.ShardPlacement)
    w.slot, w.generation, w._seen = lay.placement_slot(buf), -1, -1
    try:
        adoption.decode_table = lambda data: decoded.append(1) or real(data)  # type: ignore[assignment]
        assert w.refresh() and w.table == [0, 1, 0]
        for _ in range(20):
            assert not w.refresh()
        t.generation += 1
        t.owners = [1, 1, 0]
        placement.encode_table(t, scratch)
        lay.placement_slot(buf).write(scratch)
        assert w.refresh() and w.table == [1, 1, 0]
    finally:
        adoption.decode_table = real  # type: ignore[assignment]
    assert len(decoded) == 2
    w.slot.release()
    buf.close()


def test_load_sampling_reads_two_words_per_peer_not_a_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The supervisor sampled every peer's traffic once a second by decoding its whole record:
    0.06 cores of an idle gateway with 10,000 peers."""
    from test_placement import _key, _placer, _publish

    from shardwg.engine import placer as placer_mod

    p, lay, buf = _placer(2)
    keys = [_key(i) for i in range(3)]
    p.start(keys, {k: i for i, k in enumerate(keys)})
    decoded = []
    monkeypatch.setattr(placer_mod, "decode_peer", lambda *a: decoded.append(a))
    for i, k in enumerate(keys):
        _publish(lay, buf, i, k, 0, 1000)
    _publish(lay, buf, 3, _key(9), 0, 5)  # a slot of no configured peer: not counted
    p._sample(100.0)
    _publish(lay, buf, 1, keys[1], 0, 3000)
    p._sample(101.0)
    assert not decoded
    assert p.rates == {keys[0]: 0.0, keys[1]: 2000.0, keys[2]: 0.0}
