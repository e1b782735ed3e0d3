"""Bounded CI run of the fuzz targets in fuzz/targets/ (the long campaign is fuzz/run.py).

Every seed in fuzz/corpus and ~200 derandomized hypothesis examples per target, so
a regression in an attacker-facing parser or a broken security property (forged
message accepted, replay accepted, hostile input breaking an honest session) fails
CI. Findings in code owned elsewhere keep a regression test below once fixed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz import run as fuzz_run
from fuzz import targets
from fuzz.targets import handshakes, world
from shardwg.proto import keypair as keypair_mod
from shardwg.proto.cookie import CookieChecker

EXAMPLES = 200
CORPUS = [
    pytest.param(name, file, blob, id=f"{name}/{file}")
    for name in targets.TARGETS
    for file, blob in targets.load_corpus(name)
]


@pytest.fixture(autouse=True)
def fresh_worlds() -> Iterator[None]:
    """Each test starts from freshly built worlds, as a crash file replay does."""
    targets.reset_worlds()
    yield
    targets.reset_worlds()


def test_missing_uapi_fails_loudly() -> None:
    """A broken UAPI import stops the fuzzer instead of skipping the `uapi` target unseen."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'shardwg.uapi.protocol':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fuzz.targets\n"
    )
    root = Path(__file__).resolve().parent.parent
    cp = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                        text=True, timeout=60)  # fmt: skip
    assert cp.returncode != 0 and "blocked for the test" in cp.stderr, cp.stderr


def test_every_target_has_seeds() -> None:
    for name in targets.TARGETS:
        assert targets.load_corpus(name), f"fuzz/corpus/{name} is empty"


def test_corpus_is_current(tmp_path: Path) -> None:
    """Seeds are genuine messages of the live worlds only while the worlds are unchanged."""
    targets.make_corpus(tmp_path)
    stale = [
        f"{name}/{file}"
        for name in targets.TARGETS
        for file, blob in targets.load_corpus(name, tmp_path)
        if dict(targets.load_corpus(name)).get(file) != blob
    ]
    assert not stale, f"run `python fuzz/run.py --make-corpus` and commit; stale: {stale}"


@pytest.mark.parametrize(("name", "file", "blob"), CORPUS)
def test_corpus_seed(name: str, file: str, blob: bytes) -> None:
    targets.TARGETS[name](blob)


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_hypothesis(name: str) -> None:
    seeds = [b for _f, b in targets.load_corpus(name)]
    fn = targets.TARGETS[name]

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fuzz_run.input_strategy(name, seeds))
    def check(data: bytes) -> None:
        fn(data)

    check()


# --------------------------------------------------------------------------- the harness has teeth


def test_catches_classify_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    original = world.classify

    def broken(data: object, length: int | None = None) -> int:
        if length is not None and length < 4:
            raise IndexError("short buffer")
        return original(data, length)  # type: ignore[arg-type]

    monkeypatch.setattr(world, "classify", broken)
    with pytest.raises(IndexError):
        targets.datagram(b"\x04")


def test_catches_replay_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that forgot the replay window: the transport target must notice."""

    def no_replay_check(kp: keypair_mod.Keypair, msg: memoryview, n: int, out: memoryview) -> int:
        kp.replay.reset()
        return keypair_mod.open_into(kp, msg, n, out)

    monkeypatch.setattr("shardwg.proto.device.open_into", no_replay_check)
    with pytest.raises(targets.FuzzFailure, match="replay"):
        targets.transport(b"\x01\x10\x00\x00")


def test_catches_mac2_without_cookie(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CookieChecker, "check_mac2", lambda self, msg, source, now: True)
    with pytest.raises(targets.FuzzFailure):
        targets.cookie(b"anything")


def test_catches_roaming_before_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving a peer's endpoint on an unauthenticated datagram is a state change on drop."""
    from shardwg.proto.device import Device

    real = Device.receive_transport

    def roam_first(self: Device, msg: memoryview, n: int, src: object, *rest: object) -> int:
        kp = self.sessions.get(int.from_bytes(msg[4:8], "little"))
        if kp is not None:
            kp.peer.endpoint = src
        return real(self, msg, n, src, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(Device, "receive_transport", roam_first)
    w = world.cached("datagram", handshakes.datagram_world)
    index = w.peer_a.current.local_index  # B's receiver index for A's packets
    forged = b"\x04\x00\x00\x00" + index.to_bytes(4, "little") + bytes(40)
    with pytest.raises(targets.FuzzFailure, match="changed state"):
        targets.datagram(forged)


def test_mutate_reaches_every_edit() -> None:
    msg = bytes(range(10))
    assert targets.mutate(msg, b"") == msg
    assert targets.mutate(msg, bytes([0, 3, 0, 0xFF])) == msg[:3] + b"\xfc" + msg[4:]
    assert targets.mutate(msg, bytes([2, 4, 0, 0])) == msg[:4]
    assert len(targets.mutate(msg, bytes([3, 0, 0, 7]))) == 11
    assert len(targets.mutate(msg, bytes([4, 0, 0, 0]))) == 9
    assert targets.mutate(msg, bytes([11, 0, 0, 9])) == b"\x09\x09" + msg[2:]


# --------------------------------------------------------------------------- findings
# Findings in code this file does not own, fixed since: their reproducers stay as
# regression tests.


def test_rate_limiter_table_recovers_after_idle() -> None:
    """Found while reviewing the handshake DoS path for SECURITY.md (not by the fuzzer).

    Under load, each source with a valid mac2 gets a RateLimiter bucket; the table is
    capped at 65536 entries. An attacker who can receive cookies at 65536 addresses
    (one IPv6 /48 is 65536 /64s) could fill it, and while it is full every new honest
    peer's initiation is dropped RATE_LIMITED under load. Device.tick now runs
    `intake.limiter.gc(now)` once a second (as wireguard-go does), so idle sources are
    forgotten and an honest initiation gets through again.
    """
    fx = handshakes.handshake_fixture(handshakes._INIT, load=True)
    w, b = fx.world, fx.receiver
    limiter = b.intake.limiter
    for i in range(65536):  # sources seen long ago, idle since
        limiter.allow(bytes([10, i >> 8, i & 0xFF, 1]), w.now - 10.0)
    assert len(limiter) == 65536
    b.tick(w.now, w.wall)
    assert w.deliver(b, fx.message, fx.src) is None  # without gc: DropReason.RATE_LIMITED
