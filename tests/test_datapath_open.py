"""The native inbound kernel against its pure-Python reference: the same random and
adversarial batches into both, identical TUN bytes, drop counters and state bytes required.

Skipped only when the extension is not built and SHARDWG_NATIVE_REQUIRED is unset.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from open_world import World, seal_with
from test_segment import ACK, PSH, payload_of, tcp_packet, udp_packet

from shardwg.datapath import open_ref, openstate, select
from shardwg.datapath.openstate import (
    C_DROPS,
    C_RX_PACKETS,
    SPAN_WORDS,
    TOUCH_WORDS,
    OpenState,
    batch_arrays,
)
from shardwg.io.coalesce import Coalescer
from shardwg.proto.constants import DropReason

NATIVE = select.native_module()
if NATIVE is None and not os.environ.get("SHARDWG_NATIVE_REQUIRED"):
    pytest.skip("shardwg.datapath._native is not built", allow_module_level=True)
assert NATIVE is not None, "SHARDWG_NATIVE_REQUIRED is set but the extension is not built"


def test_native_layout_matches_openstate() -> None:
    abi = NATIVE.open_abi()
    for name in ("SESSION_SIZE", "S_PEER", "S_CREATED", "S_TOUCH", "S_REPLAY", "C_DROPS",
                 "C_MERGED", "TOUCH_WORDS"):  # fmt: skip
        assert abi[name] == getattr(openstate, name), name
    assert abi["BAD_INNER_CHECKSUM"] == DropReason.BAD_INNER_CHECKSUM
    assert abi["INTERNAL_ERROR"] == DropReason.INTERNAL_ERROR


# ------------------------------------------------------------------ two kernels, one world
class Twin:
    """The world's device A seen by both kernels: same buffers, separate copies."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.nat = OpenState(NATIVE.OpenKeys())
        self.nat.sync(world.a)
        self.ref = OpenState(open_ref.RefKeys())
        self.ref.sessions = bytearray(self.nat.sessions)
        self.ref.index = bytearray(self.nat.index)
        self.ref.allowed = bytearray(self.nat.allowed)
        for slot, kp in enumerate(self.nat.kps):
            if kp is not None:
                self.ref.keys.set(slot, kp.recv_key)

    def run(self, msgs: list[tuple[bytes, int]], now: float, udp: bool = False,
            skip: frozenset[int] = frozenset(),
            forward: bool = False) -> tuple[Any, Any]:  # fmt: skip
        """Open one batch (message bytes, GRO segment size) with both kernels."""
        stride = max([len(m) for m, _ in msgs] + [1]) + 13
        data = bytearray(stride * len(msgs))
        for i, (m, _) in enumerate(msgs):
            data[i * stride : i * stride + len(m)] = m
        lengths = [-1 if i in skip else len(m) for i, (m, _) in enumerate(msgs)]
        segs = [seg for _, seg in msgs]
        got = []
        for fn, state in ((NATIVE.open_batch, self.nat), (open_ref.open_batch, self.ref)):
            arrays = batch_arrays(len(data))
            res = fn(
                state.keys,
                state.sessions,
                state.index,
                state.allowed,
                bytes(data),
                stride,
                lengths,
                segs,
                len(msgs),
                arrays["dec"],
                arrays["out"],
                arrays["spans"],
                arrays["touched"],
                arrays["handshakes"],
                arrays["counters"],
                now,
                udp,
                forward,
            )
            got.append(_outputs(res, arrays, state))
        return got[0], got[1]


def _outputs(res: tuple[int, int, int], a: dict[str, bytearray], state: OpenState) -> Any:
    nw, nt, nh = res
    spans = struct.unpack_from(f"<{nw * SPAN_WORDS}I", a["spans"])
    writes = [bytes(a["out"][spans[2 * i] : spans[2 * i] + spans[2 * i + 1]]) for i in range(nw)]
    used = spans[-2] + spans[-1] if nw else 0
    return {
        "result": res,
        "spans": spans,
        "out": bytes(a["out"][:used]),
        "writes": writes,
        "touched": bytes(a["touched"][: nt * TOUCH_WORDS * 8]),
        "handshakes": bytes(a["handshakes"][: nh * 12]),
        "counters": struct.unpack_from(f"<{openstate.COUNTERS_LEN}Q", a["counters"]),
        "sessions": bytes(state.sessions),
    }


