"""shardwg.io.coalesce: decrypted packets merged into TUN super-packets, checked with the
reference checksum of test_segment, by round trip through split, and against a real kernel."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_segment import (
    ACK,
    CWR,
    FIN,
    LOCAL,
    PSH,
    SYN,
    TUN_MTU,
    check_ip,
    check_l4,
    is_tcp_from,
    l4,
    open_offload_tun,
    payload_of,
    pseudo,
    read_raw,
    ref_sum,
    run_split,
    swap_direction,
    tcp_handshake,
    tcp_packet,
    tcp_super,
    udp_packet,
    udp_super,
)

from shardwg.io import vnet
from shardwg.io.coalesce import Coalescer
from shardwg.io.tun import write_packet

HEAD = 16  # headroom before each packet (>= the 10-byte header)


def run(pkts: list[bytes], **kw: object) -> list[bytes]:
    """Coalesce pkts (each in its own buffer, HEAD bytes in); return what would be written."""
    views = [memoryview(bytearray(HEAD + len(p) + 16)) for p in pkts]
    for v, p in zip(views, pkts, strict=True):
        v[HEAD : HEAD + len(p)] = p
    c = Coalescer(**kw)  # type: ignore[arg-type]
    out = c.coalesce(views, [len(p) for p in pkts], len(pkts), HEAD)
    for view, n in out:
        assert len(view) == n
    return [bytes(view) for view, _ in out]


def segments(pkts: list[bytes], same_id: bool = False) -> list[bytes]:
    """What each output is once the kernel splits it: split() is the model. same_id: compare
    without the IPv4 ID (and header checksum) that splitting increments per segment."""
    res: list[bytes] = []
    for raw in pkts:
        res += run_split(raw, nbuf=128)
    return [no_id(p) for p in res] if same_id else res


def no_id(p: bytes) -> bytes:
    return p if p[0] >> 4 == 6 else p[:4] + bytes(2) + p[6:10] + bytes(2) + p[12:]


def check_merged(raw: bytes, n_segs: int, mss: int, proto: int = 6) -> bytes:
    """Check a merged super-packet's header and partial checksum; return its IP packet."""
    h = vnet.parse(raw)
    pkt = raw[10:]
    v6 = pkt[0] >> 4 == 6
    iph = 40 if v6 else 20
    assert h.flags == vnet.VIRTIO_NET_HDR_F_NEEDS_CSUM
    want = vnet.GSO_UDP_L4 if proto == 17 else (vnet.GSO_TCPV6 if v6 else vnet.GSO_TCPV4)
    assert h.gso_type == want
    thl = 8 if proto == 17 else (pkt[iph + 12] >> 4) * 4
    assert h.hdr_len == iph + thl and h.csum_start == iph and h.gso_size == mss
    assert h.csum_offset == (6 if proto == 17 else 16)
    check_ip(pkt)
    assert -(-(len(pkt) - iph - thl) // mss) == n_segs
    src, dst = (pkt[8:24], pkt[24:40]) if v6 else (pkt[12:16], pkt[16:20])
    field = struct.unpack_from("!H", pkt, iph + h.csum_offset)[0]
    assert field == ref_sum(pseudo(src, dst, proto, len(pkt) - iph))  # folded, not inverted
    return pkt


def tcp_run(v6: bool, sizes: list[int], seq: int = 100, last_flags: int = ACK | PSH,
            **kw: object) -> tuple[list[bytes], bytes]:  # fmt: skip
    payload = payload_of(sum(sizes), 4)
    pkts, at = [], 0
    for i, n in enumerate(sizes):
        flags = last_flags if i == len(sizes) - 1 else ACK
        p = tcp_packet(v6, seq + at, payload[at : at + n], flags, ident=0x1234 + i, **kw)  # type: ignore[arg-type]
        pkts.append(p)
        at += n
    return pkts, payload


# ---------------------------------------------------------------- TCP merges
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_tcp_merge(v6: bool) -> None:
    pkts, payload = tcp_run(v6, [1380] * 7 + [999])
    (raw,) = run(pkts)
    pkt = check_merged(raw, 8, 1380)
    iph = 40 if v6 else 20
    assert pkt[iph + 20 :] == payload
    assert pkt[iph + 13] == ACK | PSH and struct.unpack_from("!I", pkt, iph + 4)[0] == 100
    assert segments([raw]) == pkts  # the kernel's split gives back exactly the originals


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("plen", [2 * 1380, 5 * 1380 + 1, 47 * 1380 + 17])
def test_round_trip_split_coalesce(v6: bool, plen: int) -> None:
    """super-packet -> split -> coalesce gives the super-packet's payload, flags and gso_size;
    the pieces split again are the same segments."""
    payload = payload_of(plen, 2)
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 5, 6)
    original = tcp_super(v6, payload, 1380, flags=ACK | PSH, opts=opts)
    segs = run_split(original)
    merged = run(segs)
    iph = 40 if v6 else 20
    data = b""
    for raw in merged:
        pkt = check_merged(raw, -(-(len(raw) - 10 - iph - 32) // 1380), 1380)
        data += pkt[iph + 32 :]
    assert data == payload
    assert len(merged) == -(-len(segs) // 64) or plen * 1 > 60000  # 64 segments / 64 KiB caps
    assert vnet.parse(merged[0]).gso_size == vnet.parse(original).gso_size
    assert merged[-1][10 + iph + 13] == ACK | PSH and merged[0][10 + iph + 13] & PSH == (
        0 if len(merged) > 1 else PSH
    )
    assert segments(merged) == segs


def test_caps_on_segments_and_size() -> None:
    pkts, payload = tcp_run(False, [1000] * 70)
    out = run(pkts)
    assert [vnet.parse(r).gso_type for r in out] == [vnet.GSO_TCPV4] * 2
    assert len(out[0]) - 10 - 40 == 64 * 1000  # 64 segments cap
    out = run(pkts, max_segments=80)
    assert len(out[0]) - 10 <= 65535 and len(out) == 2  # 64 KiB cap
    assert b"".join(r[50:] for r in out) == payload
    assert segments(out) == pkts


def test_interleaved_flows_merge_per_flow_in_order() -> None:
    a, pa = tcp_run(False, [1000] * 4, seq=1)
    b, pb = tcp_run(False, [800] * 3, seq=9, sport=40001)
    mixed = [a[0], b[0], a[1], b[1], a[2], b[2], a[3]]
    out = run(mixed)
    assert len(out) == 2
    assert check_merged(out[0], 4, 1000)[40:] == pa
    assert check_merged(out[1], 3, 800)[40:] == pb


def _ip_variant(pkt: bytes, ttl: int | None = None, tos: int | None = None) -> bytes:
    """Same TCP/IPv4 packet with another TTL or TOS and a fixed IPv4 header checksum."""
    b = bytearray(pkt)
    if ttl is not None:
        b[8] = ttl
    if tos is not None:
        b[1] = tos
    b[10:12] = b"\0\0"
    b[10:12] = struct.pack("!H", ~ref_sum(bytes(b[:20])) & 0xFFFF)
    return bytes(b)


def _seg(seq: int, n: int, flags: int = ACK, **kw: object) -> bytes:
    return tcp_packet(False, seq, payload_of(n, seq & 0xFF), flags, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pkts,groups",
    [
        pytest.param([_seg(0, 1000), _seg(1001, 1000)], [1, 1], id="gap"),
        pytest.param([_seg(0, 1000), _seg(0, 1000)], [1, 1], id="duplicate"),
        pytest.param([_seg(0, 999), _seg(999, 1000)], [1, 1], id="larger-after-smaller"),
        pytest.param([_seg(0, 1000), _seg(1000, 500), _seg(1500, 500)], [2, 1], id="short-ends"),
        pytest.param([_seg(0, 1000, ACK | PSH), _seg(1000, 1000)], [1, 1], id="psh-ends"),
        pytest.param([_seg(0, 1000), _seg(1000, 1000, ACK | FIN)], [1, 1], id="fin"),
        pytest.param([_seg(0, 1000), _seg(1000, 1000, ACK | CWR)], [1, 1], id="cwr"),
        pytest.param([_seg(0, 1000), _seg(1000, 1000, ACK | 0x20)], [1, 1], id="urg"),
        pytest.param([_seg(0, 1000, SYN), _seg(1000, 1000)], [1, 1], id="syn"),
        pytest.param([_seg(0, 1000), _seg(1000, 1000, 0x04)], [1, 1], id="rst"),
        pytest.param([_seg(0, 1000), _seg(1000, 1000, ACK | 0x40)], [1, 1], id="ece"),
        pytest.param([_seg(0, 1000), _seg(1000, 1000, ack=5)], [1, 1], id="ack-differs"),
        pytest.param([_seg(0, 1000), _seg(1000, 1000, window=7)], [1, 1], id="window-differs"),
        pytest.param([_seg(0, 1000), _seg(1000, 1000, dport=9)], [1, 1], id="other-flow"),
        pytest.param(
            [_seg(0, 1000, opts=b"\x01\x01\x01\x01"), _seg(1000, 1000, opts=b"\x01\x01\x01\x00")],
            [1, 1], id="options-differ",
        ),  # fmt: skip
        pytest.param([_seg(0, 1000), _seg(1000, 1000, opts=b"\x01" * 4)], [1, 1], id="opt-len"),
        pytest.param([_seg(0, 1000), _ip_variant(_seg(1000, 1000), ttl=3)], [1, 1], id="ttl"),
        pytest.param([_seg(0, 1000), _ip_variant(_seg(1000, 1000), tos=4)], [1, 1], id="tos"),
        pytest.param(
            [_seg(0, 1000, ip_opts=b"\x01\x01\x01\x00"), _seg(1000, 1000, ip_opts=b"\x01" * 4)],
            [1, 1], id="ipv4-options",
        ),  # fmt: skip
        pytest.param([_seg(0, 1000), _seg(1000, 0)], [1, 1], id="pure-ack"),
        pytest.param(
            [_seg(0, 1000), _seg(1000, 0), _seg(1000, 1000), _seg(2000, 1000)], [1, 1, 2],
            id="pure-ack-keeps-its-place",
        ),  # fmt: skip
        pytest.param(
            [_seg(0, 1000), _seg(1000, 1000), _seg(2000, 0), _seg(2000, 1000), _seg(3000, 1000)],
            [2, 1, 2], id="pure-ack-after-a-run",
        ),  # fmt: skip
        pytest.param([_seg(0, 1000), _seg(1000, 1000, good_csum=False)], [1, 1], id="bad-csum"),
        pytest.param([_seg(0, 1000, good_csum=False), _seg(1000, 1000)], [1, 1], id="bad-head"),
        pytest.param(
            [_seg(0, 1000), _seg(1000, 1000, good_csum=False), _seg(2000, 1000)],
            [1, 1, 1], id="bad-middle-ends-run",
        ),  # fmt: skip
        pytest.param(
            [_seg(0, 1000), _seg(1000, 1000, ACK | FIN), _seg(2000, 1000), _seg(3000, 1000)],
            [1, 1, 2], id="non-candidate-closes-flow",
        ),  # fmt: skip
        pytest.param(
            [_seg(0, 1000), udp_packet(False, b"x" * 50), _seg(1000, 1000)], [2, 1],
            id="other-protocol-between",
        ),  # fmt: skip
    ],
)
def test_not_merged(pkts: list[bytes], groups: list[int]) -> None:
    out = run(pkts)
    got = [(-(-(len(r) - 10 - 40) // 1000) if r[1] else 1) for r in out]
    assert got == groups
    for r in out:
        if r[:10] == vnet.ZERO_HDR:
            assert r[10:] in pkts  # singles go out untouched behind an all-zero header
    assert per_flow(segments(out, True)) == per_flow([no_id(p) for p in pkts])  # order kept


def per_flow(pkts: list[bytes]) -> dict[bytes, list[bytes]]:
    """Packets by (protocol, addresses, ports): order only matters within a flow."""
    flows: dict[bytes, list[bytes]] = {}
    for p in pkts:
        flows.setdefault(p[9:10] + p[12:24], []).append(p)
    return flows


def test_bad_checksum_merges_without_verify() -> None:
    pkts = [_seg(0, 1000), _seg(1000, 1000, good_csum=False)]
    assert len(run(pkts, verify=False)) == 1


def test_arena_shortage_leaves_singles() -> None:
    flows = [tcp_run(False, [900, 900], sport=41000 + k)[0] for k in range(3)]
    pkts = [p for f in flows for p in f]
    out = run(pkts, max_arenas=1)
    assert [r[1] for r in out] == [vnet.GSO_TCPV4, 0, 0, 0, 0]
    assert segments(out, True) == [no_id(p) for p in pkts]


def test_reuse_between_calls() -> None:
    c = Coalescer()
    for k in range(3):
        pkts, payload = tcp_run(k == 1, [1200] * (k + 2))
        views = [memoryview(bytearray(HEAD + 1500)) for _ in pkts]
        for v, p in zip(views, pkts, strict=True):
            v[HEAD : HEAD + len(p)] = p
        (out,) = c.coalesce(views, [len(p) for p in pkts], len(pkts), HEAD)
        assert segments([bytes(out[0])]) == pkts
    with pytest.raises(ValueError):
        c.coalesce(views, [1], 1, 4)


# ---------------------------------------------------------------- UDP
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_udp_merge_needs_uso(v6: bool) -> None:
    data = payload_of(5 * 1400 + 333, 8)
    pkts = run_split(udp_super(v6, data, 1400))
    assert len(run(pkts)) == len(pkts)  # udp=False: TUN_F_USO not on, never merge
    (raw,) = run(pkts, udp=True)
    pkt = check_merged(raw, 6, 1400, proto=17)
    iph = 40 if v6 else 20
    assert struct.unpack_from("!H", pkt, iph + 4)[0] == len(pkt) - iph
    assert pkt[iph + 8 :] == data
    assert segments([raw]) == pkts


def test_udp_not_merged() -> None:
    big, small = udp_packet(False, b"a" * 1000), udp_packet(False, b"b" * 500)
    assert len(run([small, big], udp=True)) == 2  # larger after smaller
    assert len(run([big, small, big], udp=True)) == 2  # short one ends the run
    zero = udp_packet(False, b"c" * 1000, zero_csum=True)
    assert len(run([big, zero], udp=True)) == 2  # no checksum to vouch for the data
    other = udp_packet(False, b"a" * 1000, dport=4)
    assert len(run([big, other, big], udp=True)) == 2  # two flows: 2 merged + 1


# ---------------------------------------------------------------- real kernel
def tun_write_side(v6: bool) -> dict[str, object]:
    """Write coalesced UDP (USO) and TCP super-packets into the TUN; local sockets must get
    every datagram and the whole byte stream intact."""
    res: dict[str, object] = {}
    dev, uso = open_offload_tun()
    fd = dev.fds[0]
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    if uso:
        with socket.socket(fam, socket.SOCK_DGRAM) as r:
            r.bind((LOCAL[v6], 0))
            r.settimeout(5)
            port = r.getsockname()[1]
            data = payload_of(7 * 1200 + 99, 21)
            dgrams = [data[i : i + 1200] for i in range(0, len(data), 1200)]
            pkts = [swap_direction(udp_packet(v6, d, sport=7777, dport=port), v6) for d in dgrams]
            out = run(pkts, udp=True)
            res["udp_hdrs"] = [tuple(vnet.parse(o)) for o in out]
            res["udp_written"] = [write_packet(fd, o) for o in out]
            res["udp_got"] = [r.recvfrom(2048) for _ in dgrams]
            res["udp_sent"] = dgrams
    s, port, isn_c, isn_s, _ = tcp_handshake(fd, v6)
    mss = TUN_MTU - (60 if v6 else 40)
    stream = payload_of(20 * mss + 77, 23)
    pkts = []
    for at in range(0, len(stream), mss):
        flags = ACK | PSH if at + mss >= len(stream) else ACK
        p = tcp_packet(v6, isn_s + 1 + at, stream[at : at + mss], flags, ack=isn_c + 1,
                       window=65535, sport=5201, dport=port)  # fmt: skip
        pkts.append(swap_direction(p, v6))
    out = run(pkts)
    res["tcp_hdrs"] = [tuple(vnet.parse(o)) for o in out]
    res["tcp_written"] = [write_packet(fd, o) for o in out]
    s.settimeout(5)
    got = b""
    while len(got) < len(stream):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    res["tcp_ok"] = got == stream
    # The kernel acknowledges the whole run at once.
    want = isn_s + 1 + len(stream)
    deadline = time.monotonic() + 3
    res["acked"] = False
    while time.monotonic() < deadline and not res["acked"]:
        raw = read_raw(fd, is_tcp_from(port), deadline - time.monotonic())
        if raw is None:
            break
        for p in run_split(raw):
            t = l4(p)[1]
            if struct.unpack_from("!I", p, t + 8)[0] == want:
                res["acked"] = True
    s.close()
    dev.close()
    return res


@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_kernel_accepts_coalesced_writes(netns_factory, v6: bool) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(tun_write_side, v6, timeout=60)
    gso = vnet.GSO_TCPV6 if v6 else vnet.GSO_TCPV4
    assert [h[1] for h in r["tcp_hdrs"]] == [gso]  # 21 segments in one write
    assert r["tcp_written"] == [True]
    assert r["tcp_ok"] is True and r["acked"] is True
    if "udp_hdrs" not in r:
        pytest.skip("kernel without USO: TCP checked, UDP skipped")
    assert [h[1] for h in r["udp_hdrs"]] == [vnet.GSO_UDP_L4]
    assert r["udp_written"] == [True]
    assert [d for d, _ in r["udp_got"]] == r["udp_sent"]
    assert {a[1] for _, a in r["udp_got"]} == {7777}


def test_helpers_are_the_reference() -> None:
    """check_l4 (the reference) rejects what it should, so the tests above can fail."""
    p = tcp_packet(False, 1, b"abc")
    with pytest.raises(AssertionError):
        check_l4(p[:-1] + b"x", 20, 6)
    check_l4(p, 20, 6)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_fuzz_never_raises(data: st.DataObject) -> None:
    """Corrupted batches: no exception, every output is a single or a well-formed merge."""
    v6 = data.draw(st.booleans())
    pkts, _ = tcp_run(v6, [1000] * 5 + [300])
    pkts += [udp_packet(v6, b"u" * 700) for _ in range(3)]
    batch = [bytearray(p) for p in data.draw(st.permutations(pkts))]
    for _ in range(data.draw(st.integers(0, 8))):
        p = batch[data.draw(st.integers(0, len(batch) - 1))]
        p[data.draw(st.integers(0, 60))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(batch) - 1))
    batch[cut] = batch[cut][: data.draw(st.integers(1, len(batch[cut])))]
    out = run([bytes(p) for p in batch], udp=True, verify=data.draw(st.booleans()))
    for raw in out:
        h = vnet.parse(raw)
        if h.gso_type:
            assert h.flags == 1 and h.gso_size > 0 and len(raw) - 10 > h.hdr_len
            run_split(raw, nbuf=128)  # the model kernel accepts it
        else:
            assert raw[:10] == vnet.ZERO_HDR
