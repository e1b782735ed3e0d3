"""Secrets stay out of the named shared-memory region (issue 13 item 11).

`shardwg show`, /metrics and anyone allowed to open /dev/shm/shardwg-IF map the
named region whole. Session keys and the cookie secret live in the supervisor's
anonymous mapping (shm/secrets.py) that forked workers inherit; these tests use a
real POSIX region and read its bytes back from /dev/shm.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys

import pytest

from lab.harness import Harness
from lab.keys import keypair
from lab.netns import unique_ifname, veth_link
from lab.ping import ping
from shardwg.shm.layout import Layout
from shardwg.shm.publisher import SessionPublisher
from shardwg.shm.region import SharedRegion
from shardwg.shm.secrets import SecretArea, decode_cookie, decode_keys, encode_keys
from tests.pairs import Pair, ipv4_packet


def _handshaken() -> Pair:
    pair = Pair()
    pair.send(pair.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"hello"))
    pair.pump()
    pair.send(pair.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"again"))
    pair.pump()
    assert pair.peer_b.current is not None and pair.delivered_b
    return pair


def test_named_region_holds_no_session_key_after_a_handshake() -> None:
    pair = _handshaken()
    layout = Layout(2, 4)
    name = f"/shardwg-test-{os.getpid()}"
    region = SharedRegion.create(name, layout.total_size)
    try:
        layout.write_to(region.buf)
        secrets = SecretArea(layout.peer_capacity)
        pub = SessionPublisher(layout, region.buf, {pair.peer_b.public_key: 1}, 0, secrets)
        pub.publish(pair.peer_b)
        with open(f"/dev/shm{name}", "rb") as f:
            named = f.read()
        kp = pair.peer_b.current
        assert kp is not None
        found = [n for n, k in (("send", kp.send_key), ("recv", kp.recv_key)) if k in named]
        assert not found, f"session {' and '.join(found)} key readable in {name}"
    finally:
        region.unlink()
        with contextlib.suppress(BufferError):  # the publisher's views may still be alive
            region.close()


_PLANT = """
import os, resource, struct, sys, time
import posix_ipc
from shardwg.shm.region import HEADER_SIZE, MAGIC, VERSION, SharedRegion
name, size = sys.argv[1], int(sys.argv[2])
shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)  # sparse
# A stale header: our own pid with a start time that is not ours (a dead creator).
os.pwrite(shm.fd, struct.pack("<8sIIQQ", MAGIC, VERSION, os.getpid(), size, 1), 0)
shm.close_fd()
limit = 1 << 30  # 1 GiB of address space: far below the planted size
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
t = time.monotonic()
try:
    region = SharedRegion.create(name, 4096)
except BaseException as exc:
    print(f"FAILED {type(exc).__name__}: {exc}")
    posix_ipc.unlink_shared_memory(name)
else:
    print(f"OK {region.creator() == os.getpid()} {time.monotonic() - t:.3f}")
    region.close()
    region.unlink()
