"""The inbound kernel's state buffers follow the device: sessions come and go, allowed IPs
change, the table grows, and every Keypair's replay window stays the live one."""

from __future__ import annotations

import struct

from open_world import World, seal_with
from test_segment import payload_of, tcp_packet

from shardwg.datapath import open_ref
from shardwg.datapath.openstate import C_DROPS, OpenState, batch_arrays, build_allowed
from shardwg.proto.constants import DropReason
from shardwg.proto.keypair import Keypair


def _open(state: OpenState, world: World, dgs: list[bytes], now: float | None = None) -> dict:
    state.sync(world.a)
    stride = max(len(d) for d in dgs)
    data = bytearray(stride * len(dgs))
    for i, d in enumerate(dgs):
        data[i * stride : i * stride + len(d)] = d
    a = batch_arrays(len(data))
    nw, nt, nh = open_ref.open_batch(
        state.keys, state.sessions, state.index, state.allowed, data, stride,
        [len(d) for d in dgs], [len(d) for d in dgs], len(dgs), a["dec"], a["out"],
        a["spans"], a["touched"], a["handshakes"], a["counters"],
        world.now if now is None else now, False,
    )  # fmt: skip
    cnt = struct.unpack_from(f"<{len(a['counters']) // 8}Q", a["counters"])
    return {"writes": nw, "touched": nt, "drops": {DropReason(i): c for i, c in
                                                   enumerate(cnt[C_DROPS:]) if c}}  # fmt: skip


def test_sessions_allowed_ips_and_release_follow_the_device() -> None:
    world = World()
    state = OpenState(open_ref.RefKeys())
    kp = world.peer_a.current
    pkt = tcp_packet(False, 1, payload_of(100))
    got = _open(state, world, [seal_with(kp, 10, pkt)])
    assert got["writes"] == 1 and not got["drops"]
    mine = world.peer_b.next
    assert mine is not None and mine.replay.buf is state.sessions and mine.replay.highest == 10
    world.a.set_allowed_ips(world.peer_b, ["10.99.0.0/16"])
    got = _open(state, world, [seal_with(kp, 11, pkt)])
    assert got["drops"] == {DropReason.SOURCE_NOT_ALLOWED: 1}
    world.peer_b.zero_keys()
    got = _open(state, world, [seal_with(kp, 12, pkt)])
    assert got["drops"] == {DropReason.UNKNOWN_INDEX: 1}
    # it kept its own copy of the window (11 authenticated, though its source was refused)
    assert mine.replay.buf is not state.sessions and mine.replay.highest == 11
    assert state.kps == [None] * state.capacity


def test_table_grows_and_windows_move_with_it() -> None:
    world = World()
    state = OpenState(open_ref.RefKeys(), capacity=2)
    extra = []
    for i in range(40):
        k = Keypair(bytes(32), bytes([i + 1]) * 32, 0x1000 + (i << 8), i, False, world.now)
        k.peer = world.peer_b
        k.replay.accept(1000 + i)
        world.a.table.restore(k)
        extra.append(k)
    state.sync(world.a)
    assert state.capacity >= 41
    for k in extra:
        assert k.replay.buf is state.sessions and k.replay.highest == 1000 + extra.index(k)
    kp = world.peer_a.current
    got = _open(state, world, [seal_with(kp, 3, tcp_packet(False, 1, payload_of(10)))])
    assert got["writes"] == 1


def test_allowed_ranges_are_the_longest_prefix_match() -> None:
    import ipaddress

    from shardwg.proto.allowedips import AllowedIPs

    trie: AllowedIPs[int] = AllowedIPs()
    for net, pid in (("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.3/32", 1), ("::/0", 3),
                     ("fd00::/64", 2), ("0.0.0.0/1", 4)):  # fmt: skip
        trie.insert(net, pid)
    buf = build_allowed(list(trie.items()), lambda a: trie.lookup_v4(a) or 0,
                        lambda a: trie.lookup_v6(a) or 0)  # fmt: skip
    ranges = open_ref._Allowed(buf)
    for addr in ("9.255.255.255", "10.0.0.0", "10.1.2.2", "10.1.2.3", "10.1.2.4", "10.2.0.0",
                 "127.0.0.1", "128.0.0.0", "255.255.255.255", "0.0.0.0"):  # fmt: skip
        a = int(ipaddress.IPv4Address(addr))
        assert ranges.v4(a) == (trie.lookup_v4(a) or 0), addr
    for addr in ("::", "fd00::1", "fd00:0:0:1::", "fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"):
        a = int(ipaddress.IPv6Address(addr))
        assert ranges.v6(a >> 64, a & (2**64 - 1)) == (trie.lookup_v6(a) or 0), addr
