"""The outbound batch seal: native kernel (seal.c) against the pure-Python reference
(seal_ref.py), both against io/segment.py, and every sealed datagram against the Python AEAD.

The differential tests drive both implementations the way the worker does (call, send the
run, resume where it stopped, publish a new reservation on LIMIT) over random and adversarial
batches, and require identical results after every call: status, resume point, counter,
counts and every byte of the run.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_segment import (
    ACK,
    CWR,
    FIN,
    PSH,
    partial,
    payload_of,
    run_split,
    tcp_packet,
    tcp_super,
    udp_packet,
    udp_super,
)

from shardwg.datapath import seal_ref, select
from shardwg.io import vnet
from shardwg.proto.constants import DropReason
from shardwg.proto.crypto import AEAD

_native = select.native_module()  # the differential half needs it; the rest still runs

KEY = bytes(range(1, 33))
REMOTE = 0x5EA1ED01
MAX_GSO = 65535 - 8 - 40
needs_native = pytest.mark.skipif(_native is None, reason="shardwg.datapath._native not built")
IMPLS = [seal_ref] + ([_native] if _native is not None else [])


def drive(mod: Any, raws: list[bytes], *, vnet_hdr: bool = True, seal: bool = True,
          mtu: int = 1420, counter: int = 0, limit: int = 1 << 62, block: int = 4096,
          max_count: int = 64, max_bytes: int = MAX_GSO, out_size: int = 1 << 17,
          slack: int = 16) -> list[tuple[tuple[int, ...], bytes]]:  # fmt: skip
    """Seal raws as the worker does; every call's result and run bytes, in order."""
    sealer = mod.Sealer(KEY) if seal else None
    bufs = [memoryview(bytearray(r + bytes(slack))) for r in raws]
    sizes = [len(r) for r in raws]
    out = bytearray(out_size)
    pos = seg = 0
    calls = []
    for _ in range(10_000):  # bounded: every call makes progress or publishes a block
        if pos >= len(bufs):
            break
        res = mod.seal_run(sealer, bufs, sizes, pos, seg, len(bufs), vnet_hdr, mtu, REMOTE,
                           counter, limit, out, max_count, max_bytes)  # fmt: skip
        status, pos, seg, counter, count, size, used = res
        calls.append((res, bytes(out[:used])))
        if status == seal_ref.LIMIT:
            limit = counter + block  # "publish the next reservation", then go on
    else:
        raise AssertionError("seal_run made no progress")
    return calls


def datagrams(calls: list[tuple[tuple[int, ...], bytes]]) -> list[bytes]:
    """Cut each run into its datagrams (size bytes each, the last may be shorter)."""
    out = []
    for res, data in calls:
        size, count = res[5], res[4]
        pieces = [data[i : i + size] for i in range(0, len(data), size)] if size else []
        assert len(pieces) == count
        assert all(len(p) == size for p in pieces[:-1]) and (not pieces or len(pieces[-1]) <= size)
        out += pieces
    return out


def open_all(dgs: list[bytes]) -> list[tuple[int, bytes]]:
    """(counter, plaintext) of each datagram, opened with the Python AEAD."""
    aead = AEAD(KEY)
    got = []
    for d in dgs:
        mtype, index, counter = struct.unpack_from("<IIQ", d)
        assert (mtype, index) == (4, REMOTE)
        got.append((counter, aead.decrypt(bytes(4) + struct.pack("<Q", counter), d[16:], None)))
    return got


def padded(seg: bytes, mtu: int = 1420) -> bytes:
    return seg + bytes(seal_ref.padded_length(len(seg), mtu) - len(seg))


# ---------------------------------------------------------------- inputs
GOOD = [
    tcp_super(False, payload_of(50000), 1380),
    tcp_super(True, payload_of(9000, 3), 1360, flags=ACK | PSH | FIN | CWR, ecn=True),
    tcp_super(False, payload_of(3001), 777, opts=b"\x01\x01\x08\x0a" + bytes(8),
              ip_opts=b"\x01\x01\x01\x00"),  # fmt: skip
    udp_super(False, payload_of(4000), 1000),
    udp_super(True, payload_of(2999, 5), 1200),
    vnet.ZERO_HDR + udp_packet(False, payload_of(333)),
    vnet.VNET.pack(1, 0, 0, 0, 20, 16) + partial(tcp_packet(False, 9, payload_of(101)), 20, 6, 36),
    vnet.ZERO_HDR + tcp_packet(True, 1, payload_of(1380)),
]