"""


def test_reclaiming_a_planted_huge_region_is_bounded() -> None:
    """A stale region someone planted at 64 GiB must be reclaimed without mapping or
    allocating its size (it used to map it whole and zero it from a bytes() of that size)."""
    name = f"/shardwg-plant-{os.getpid()}"
    out = subprocess.run(
        [sys.executable, "-c", _PLANT, name, str(64 << 30)],
        capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)),
    )  # fmt: skip
    assert out.stdout.startswith("OK True"), out.stdout + out.stderr


def _published(pair: Pair) -> tuple[Layout, bytearray, SecretArea, dict[bytes, int]]:
    layout = Layout(2, 4)
    buf = bytearray(layout.total_size)
    layout.write_to(buf)
    secrets = SecretArea(layout.peer_capacity, bytearray(SecretArea.size_for(4)))
    slot_of = {pair.peer_b.public_key: 2}
    SessionPublisher(layout, buf, slot_of, 0, secrets).publish(pair.peer_b)
    return layout, buf, secrets, slot_of


def test_replacement_resumes_with_keys_from_the_secret_area() -> None:
    pair = _handshaken()
    layout, buf, secrets, slot_of = _published(pair)
    # A replacement worker: a fresh Device whose peer has no session yet.
    fresh = Pair()
    peer = fresh.peer_b
    assert peer.current is None
    pub = SessionPublisher(layout, buf, slot_of, 0, secrets)
    assert pub.restore(peer, pair.now)
    assert peer.current is not None and pair.peer_b.current is not None
    assert peer.current.send_key == pair.peer_b.current.send_key
    assert peer.current.recv_key == pair.peer_b.current.recv_key
    # B decrypts what the replacement seals.
    fresh.a.outbox.clear()
    fresh.now = pair.now
    res = fresh.send(fresh.a, ipv4_packet("10.0.0.1", "10.0.0.2", b"resumed"))
    assert res > 0
    _peer, data = fresh.a.outbox[-1]
    pair.deliver(pair.b, data, ("192.0.2.1", 51820))
    assert pair.delivered_b[-1].endswith(b"resumed")


def test_session_without_matching_keys_is_not_resumed() -> None:
    pair = _handshaken()
    layout, buf, secrets, slot_of = _published(pair)
    # Keys tagged with another local index: as if the key slot were written for other
    # sessions than the record names. Nothing is paired, so nothing is resumed.
    secrets.key_slot(2).write(encode_keys([(0x12345678, bytes([1]) * 32, bytes([2]) * 32)]))
    fresh = Pair()
    pub = SessionPublisher(layout, buf, slot_of, 0, secrets)
    assert not pub.restore(fresh.peer_b, pair.now)
    assert fresh.peer_b.current is None
    assert decode_keys(secrets.key_slot(2).read()) == {}  # republished: no sessions, no keys


def _secret_mapping(pid: int, size: int) -> bytes:
    """The bytes of process `pid`'s anonymous shared mapping of `size` bytes (page-rounded):
    MAP_SHARED|MAP_ANONYMOUS shows in /proc/PID/maps as "/dev/zero (deleted)"."""
    want = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if hi - lo == want and " ".join(fields[5:]) == "/dev/zero (deleted)":
                with open(f"/proc/{pid}/mem", "rb") as mem:
                    mem.seek(lo)
                    return mem.read(size)
    raise AssertionError(f"no {want}-byte anonymous shared mapping in {pid}")


@pytest.mark.netns
@pytest.mark.interop
def test_gateway_keys_are_in_the_workers_mapping_not_the_named_region(
    netns_factory: Harness,
) -> None:
    """End to end against wireguard-go: after a handshake, the session keys a worker holds
    (read from its own anonymous mapping through /proc) appear nowhere in /dev/shm."""
    gw_ns, peer_ns = netns_factory(2)
    veth_link(gw_ns, peer_ns, ["10.99.0.1/24"], ["10.99.0.2/24"])
    gw_keys, peer_keys = keypair(), keypair()
    netns_factory.wireguard_go(
        peer_ns, unique_ifname("wgp"), peer_keys[0], 51821,
        [{"public_key": gw_keys[1], "allowed_ips": ["10.0.0.1/32"], "endpoint": None}],
        ["10.0.0.2/24"],
    )  # fmt: skip
    gw = netns_factory.gateway(
        gw_ns, unique_ifname("swg"), gw_keys[0], 51820,
        [{"public_key": peer_keys[1], "allowed_ips": ["10.0.0.2/32"],
          "endpoint": "10.99.0.2:51821"}],
        ["10.0.0.1/24"], workers=2,
    )  # fmt: skip
    assert ping(gw_ns, "10.0.0.2", count=2, timeout=10), gw.log_text()
    with open(f"/dev/shm/shardwg-{gw.ifname}", "rb") as f:
        named = f.read()
    layout = Layout.read_from(bytearray(named))
    status = gw.show_json(interval=0.5)
    owner = status["peers"][0]["owner"]
    pid = status["worker_stats"][owner]["pid"]
    area = SecretArea(layout.peer_capacity, bytearray(SecretArea.size_for(layout.peer_capacity)))
    raw = _secret_mapping(pid, area.size)
    area.buf[: len(raw)] = raw
    keys = [k for i in range(layout.peer_capacity) for k in decode_keys(area.key_slot(i).read())
            .values()]  # fmt: skip
    assert keys, "no session keys in the worker's mapping after a handshake"
    for send, recv in keys:
        assert send not in named and recv not in named
    cookie = decode_cookie(area.cookie_slot().read())
    assert cookie is not None and cookie.current not in named and cookie.next not in named
