"""io/tun_steering.py: our eBPF steering programs, in the kernel and on a real multiqueue TUN.

The kernel runs both programs' bytecode on crafted packets (BPF_PROG_TEST_RUN) and must agree
with the Python models (`flow_hash`, `FlowQueues`); the hash must be symmetric and spread
flows; the turn program must give any run of new flows the queues in turn; and a real TUN in
a throwaway namespace must send each flow's outbound packets to the queue the program names
while it is attached, whichever queue wrote the flow's inbound packets, and go back to the
kernel's flow table (the writing queue) once it is detached."""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import time

import pytest

from lab.tuntest import ipv4_udp
from shardwg.io import netlink as nl
from shardwg.io import tun_steering as ts
from shardwg.io.tun import TunDevice, read_batch, write_packet

LOCAL, REMOTE = "10.200.0.1", "10.201.0.9"


def _ip4(src: str, dst: str, proto: int, sport: int, dport: int, frag: int = 0,
         ihl: int = 5) -> bytes:  # fmt: skip
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 60, 1, frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    hdr += bytes(max(0, 4 * ihl - 20))
    return hdr + struct.pack("!HH", sport, dport) + bytes(16)


def _ip6(src: str, dst: str, nxt: int, sport: int, dport: int) -> bytes:
    hdr = struct.pack("!IHBB16s16s", 6 << 28, 20, nxt, 64, socket.inet_pton(socket.AF_INET6, src),
                      socket.inet_pton(socket.AF_INET6, dst))  # fmt: skip
    return hdr + struct.pack("!HH", sport, dport) + bytes(16)