@pytest.mark.parametrize("mod", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_sealed_datagrams_open_to_what_segment_split_gives(mod: Any) -> None:
    calls = drive(mod, GOOD, counter=41)
    got = open_all(datagrams(calls))
    segs = [s for raw in GOOD for s in run_split(raw, nbuf=64, bufsize=2048)]
    assert [c for c, _ in got] == list(range(41, 41 + len(segs)))  # consecutive, none reused
    assert [p for _, p in got] == [padded(s) for s in segs]
    assert all(res[0] == seal_ref.OK for res, _ in calls)


@pytest.mark.parametrize("mod", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_plain_mode_is_segment_split(mod: Any) -> None:
    calls = drive(mod, GOOD, seal=False, counter=7)
    assert datagrams(calls) == [s for raw in GOOD for s in run_split(raw, bufsize=2048)]
    assert all(res[3] == 7 for res, _ in calls)  # the counter is not touched


@pytest.mark.parametrize("mod", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_runs_are_gso_shaped(mod: Any) -> None:
    """A 37-segment super-packet fits one run (last datagram shorter); a second one starts a
    new run; max_count and max_bytes cut runs and the resume point lands mid-packet."""
    raw = GOOD[0]
    calls = drive(mod, [raw, raw])
    assert [(r[4], r[5]) for r, _ in calls] == [(37, 1452), (37, 1452)]
    calls = drive(mod, [raw], max_count=10)
    assert [r[4] for r, _ in calls] == [10, 10, 10, 7]
    assert [(r[1], r[2]) for r, _ in calls] == [(0, 10), (0, 20), (0, 30), (1, 0)]
    calls = drive(mod, [raw], max_bytes=1452 * 5 + 100)
    assert [r[4] for r, _ in calls] == [5] * 7 + [2]


@pytest.mark.parametrize("mod", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_never_seals_at_or_past_the_limit(mod: Any) -> None:
    calls = drive(mod, [GOOD[0]], counter=100, limit=105, block=3)
    statuses = [r[0] for r, _ in calls]
    assert statuses.count(seal_ref.LIMIT) >= 1
    counters = [c for c, _ in open_all(datagrams(calls))]
    assert counters == list(range(100, 137))
    # A call starting at the limit seals nothing and says so.
    sealer = mod.Sealer(KEY)
    buf = memoryview(bytearray(GOOD[0]))
    res = mod.seal_run(sealer, [buf], [len(GOOD[0])], 0, 0, 1, True, 1420, REMOTE, 9, 9,
                       bytearray(1 << 17), 64, MAX_GSO)  # fmt: skip
    assert res == (seal_ref.LIMIT, 0, 0, 9, 0, 0, 0)


@pytest.mark.parametrize("mod", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_malformed_packets_are_dropped_alone(mod: Any) -> None:
    bad = vnet.VNET.pack(1, vnet.GSO_TCPV4, 40, 0, 20, 16) + GOOD[0][10:]  # gso_size 0
    calls = drive(mod, [GOOD[5], bad, GOOD[5], b"\x00" * 12])
    assert [r[0] for r, _ in calls] == [0, seal_ref.MALFORMED, 0, seal_ref.MALFORMED]
    assert [r[4] for r, _ in calls] == [1, 0, 1, 0]
    assert seal_ref.MALFORMED == -1 - DropReason.BAD_INNER_PACKET


@pytest.mark.parametrize("mod", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_bad_arguments_raise(mod: Any) -> None:
    buf = [memoryview(bytearray(100))]
    out = bytearray(4096)
    for pos, seg, end in ((0, 0, 2), (1, 0, 0), (-1, 0, 1), (0, -1, 1)):
        with pytest.raises(ValueError):
            mod.seal_run(None, buf, [100], pos, seg, end, True, 1420, 0, 0, 1, out, 64, MAX_GSO)
    with pytest.raises(TypeError):
        mod.seal_run(object(), buf, [100], 0, 0, 1, True, 1420, 0, 0, 1, out, 64, MAX_GSO)
    with pytest.raises(ValueError):
        mod.Sealer(b"short")


# ---------------------------------------------------------------- differential (hypothesis)
def _mutate(data: st.DataObject, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 4), "flips")):
        i = data.draw(st.integers(0, min(len(b), 120) - 1), "at")
        b[i] = data.draw(st.integers(0, 255), "byte")
    if data.draw(st.booleans(), "rewrite vnet"):
        fields = data.draw(st.tuples(st.sampled_from([0, 1, 2, 3]),
                                     st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 2]),
                                     st.integers(0, 0xFFFF), st.sampled_from([0, 1, 7, 536, 1380,
                                     1452, 0xFFFF]), st.integers(0, 80), st.sampled_from([0, 6, 16,
                                     0xFFFF])), "vnet")  # fmt: skip
        b[:10] = vnet.VNET.pack(*fields)
    cut = data.draw(st.one_of(st.just(len(b)), st.integers(0, len(b))), "cut")
    return bytes(b[:cut])


def _packet(data: st.DataObject) -> bytes:
    v6 = data.draw(st.booleans(), "v6")
    kind = data.draw(st.sampled_from(["tcp", "udp", "plain", "partial"]), "kind")
    n = data.draw(st.integers(1, 9000), "payload")
    salt = data.draw(st.integers(0, 255), "salt")
    if kind == "tcp":
        opts = bytes(4 * data.draw(st.integers(0, 10), "opts"))
        flags = data.draw(st.integers(0, 255), "flags")
        mss = data.draw(st.integers(max(1, n // 300), 1500), "mss")  # <= ~300 segments
        raw = tcp_super(v6, payload_of(n, salt), mss, flags=flags, opts=opts,
                        seq=data.draw(st.integers(0, 0xFFFFFFFF), "seq"))  # fmt: skip
    elif kind == "udp":
        raw = udp_super(v6, payload_of(n, salt), data.draw(st.integers(max(1, n // 300), 1500),
                                                             "size"))  # fmt: skip
    elif kind == "plain":
        raw = vnet.ZERO_HDR + udp_packet(v6, payload_of(n % 1400, salt))
    else:
        iph = 40 if v6 else 20
        pkt = partial(tcp_packet(v6, 1, payload_of(n % 1400, salt)), iph, 6, iph + 16)
        raw = vnet.VNET.pack(1, 0, 0, 0, iph, 16) + pkt
    return _mutate(data, raw) if data.draw(st.booleans(), "mutate") else raw


@needs_native
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_native_matches_reference(data: st.DataObject) -> None:
    raws = [_packet(data) for _ in range(data.draw(st.integers(1, 4), "batch"))]
    limit_gap = data.draw(st.integers(0, 70), "gap")
    counter = data.draw(st.sampled_from([0, 5, (1 << 64) - (1 << 13) - 40]), "counter")
    kw = {
        "seal": data.draw(st.booleans(), "seal"),
        "mtu": data.draw(st.sampled_from([0, 1280, 1420, 1500, 9000, 65535]), "mtu"),
        "counter": counter,
        "limit": counter + limit_gap,
        "block": data.draw(st.integers(1, 50), "block"),
        "max_count": data.draw(st.sampled_from([1, 2, 7, 64]), "max_count"),
        "max_bytes": data.draw(st.sampled_from([100, 1500, 20000, MAX_GSO]), "max_bytes"),
        "out_size": data.draw(st.sampled_from([64, 3000, 1 << 17]), "out_size"),
    }
    ref = drive(seal_ref, raws, **kw)
    nat = drive(_native, raws, **kw)
    assert nat == ref
    if kw["seal"]:  # every datagram opens, and no counter repeats
        counters = [c for c, _ in open_all(datagrams(ref))]
        assert counters == list(range(counter, counter + len(counters)))


@needs_native
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_native_matches_reference_without_vnet_header(data: st.DataObject) -> None:
    """Handoff packets carry no vnet header: plain IP packets of any bytes."""
    raws = [data.draw(st.binary(min_size=0, max_size=1600), "pkt") for _ in range(3)]
    mtu = data.draw(st.sampled_from([1280, 1420]), "mtu")
    seal = data.draw(st.booleans(), "seal")
    ref = drive(seal_ref, raws, vnet_hdr=False, seal=seal, mtu=mtu)
    assert drive(_native, raws, vnet_hdr=False, seal=seal, mtu=mtu) == ref


# ---------------------------------------------------------------- the fuzz target (bounded)
@needs_native
def test_fuzz_target_seeds_and_examples() -> None:
    """fuzz/targets/seal.py's seeds and a bounded run of raw inputs: no crash, no divergence."""
    from fuzz.targets.seal import seal, seeds

    for seed in seeds().values():
        seal(seed, _native)

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(st.binary(max_size=600))
    def check(data: bytes) -> None:
        seal(data, _native)

    check()


@needs_native
def test_fuzz_target_notices_a_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    from fuzz.targets.seal import FuzzFailure, seal, seeds

    real = seal_ref.seal_run

    def off_by_one(*args: Any) -> Any:
        res = real(*args)
        return (res[0], res[1], res[2], res[3] + 1, *res[4:])

    monkeypatch.setattr(seal_ref, "seal_run", off_by_one)
    with pytest.raises(FuzzFailure):
        seal(seeds()["good_sealed"], _native)