def assert_same(nat: Any, ref: Any) -> None:
    for key in ("result", "counters", "handshakes", "touched", "spans", "writes", "out",
                "sessions"):  # fmt: skip
        assert nat[key] == ref[key], key


# ------------------------------------------------------------------ inner packets
SPOOF_C = bytes([10, 78, 0, 5])  # peer C's prefix
SPOOF_NOBODY = bytes([10, 99, 0, 1])


def _spoof(pkt: bytes, src: bytes) -> bytes:
    return pkt[:12] + src + pkt[16:]


@st.composite
def inner(draw: Any, seqs: dict[int, int]) -> bytes:
    kind = draw(st.sampled_from(["tcp"] * 8 + ["tcp6", "udp", "udp", "udp6", "badcsum",
                                 "spoofC", "spoofX", "badver", "long", "short", "icmp",
                                 "frag", "ipopts", "zero_udp", "raw", "keepalive"]))  # fmt: skip
    flow = draw(st.integers(0, 2))
    size = draw(st.sampled_from([0, 1, 100, 599, 600, 600, 600, 600, 600, 1300]))
    ack = 1000
    if draw(st.integers(0, 3)):  # mostly the flow's next full segment, so runs can merge
        if draw(st.integers(0, 3)):
            size = 600
        seq = seqs.get(flow, 0xFFFFF000 if flow == 2 else 1)
        seqs[flow] = (seq + size) & 0xFFFFFFFF
    else:
        seq = draw(st.integers(0, 5)) * 600 + (0xFFFFF000 if draw(st.booleans()) else 1)
    payload = payload_of(size, salt=flow)
    flags = draw(st.sampled_from([ACK] * 6 + [ACK | PSH, 0x18 | 0x01, 0x02]))
    if not draw(st.integers(0, 7)):
        ack = 1001
    v6 = kind in ("tcp6", "udp6")
    if kind in ("tcp", "tcp6", "badcsum"):
        return tcp_packet(
            v6,
            seq & 0xFFFFFFFF,
            payload,
            flags=flags,
            sport=40000 + flow,
            good_csum=kind != "badcsum",
            ack=ack,
        )
    if kind in ("udp", "udp6"):
        return udp_packet(v6, payload, sport=40000 + flow)
    if kind == "zero_udp":
        return udp_packet(False, payload, zero_csum=True)
    base = tcp_packet(False, 1, payload)
    if kind == "spoofC":
        return _spoof(base, SPOOF_C)
    if kind == "spoofX":
        return _spoof(base, SPOOF_NOBODY)
    if kind == "badver":
        return bytes([0x55]) + base[1:]
    if kind == "long":
        return base[:2] + struct.pack("!H", len(base) + 7) + base[4:]
    if kind == "short":
        return base[: draw(st.integers(1, 19))]
    if kind == "icmp":
        return base[:9] + b"\x01" + base[10:]
    if kind == "frag":
        return base[:6] + b"\x20\x00" + base[8:]
    if kind == "ipopts":
        return tcp_packet(False, seq & 0xFFFFFFFF, payload, ip_opts=b"\x01\x01\x01\x00",
                          good_csum=draw(st.booleans()))  # fmt: skip
    if kind == "raw":
        return draw(st.binary(min_size=1, max_size=80))
    return b""


class Sender:
    """B's two sessions and the counters used so far (for replays and jumps)."""

    def __init__(self, world: World) -> None:
        assert world.peer_a.previous is not None and world.peer_a.current is not None
        self.kps = [world.peer_a.previous, world.peer_a.current]
        self.next = [0, 0]
        self.sent: list[bytes] = []
        self.seqs: dict[int, int] = {}  # TCP flow -> next sequence number


