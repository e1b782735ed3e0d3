"""Secrets stay out of the named shared-memory region (issue 13 item 11).

`shardwg show`, /metrics and anyone allowed to open /dev/shm/shardwg-IF map the
named region whole. Session keys and the cookie secret live in the supervisor's
anonymous mapping (shm/secrets.py) that forked workers inherit; these tests use a
real POSIX region and read its bytes back from /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from shardwg.shm.layout import Layout
from shardwg.shm.publisher import SessionPublisher
from shardwg.shm.region import SharedRegion
from shardwg.shm.secrets import SecretArea, decode_keys, encode_keys
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
    secrets = SecretArea(layout.peer_capacity, bytearray(SecretArea(4, bytearray(1 << 16)).size))
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