def _random_packets(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        a = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        b = f"fd00::{rng.randrange(1 << 16):x}:{rng.randrange(1 << 16):x}"
        proto = rng.choice([6, 17, 1, 58, 132])
        sp, dp = rng.randrange(1 << 16), rng.randrange(1 << 16)
        kind = rng.randrange(6)
        if kind == 0:
            out.append(_ip6(b, "fd00::1", proto, sp, dp))
        elif kind == 1:  # a fragment: more-fragments, or an offset
            out.append(_ip4(a, "10.9.0.2", proto, sp, dp, frag=rng.choice([0x2000, 0x0005])))
        elif kind == 2:  # options, or a bogus header length
            out.append(_ip4(a, "10.9.0.2", proto, sp, dp, ihl=rng.choice([0, 3, 6, 15])))
        elif kind == 3:  # cut short somewhere
            whole = [_ip4(a, "10.9.0.2", proto, sp, dp), _ip6(b, "fd00::2", proto, sp, dp)]
            pkt = rng.choice(whole)
            out.append(pkt[: rng.randrange(1, 44)])
        else:
            out.append(_ip4(a, "10.9.0.2", proto, sp, dp, frag=0x4000))  # DF: a whole packet
    return out


def _loaded(turns: bool = False, routes: dict[str, int] | None = None) -> int:
    """The stateless program, or the turn program (with `routes`: their trie filled)."""
    try:
        if routes is None:
            return ts.load_turns() if turns else ts.load()
        trie = ts.route_trie()
        try:
            for prefix, route in ts.trie_entries(routes).items():
                ts.trie_add(trie, prefix, route)
            return ts.load_turns(trie)
        finally:
            os.close(trie)  # the program keeps the trie
    except OSError as exc:
        pytest.skip(f"bpf(2) refused here: {exc}")


def test_the_kernel_runs_our_bytecode_as_the_model_says() -> None:
    fd = _loaded()
    try:
        rng = random.Random(12)
        packets = _random_packets(rng, 600) + [b"\x10" * 60]
        ran = 0
        for pkt in packets:
            if len(pkt) < (40 if pkt[0] >> 4 == 6 else 20):
                continue  # the test run wants a whole IP header (the TUN only has those)
            assert ts.run_once(fd, pkt) == ts.flow_hash(pkt), pkt.hex()
            ran += 1
        assert ran > 500
    finally:
        os.close(fd)


def test_the_kernel_hands_out_turns_as_the_model_says() -> None:
    """Random packets, each flow seen again at random: the kernel's maps and the model agree
    on every return value, known flows keep their turn, new ones take the next."""
    fd = _loaded(turns=True)
    try:
        rng = random.Random(21)
        fresh = [p for p in _random_packets(rng, 400) + [b"\x10" * 60]
                 if len(p) >= (40 if p[0] >> 4 == 6 else 20)]  # fmt: skip
        packets = fresh + [rng.choice(fresh) for _ in range(400)]
        rng.shuffle(packets)
        model = ts.FlowQueues()
        got = [ts.run_once(fd, p) for p in packets]
        assert got == [model(p) for p in packets]
        assert model.next > 300  # most were new flows, and they counted up
    finally:
        os.close(fd)


P, F = ts.PACKET_TURNS, ts.FLOW_TURNS
# a `Spread = packets` peer's prefixes (P), another peer's more specific route inside them
# (unspread: its owner's queue 1; spread: F), a spread peer's (F), an unspread one's (0)
ROUTES = {"10.99.0.0/24": P, "10.20.0.0/16": P, "10.20.5.0/24": 1, "10.20.6.0/24": F,
          "fd00::2/128": P, "fd00:9::/64": P, "fd00:9::/112": 0, "10.40.0.0/16": 0}  # fmt: skip
DEFAULT_V6 = {"::/0": P, "10.99.0.0/24": 1, "fd00:9::/64": F}


@pytest.mark.parametrize("routes", [ROUTES, DEFAULT_V6], ids=["subnets", "v6-default"])
def test_routes_come_first_as_the_model_says(routes: dict[str, int]) -> None:
    """The destination's longest match in the trie (IPv4 and IPv6) decides first: an owner's
    queue as it is, packet turns one by one whatever the flow, flow turns (or no match:
    with only ::/0 routed, every IPv4 packet, stored as ::ffff:a.b.c.d, for the trie's
    guard entry) as without the trie. The kernel and the model agree on every value."""
    fd = _loaded(routes=routes)
    try:
        rng = random.Random(33)
        fresh = [p for p in _random_packets(rng, 400)
                 if len(p) >= (40 if p[0] >> 4 == 6 else 20)]  # fmt: skip
        to_prefixes = [_ip4("10.0.0.1", f"10.99.0.{i}", 6, 1000 + i, 80) for i in range(9)]
        to_prefixes += [_ip4("10.0.0.1", f"10.20.{i}.7", 17, 5, 5) for i in range(9)]
        to_prefixes += [_ip6("fd00::1", f"fd00:9::{i:x}", 6, 7, 7) for i in range(9)]
        to_prefixes += [_ip4("10.0.0.1", f"10.20.{5 + i % 2}.{i}", 6, 9, i) for i in range(9)]
        to_prefixes += [_ip6("fd00::1", f"fd00:9::{i:x}:0", 6, 7, 7) for i in range(9)]
        to_prefixes += [_ip4("10.0.0.1", f"10.40.{i}.1", 17, 9, 9) for i in range(9)]
        near = [_ip4("10.0.0.1", "10.99.1.5", 6, 1, 2), _ip6("fd00::1", "fd00::3", 6, 1, 2),
                _ip6("fd00::1", "::ffff:10.99.0.4", 6, 1, 2)]  # fmt: skip
        packets = fresh + to_prefixes + near
        packets += [rng.choice(packets) for _ in range(600)]
        rng.shuffle(packets)
        model = ts.FlowQueues(routes)
        got = [ts.run_once(fd, p) for p in packets]
        assert got == [model(p) for p in packets]
        assert model.packet_next > 60 and model.next > 200  # both kinds of turn were taken
        assert {model._route(p) for p in packets} >= set(routes.values())  # every route
    finally:
        os.close(fd)


def test_one_flow_to_a_packet_prefix_alternates_until_the_prefix_goes() -> None:
    """The property `Spread = packets` is for: one TCP flow's packets go to the queues in
    turn (both of 2, all of 4); removed from the trie, the flow keeps one queue again."""
    try:
        trie = ts.route_trie()
    except OSError as exc:
        pytest.skip(f"bpf(2) refused here: {exc}")
    try:
        fd = ts.load_turns(trie)
        flow = _ip4("10.0.0.1", "10.9.0.5", 6, 40000, 5201, frag=0x4000)
        other = _ip4("10.0.0.1", "10.8.0.5", 6, 40000, 5201, frag=0x4000)
        ts.trie_add(trie, "10.9.0.0/24")
        for queues in (2, 4):
            assert [ts.run_once(fd, flow) % queues for _ in range(4 * queues)] == list(
                range(queues)
            ) * 4
        assert len({ts.run_once(fd, other) for _ in range(8)}) == 1
        ts.trie_remove(trie, "10.9.0.0/24")
        assert len({ts.run_once(fd, flow) for _ in range(8)}) == 1
        os.close(fd)
    finally:
        os.close(trie)


def test_an_unspread_peers_route_sends_its_packets_to_its_owner() -> None:
    """A `Spread = packets` peer with the default routes, an unspread peer's 10.1.0.0/16 on
    owner 1 and a spread peer's 10.3.0.0/16: every packet to 10.1.2.3 goes to queue 1
    whatever its flow, a flow to 10.3.0.9 keeps one queue, one to 10.2.0.5 or fd00::5
    alternates. With ::/0 alone routed, an IPv4 flow keeps one queue (the guard entry)."""
    flow = {a: _ip4("10.0.0.1", a, 6, 40000, 5201) for a in ("10.1.2.3", "10.2.0.5", "10.3.0.9")}
    flow["fd00::5"] = _ip6("fd00::1", "fd00::5", 6, 40000, 5201)
    other = _ip4("10.0.0.1", "10.1.2.3", 17, 9, 9)
    fd = _loaded(routes={"0.0.0.0/0": P, "::/0": P, "10.1.0.0/16": 1, "10.3.0.0/16": F})
    try:
        assert {ts.run_once(fd, p) for p in [flow["10.1.2.3"], other] * 3} == {1}
        assert len({ts.run_once(fd, flow["10.3.0.9"]) for _ in range(6)}) == 1
        assert len({ts.run_once(fd, flow["10.2.0.5"]) for _ in range(6)}) == 6
        assert len({ts.run_once(fd, flow["fd00::5"]) for _ in range(6)}) == 6
    finally:
        os.close(fd)
    fd = _loaded(routes={"::/0": P})
    try:
        assert len({ts.run_once(fd, flow["10.2.0.5"]) for _ in range(6)}) == 1
        assert len({ts.run_once(fd, flow["fd00::5"]) for _ in range(6)}) == 6
    finally:
        os.close(fd)


def test_steering_keeps_its_trie_as_told_and_refills_it_on_attach() -> None:
    """TunSteering.set_routes while attached and while not, detach and attach again:
    the attached trie holds exactly the prefixes last told (on a TUN-less fd the attach
    ioctl fails, so the check is on the maps TunSteering keeps)."""
    steer = ts.TunSteering(-1)
    steer.set_routes({"10.9.0.0/24": P})
    assert steer.in_trie == {}  # not attached: nothing to fill
    try:
        trie = ts.route_trie()
    except OSError as exc:
        pytest.skip(f"bpf(2) refused here: {exc}")
    steer._trie = trie  # as _attach leaves it
    steer._sync()
    assert steer.in_trie == {"10.9.0.0/24": P, ts.V4_GUARD: F}
    told = {"fd00:9::/64": P, "10.20.0.0/16": P, "10.20.3.0/24": 1}
    steer.set_routes(told)
    assert steer.in_trie == {**told, ts.V4_GUARD: F}
    fd = ts.load_turns(trie)
    try:
        def queues(dst: str) -> set[int]:
            return {ts.run_once(fd, _ip4("1.1.1.1", dst, 6, 1, 2)) for _ in range(4)}

        assert len(queues("10.20.4.4")) == 4 and len(queues("10.9.0.4")) == 1
        assert queues("10.20.3.4") == {1}
        steer.set_routes({**told, "10.20.3.0/24": 0})  # a peer moved: its route changes
        assert queues("10.20.3.4") == {0}
    finally:
        os.close(fd)
        steer._drop_trie()
    assert steer.in_trie == {} and steer.routes == {**told, "10.20.3.0/24": 0}


@pytest.mark.parametrize("queues", [2, 4, 16])
def test_new_flows_take_the_queues_in_turn_whatever_their_ports(queues: int) -> None:
    """By hash, 4 flows on 2 queues all land on one 1 time in 8 and 16 flows use about 10 of
    16 queues; in turn, every run of `queues` new flows uses each queue once."""
    fd = _loaded(turns=True)
    try:
        rng = random.Random(queues)
        unused = list(range(1024, 65536))
        rng.shuffle(unused)  # ports not used before: every trial's flows are new
        for _trial in range(20):
            ports = [unused.pop() for _ in range(queues)]
            flows = [_ip4("10.0.0.1", "10.0.0.2", 6, sp, 5201, frag=0x4000) for sp in ports]
            turns = [ts.run_once(fd, p) % queues for p in flows]
            assert sorted(turns) == list(range(queues)), turns
            assert [ts.run_once(fd, p) % queues for p in flows] == turns  # they keep them
    finally:
        os.close(fd)


def test_the_hash_is_symmetric_and_spreads_flows() -> None:
    rng = random.Random(7)
    queues: dict[int, list[int]] = {2: [0, 0], 4: [0, 0, 0, 0]}
    for _ in range(256):
        sp, dp = rng.randrange(1024, 65536), 5201
        fwd = _ip4("10.0.0.1", "10.0.0.2", 6, sp, dp, frag=0x4000)
        back = _ip4("10.0.0.2", "10.0.0.1", 6, dp, sp, frag=0x4000)
        assert ts.flow_hash(fwd) == ts.flow_hash(back)
        six = _ip6("fd00::1", "fd00::2", 17, sp, dp)
        assert ts.flow_hash(six) == ts.flow_hash(_ip6("fd00::2", "fd00::1", 17, dp, sp))
        for n, seen in queues.items():
            seen[ts.flow_hash(fwd) % n] += 1
    assert min(queues[2]) >= 96 and min(queues[4]) >= 40, queues
    # addresses alone (no ports: ICMP) spread too, also when they differ in high bits only
    hosts = [_ip4(f"10.{i}.0.1", "10.0.0.2", 1, 0, 0) for i in range(64)]
    assert 16 <= sum(ts.flow_hash(p) % 2 for p in hosts) <= 48


def _replies_by_queue(dev: TunDevice, sock: socket.socket, ports: range) -> dict[int, int]:
    """For each source port: the remote host's datagram written on queue 0, our socket's
    reply read back; the queue the reply came out of."""
    out: dict[int, int] = {}
    bufs = [bytearray(2048) for _ in range(16)]
    sizes = [0] * 16
    for sp in ports:
        assert write_packet(dev.fds[0], ipv4_udp(REMOTE, LOCAL, sp, 7000, b"in"))
        _data, addr = sock.recvfrom(64)
        sock.sendto(b"out", addr)
    deadline = time.monotonic() + 5
    while len(out) < len(ports) and time.monotonic() < deadline:
        ready, _, _ = select.select(dev.fds, [], [], 0.5)
        for fd in ready:
            for i in range(read_batch(fd, bufs, sizes, 16)):
                pkt = bytes(bufs[i][: sizes[i]])
                if pkt[0] >> 4 == 4 and pkt[9] == 17 and pkt[16:20] == socket.inet_aton(REMOTE):
                    out[int.from_bytes(pkt[22:24], "big")] = dev.fds.index(fd)
                    assert ts.flow_hash(pkt) == ts.flow_hash(
                        ipv4_udp(REMOTE, LOCAL, int.from_bytes(pkt[22:24], "big"), 7000, b"")
                    )
    assert len(out) == len(ports), out
    return out


def _tun_and_socket(name: str) -> tuple[TunDevice, socket.socket, ts.TunSteering]:
    """A 2-queue TUN routing the remote's /24, a UDP socket on our address, and the
    steering of the TUN (any queue's fd names the device)."""
    dev = TunDevice.create(name, queues=2)
    nl.set_link_up(name, 1420)
    nl.add_addresses(name, [f"{LOCAL}/24"])
    nl.add_routes(name, ["10.201.0.0/24"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCAL, 7000))
    sock.settimeout(5)
    return dev, sock, ts.TunSteering(dev.fds[1])


def _steer_a_real_tun(hash_only: bool) -> dict[str, object]:
    if hash_only:  # a kernel that refuses the turn program
        def refused(routes_fd: int = -1) -> int:
            raise OSError(22, "refused, as by an old kernel")

        ts.load_turns = refused
    dev, sock, steer = _tun_and_socket("tq0")
    try:
        before = _replies_by_queue(dev, sock, range(40000, 40032))
        # the remote's peer, unspread, owned by worker 1: routed there, though queue 0
        # wrote the flows (what the kernel's flow table goes by)
        steer.set_routes({"10.201.0.0/24": 1})
        unspread = steer.set(False)
        routed = _replies_by_queue(dev, sock, range(43000, 43032))
        steer.set_routes({"10.201.0.0/24": ts.FLOW_TURNS})  # now it is spread
        spread = steer.set(True)
        kind = steer.kind
        steered = _replies_by_queue(dev, sock, range(41000, 41032))
        want = {sp: ts.flow_hash(ipv4_udp(LOCAL, REMOTE, 7000, sp, b"")) % 2 for sp in steered}
        steer.set_routes({"10.201.0.0/24": 1})
        again = steer.set(False)
        after = _replies_by_queue(dev, sock, range(42000, 42032))
    finally:
        sock.close()
        dev.close()
    return {"before": set(before.values()), "unspread": unspread, "routed": set(routed.values()),
            "spread": spread, "kind": kind, "steered": steered, "want": want, "again": again,
            "after": set(after.values())}  # fmt: skip


@pytest.mark.netns
@pytest.mark.parametrize("hash_only", [False, True], ids=["turns", "hash-fallback"])
def test_a_real_tun_steers_by_routes_and_turns(  # type: ignore[no-untyped-def]
    netns_factory, hash_only: bool
) -> None:
    """The turn program steers for good once loaded: an unspread peer's packets to its
    owner's queue, a spread peer's flows in turn. Where the kernel refuses it, the hash
    program steers only while a peer is spread, the kernel's flow table otherwise."""
    (ns,) = netns_factory(1)
    r = ns.call(_steer_a_real_tun, hash_only)
    assert r["before"] == {0}  # the kernel's flow table: the queue that wrote the flow
    assert r["spread"] is True and r["kind"] == ("hash" if hash_only else "turns")
    queues = [q for _sp, q in sorted(r["steered"].items())]
    if hash_only:
        assert r["unspread"] is False and r["routed"] == {0}  # no routes: the flow table
        assert r["steered"] == r["want"]  # the hash, not the writing queue
        assert r["again"] is False and r["after"] == {0}  # detached: the flow table again
    else:
        assert r["unspread"] is True and r["routed"] == {1}  # the owner's queue
        # each new flow the next queue: the 32 replies alternate (a stray packet of the
        # kernel's own, an IPv6 router solicitation say, may take one turn in between);
        # by hash about half of the neighbours would share a queue
        changes = sum(a != b for a, b in zip(queues, queues[1:], strict=False))
        assert changes >= 28, queues
        assert r["again"] is True and r["after"] == {1}  # still attached, routed again
    assert set(queues) == {0, 1}


def _one_flow_queues(packets: bool) -> list[int]:
    """One UDP flow's 16 replies through a real 2-queue TUN with the turn program attached
    (and, if `packets`, the remote's prefix in its trie): the queue each came out of."""
    dev, sock, steer = _tun_and_socket("tq1")
    out: list[int] = []
    bufs = [bytearray(2048) for _ in range(16)]
    sizes = [0] * 16
    try:
        assert steer.set(True) and steer.kind == "turns"
        steer.set_routes({"10.201.0.0/24": P} if packets else {})
        assert write_packet(dev.fds[0], ipv4_udp(REMOTE, LOCAL, 40000, 7000, b"in"))
        _data, addr = sock.recvfrom(64)
        for _ in range(16):
            sock.sendto(b"out", addr)
            deadline = time.monotonic() + 5
            got = False
            while not got and time.monotonic() < deadline:
                for fd in select.select(dev.fds, [], [], 0.5)[0]:
                    for i in range(read_batch(fd, bufs, sizes, 16)):
                        pkt = bytes(bufs[i][: sizes[i]])
                        if pkt[0] >> 4 == 4 and pkt[16:20] == socket.inet_aton(REMOTE):
                            out.append(dev.fds.index(fd))
                            got = True
    finally:
        steer.set(False)
        sock.close()
        dev.close()
    return out


@pytest.mark.netns
def test_a_real_tun_spreads_one_flow_to_a_packet_prefix(netns_factory) -> None:  # type: ignore[no-untyped-def]
    """`Spread = packets` on a real TUN: one flow's replies alternate between the two
    queues; without the prefix the same flow keeps one queue."""
    (ns,) = netns_factory(1)
    spread = ns.call(_one_flow_queues, True)
    whole = ns.call(_one_flow_queues, False)
    assert len(spread) == 16 and len(whole) == 16
    assert sum(a != b for a, b in zip(spread, spread[1:], strict=False)) >= 13, spread
    assert len(set(whole)) == 1, whole