@st.composite
def datagram(draw: Any, sender: Sender) -> bytes:
    odd = ["replay", "behind", "jump", "limit", "badtag", "index", "truncate", "handshake",
           "junk", "tiny"]  # fmt: skip
    kind = draw(st.sampled_from(["fresh"] * 8 + odd))
    s = draw(st.integers(0, 1))
    kp = sender.kps[s]
    if kind == "replay" and sender.sent:
        return draw(st.sampled_from(sender.sent))
    if kind == "handshake":
        t, size = draw(st.sampled_from([(1, 148), (2, 92), (3, 64), (1, 147), (3, 65)]))
        return bytes([t, 0, 0, 0]) + draw(st.binary(min_size=size - 4, max_size=size - 4))
    if kind == "junk":
        return draw(st.binary(min_size=0, max_size=70))
    if kind == "tiny":
        return bytes([4, 0, 0, 0]) + bytes(draw(st.integers(0, 27)))
    if kind == "behind":
        counter = max(0, sender.next[s] - draw(st.sampled_from([8127, 8128, 8129, 9000])))
    elif kind == "jump":
        counter = sender.next[s] + draw(st.sampled_from([63, 64, 100, 8128, 8192, 20000]))
    elif kind == "limit":
        counter = (1 << 64) - (1 << 13) - 1 - draw(st.integers(0, 1))
    else:
        counter = sender.next[s]
    if kind != "limit":
        sender.next[s] = max(sender.next[s], counter + 1)
    dg = seal_with(kp, counter, draw(inner(sender.seqs)))
    if kind == "badtag":
        i = draw(st.integers(16, len(dg) - 1))
        dg = dg[:i] + bytes([dg[i] ^ 0x40]) + dg[i + 1 :]
    elif kind == "index":
        dg = dg[:4] + struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + dg[8:]
    elif kind == "truncate":
        dg = dg[: draw(st.integers(0, len(dg) - 1))]
    sender.sent.append(dg)
    return dg


@st.composite
def message(draw: Any, sender: Sender) -> tuple[bytes, int]:
    dgs = draw(st.lists(datagram(sender), min_size=1, max_size=6))
    if draw(st.booleans()):  # a GRO batch: one segment size, the last may be shorter
        seg = max(len(d) for d in dgs) or 1
        body = b"".join(d + bytes(seg - len(d)) for d in dgs[:-1]) + dgs[-1]
        return body, seg
    blob = b"".join(dgs)
    return blob, draw(st.sampled_from([len(blob), len(dgs[0]) or 1, 0]))


def _fresh() -> tuple[World, Twin, Sender]:
    """A new world per example: sessions and windows start clean."""
    world = World()
    world.rekey()
    return world, Twin(world), Sender(world)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_batches_agree(data: st.DataObject) -> None:
    world, twin, sender = _fresh()
    now = world.now + data.draw(st.sampled_from([0.0, 1.0, 179.0, 200.0]))
    udp = data.draw(st.booleans())
    forward = data.draw(st.booleans())
    for _ in range(data.draw(st.integers(1, 4))):
        msgs = data.draw(st.lists(message(sender), min_size=1, max_size=5))
        skip = frozenset(data.draw(st.sets(st.integers(0, len(msgs) - 1), max_size=1)))
        nat, ref = twin.run(msgs, now, udp, skip, forward)
        assert_same(nat, ref)
        cnt = nat["counters"]
        for name, hit in (("written", nat["writes"]), ("merged", cnt[openstate.C_MERGED]),
                          ("handshake rows", nat["result"][2])):  # fmt: skip
            if hit:
                event(name)
        for reason in DropReason:
            if cnt[C_DROPS + reason]:
                event(f"drop {reason.name}")


def _flow(sender: Sender, n: int, size: int = 1000, v6: bool = False, bad: int = -1,
          sport: int = 40000) -> list[bytes]:  # fmt: skip
    kp = sender.kps[1]
    out = []
    for i in range(n):
        pkt = tcp_packet(v6, 1 + i * size, payload_of(size, i), sport=sport, good_csum=i != bad)
        out.append(seal_with(kp, sender.next[1], pkt))
        sender.next[1] += 1
    return out


def test_bulk_flow_merges_identically_and_like_the_coalescer() -> None:
    world, twin, sender = _fresh()
    dgs = _flow(sender, 40) + _flow(sender, 10, v6=True) + _flow(sender, 30, sport=40001)
    nat, ref = twin.run([(d, len(d)) for d in dgs], world.now)
    assert_same(nat, ref)
    assert len(nat["writes"]) == 3
    # the writes are what io/coalesce.py makes of the decrypted packets
    pkts = []
    for i, sz in ((0, 40), (1, 10), (2, 30)):
        v6 = i == 1
        pkts += [tcp_packet(v6, 1 + k * 1000, payload_of(1000, k), sport=40000 + (i == 2))
                 for k in range(sz)]  # fmt: skip
    views = [memoryview(bytearray(10 + len(p))) for p in pkts]
    for v, p in zip(views, pkts, strict=True):
        v[10:] = p
    want = [bytes(v[:n]) for v, n in Coalescer().coalesce(views, [len(p) for p in pkts],
                                                           len(pkts))]  # fmt: skip
    assert nat["writes"] == want


def test_bad_checksum_dropped_counted_and_splits_the_run() -> None:
    world, twin, sender = _fresh()
    dgs = _flow(sender, 8, bad=3)
    nat, ref = twin.run([(b"".join(dgs), len(dgs[0]))], world.now)  # one GRO batch
    assert_same(nat, ref)
    assert nat["counters"][C_DROPS + DropReason.BAD_INNER_CHECKSUM] == 1
    assert nat["counters"][C_RX_PACKETS] == 8
    assert not any(payload_of(1000, 3) in w for w in nat["writes"])


def test_replay_in_one_batch_and_across_batches() -> None:
    world, twin, sender = _fresh()
    dgs = _flow(sender, 3)
    nat, ref = twin.run([(d, len(d)) for d in dgs + dgs[:1]], world.now)
    assert_same(nat, ref)
    assert nat["counters"][C_DROPS + DropReason.REPLAYED] == 1
    nat, ref = twin.run([(d, len(d)) for d in dgs], world.now)
    assert_same(nat, ref)
    assert nat["counters"][C_DROPS + DropReason.REPLAYED] == 3 and not nat["writes"]


def test_expired_session_and_unknown_index() -> None:
    world, twin, sender = _fresh()
    dgs = _flow(sender, 2)
    nat, ref = twin.run([(dgs[0], len(dgs[0]))], world.now + 180.0)
    assert_same(nat, ref)
    assert nat["counters"][C_DROPS + DropReason.KEY_EXPIRED] == 1
    bogus = dgs[1][:4] + b"\x01\x02\x03\x04" + dgs[1][8:]
    nat, ref = twin.run([(bogus, len(bogus))], world.now)
    assert_same(nat, ref)
    assert nat["counters"][C_DROPS + DropReason.UNKNOWN_INDEX] == 1


def test_handshakes_come_back_untouched() -> None:
    world, twin, sender = _fresh()
    init = bytes([1, 0, 0, 0]) + bytes(range(144))
    flow = _flow(sender, 2)
    nat, ref = twin.run([(flow[0] + init, len(flow[0])), (init, len(init))], world.now)
    assert_same(nat, ref)
    assert struct.unpack("<6I", nat["handshakes"]) == (0, len(flow[0]), 148, 1, 0, 148)


def test_a_merged_burst_of_initiation_sized_datagrams_is_dropped_whole() -> None:
    """Only initiations are 148 bytes and no honest peer sends a GRO burst of them (the
    kernel's initiation filter sees only the first): the whole message is one counted drop
    per datagram, none of it reaches the handshake lane."""
    world, twin, sender = _fresh()
    init = bytes([1, 0, 0, 0]) + bytes(144)
    flow = _flow(sender, 1)
    msgs = [(init * 5, 148), (init, 148), (flow[0], len(flow[0])), (init * 2 + b"x", 148)]
    nat, ref = twin.run(msgs, world.now)
    assert_same(nat, ref)
    cnt = nat["counters"]
    assert cnt[C_DROPS + DropReason.INITIATION_FLOOD] == 5 + 3
    assert cnt[C_RX_PACKETS] == 5 + 1 + 1 + 3
    assert nat["result"][2] == 1 and len(nat["writes"]) == 1  # the lone initiation, the packet


def test_unknown_indices_come_back_when_peers_moved_away() -> None:
    """With `forward` (the device gave sessions away in a placement move), a transport
    datagram under an index we do not know is handed back for the worker to pass on."""
    world, twin, sender = _fresh()
    flow = _flow(sender, 2)
    bogus = flow[1][:4] + b"\x01\x02\x03\x04" + flow[1][8:]
    nat, ref = twin.run([(flow[0], len(flow[0])), (bogus, len(bogus))], world.now, forward=True)
    assert_same(nat, ref)
    assert nat["counters"][C_DROPS + DropReason.UNKNOWN_INDEX] == 0
    assert struct.unpack("<3I", nat["handshakes"]) == (1, 0, len(bogus))
    assert len(nat["writes"]) == 1
