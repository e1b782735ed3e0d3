"""Hostile traffic against a real gateway (2 workers) while an honest wireguard-go peer works.

Topology: build_site's gateway and one peer (veth0 in the gateway namespace), plus a hostile
namespace on a second veth into the gateway namespace (`hveth` 10.98.0.1/24 <-> 10.98.0.2).
Every datagram on `hveth` is hostile and every one on `veth0` honest, so the kernel's own
interface counters split what the gateway received without trusting the gateway. The hostile
side replays and mutates transport datagrams captured from the honest flow with an AF_PACKET
socket on the gateway's `veth0`.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from test_sharding import Site, build_site

from lab import hostile as H
from lab.harness import Harness
from lab.netns import Namespace, veth_link
from lab.ping import icmp_echo, ping
from lab.transfer import Transfer
from shardwg.observe.status import GatewayStatus, read_status
from shardwg.proto.constants import INITIATION_SIZE, MessageType

pytestmark = [pytest.mark.interop, pytest.mark.netns]

GW_PORT = 51820
HOSTILE_GW = "10.98.0.1"
HOSTILE_ADDR = "10.98.0.2"
# drop reasons a datagram arriving from the network can earn (the rest are outbound)
RX_REASONS = (
    "too_short", "bad_type", "bad_size", "bad_mac1", "cookie_required", "rate_limited",
    "handshake_decrypt", "unknown_peer", "stale_timestamp", "initiation_flood", "unknown_index",
    "decrypt_failed", "replayed", "key_expired", "bad_inner_packet", "source_not_allowed",
    "bad_cookie_reply", "unexpected_response", "internal_error", "handshake_queue_full",
)  # fmt: skip


@dataclass
class Hostile:
    site: Site
    ns: Namespace


def add_hostile(harness: Harness, site: Site, label: str = "hx") -> Hostile:
    """A hostile namespace with its own veth into the gateway namespace."""
    ns = harness(1, label)[0]
    veth_link(site.gw_ns, ns, [f"{HOSTILE_GW}/24"], [f"{HOSTILE_ADDR}/24"],
              name_a="hveth", name_b="eth0")  # fmt: skip
    return Hostile(site, ns)


@dataclass
class Snapshot:
    status: GatewayStatus
    net: dict[str, int]

    @property
    def rx_packets(self) -> int:
        return sum(w.rx_packets for w in self.status.worker_stats)

    def drops(self) -> dict[str, int]:
        return dict(self.status.drops_total)


def snapshot(site: Site, ifnames: tuple[str, ...] = ("veth0", "hveth")) -> Snapshot:
    return Snapshot(
        read_status(site.gw.ifname, interval=0), site.gw_ns.call(H.net_counters, list(ifnames))
    )


def drop_delta(after: Snapshot, before: Snapshot) -> dict[str, int]:
    b = before.drops()
    return {k: v - b.get(k, 0) for k, v in after.drops().items() if v - b.get(k, 0)}


def settle_counters() -> None:
    """Workers publish counters within 5 ms (tests/test_worker.py) and the kernel drains
    socket queues at once; a pause lets the last datagrams be counted."""
    time.sleep(1.0)


def capture_during(
    site: Site, count: int, traffic: Any, seconds: float = 15, initiations: bool = False
) -> list[bytes]:
    """Run traffic() while an AF_PACKET socket on the gateway's veth0 captures up to `count`
    transport datagrams (data only, no keepalives), or handshake initiations, arriving from
    the peer."""
    box: dict[str, Any] = {}
    if initiations:
        what: tuple[Any, ...] = (H.capture_messages, "veth0", GW_PORT, MessageType.INITIATION,
                                 count, seconds, INITIATION_SIZE)  # fmt: skip
    else:
        what = (H.capture_transports, "veth0", GW_PORT, count, seconds)

    def cap() -> None:
        try:
            box["got"] = site.gw_ns.call(*what, timeout=seconds + 10)
        except BaseException as e:  # noqa: BLE001 - reported below
            box["err"] = e

    th = threading.Thread(target=cap, daemon=True)
    th.start()
    time.sleep(0.7)  # the sniffer is bound before the traffic starts
    traffic()
    th.join(timeout=seconds + 15)
    if "err" in box:
        raise box["err"]
    got: list[bytes] = box.get("got", [])
    return got


def hostile_payloads(rng: random.Random, captured: list[bytes]) -> dict[str, list[bytes]]:
    """The mix, by kind (each list is sent cyclically)."""
    indices = {H.receiver_index(d) for d in captured}
    return {
        "random bytes": H.random_garbage(rng, 2000),
        "wrong sizes / types": H.wrong_sizes(rng),
        "initiation, bad mac1": H.bad_mac1_initiations(rng, 400),
        "response, bad mac1": H.bad_mac1_responses(rng, 200),
        "cookie reply, unknown index": H.unknown_index_cookie_replies(rng, 200),
        "transport, unknown index": H.unknown_index_transports(rng, 2000, avoid=indices),
        "captured, replayed as-is": list(captured),
        "captured, mutated": H.mutate_transports(rng, captured),
    }


def test_million_hostile_datagrams_during_honest_transfer(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    hx = add_hostile(netns_factory, site)
    peer_ns = site.peers[0][0]
    try:
        assert ping(peer_ns, "10.0.0.1", count=2, timeout=10), site.gw.log_text()

        def warmup() -> None:
            Transfer(site.gw_ns, peer_ns, "10.0.0.1", 6200, 2 << 20, seed=3).run()

        captured = capture_during(site, 300, warmup)
        assert len(captured) >= 100, f"captured only {len(captured)} transport datagrams"
        kinds = hostile_payloads(random.Random(20240601), captured)
        payloads = [p for ps in kinds.values() for p in ps]
        random.Random(5).shuffle(payloads)
        target = 1_000_000
        settle_counters()  # the warm-up's last datagrams counted before, not in, the blast
        before = snapshot(site)
        size = 30 * 1024 * 1024
        transfer = Transfer(site.gw_ns, peer_ns, "10.0.0.1", 6201, size, seed=11, timeout=150)
        client = transfer.start_client()
        t0 = time.monotonic()
        blast = hx.ns.call(H.blast, HOSTILE_GW, GW_PORT, payloads, target, sources=8,
                           rate=100_000, max_seconds=45, timeout=70)  # fmt: skip
        result = transfer.finish(client)
        elapsed = time.monotonic() - t0
        settle_counters()
        after = snapshot(site)

        assert site.gw.proc.poll() is None, site.gw.log_text()
        workers = after.status.worker_stats
        assert all(w.alive for w in workers) and all(w.restarts == 0 for w in workers), "\n".join(
            line for line in site.gw.log_text().splitlines() if "WARNING" in line or "ERROR" in line
        )
        assert result.received_bytes == size and result.ok, result

        net = H.diff(after.net, before.net)
        drops = drop_delta(after, before)
        rx_dropped = sum(drops.get(r, 0) for r in RX_REASONS)
        rx = after.rx_packets - before.rx_packets
        hostile_wire = net["hveth.rx_packets"]
        honest_wire = net["veth0.rx_packets"]
        kernel_drops = net["Udp.RcvbufErrors"]
        own_kernel_drops = sum(w.kernel_drops for w in after.status.worker_stats) - sum(
            w.kernel_drops for w in before.status.worker_stats
        )
        honest_accepted = rx - rx_dropped
        lost = size - result.received_bytes
        slack = 50  # ARP and similar frames on either veth
        lines = [
            f"hostile datagrams tried       {blast.tried:>10}  ({blast.seconds:.1f} s, "
            f"{blast.rate / 1000:.0f} k/s, {len(payloads)} distinct payloads)",
            f"  accepted by the sender kernel {blast.sent:>8}",
            f"  arrived on hveth            {hostile_wire:>10}",
            f"  dropped by the kernel (rcvbuf, hostile and honest) {kernel_drops}; the "
            f"gateway's kernel_drops counter says {own_kernel_drops}",
            f"  received by the gateway     {rx - honest_accepted:>10}",
            f"  dropped by the gateway      {rx_dropped:>10}",
            *(f"    {k:<24}{v:>10}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])),
            f"honest datagrams on veth0     {honest_wire:>10}, accepted {honest_accepted}",
            f"honest transfer               {result.received_bytes} of {size} bytes in "
            f"{result.seconds:.1f} s ({result.mbit_s:.0f} Mbit/s), sha256 "
            f"{'ok' if result.ok else 'MISMATCH'}; honest bytes lost {lost}",
            f"payload kinds: {', '.join(f'{k} {len(v)}' for k, v in kinds.items())}",
            f"wall time {elapsed:.1f} s",
            "kernel: " + ", ".join(f"{k} {v}" for k, v in sorted(net.items()) if v),
        ]
        print("\n" + "\n".join(lines))

        assert blast.tried == target and blast.sent >= target * 0.99, blast
        # the gateway's own kernel_drops counter (SO_MEMINFO on its sockets) sees the receive
        # buffer drops, plus any initiations its filter shed had under-load engaged
        assert own_kernel_drops >= kernel_drops, (own_kernel_drops, kernel_drops)
        kernel_drops = own_kernel_drops
        # every datagram the gateway read was counted once: hostile by reason, honest accepted
        assert rx + kernel_drops <= hostile_wire + honest_wire + slack
        assert rx + kernel_drops >= hostile_wire + honest_wire - slack
        # every hostile datagram that reached the gateway's sockets is a counted drop...
        assert rx_dropped >= hostile_wire - kernel_drops - slack, (rx_dropped, hostile_wire)
        # ...and no honest one was dropped (drops never exceed what the attacker delivered)
        assert rx_dropped <= hostile_wire, (rx_dropped, hostile_wire)
        assert honest_accepted >= honest_wire - kernel_drops - slack
        for reason in ("too_short", "bad_type", "bad_size", "bad_mac1", "unknown_index",
                       "replayed", "decrypt_failed"):  # fmt: skip
            assert drops.get(reason, 0) > 0, (reason, drops)
        assert drops.get("internal_error", 0) == 0, drops
        # replayed datagrams never moved the peer's endpoint to the attacker
        peer = after.status.peers[0]
        assert peer.endpoint == "10.99.0.2:51821", peer.endpoint
        assert ping(peer_ns, "10.0.0.1", count=3, timeout=10)
    finally:
        assert site.gw.stop() == 0


def _replay(hx: Hostile, datagrams: list[bytes]) -> H.BlastResult:
    """Send datagrams once each, slowly (no kernel drops), from the hostile namespace."""
    res: H.BlastResult = hx.ns.call(H.blast, HOSTILE_GW, GW_PORT, datagrams, len(datagrams),
                                    sources=1, rate=500, max_seconds=20)  # fmt: skip
    return res


def _echoes(site: Site) -> int:
    counters: dict[str, int] = site.gw_ns.call(H.snmp, "Icmp")
    return counters["InEchos"]


def test_replayed_transport_is_never_delivered(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    hx = add_hostile(netns_factory, site)
    peer_ns, peer_wg, _kp = site.peers[0]
    try:
        assert ping(peer_ns, "10.0.0.1", count=2, timeout=10), site.gw.log_text()
        n = 20

        def pings() -> None:
            assert peer_ns.call(icmp_echo, "10.0.0.1", n, 10, 0.05, timeout=20) == n

        captured = capture_during(site, n, pings)
        assert len(captured) == n, len(captured)
        counters = [H.transport_counter(d) for d in captured]
        assert counters == sorted(counters)
        rows: list[tuple[str, int, dict[str, int], int, int]] = []

        def phase(name: str, datagrams: list[bytes], expect: tuple[str, ...]) -> None:
            before, echoes0 = snapshot(site), _echoes(site)
            res = _replay(hx, datagrams)
            settle_counters()
            after, echoes1 = snapshot(site), _echoes(site)
            drops = drop_delta(after, before)
            rx = after.rx_packets - before.rx_packets
            rows.append((name, res.sent, drops, rx, echoes1 - echoes0))
            assert res.sent == len(datagrams)
            # the honest peer's own keepalives may land in the same window; they are no drops
            assert len(datagrams) <= rx <= len(datagrams) + 3, (name, rx, drops)
            assert sum(drops.get(r, 0) for r in expect) == len(datagrams), (name, drops)
            assert echoes1 == echoes0, f"{name}: replayed echo requests reached the gateway"

        phase("in order", captured, ("replayed",))
        phase("reversed", captured[::-1], ("replayed",))
        shuffled = captured[:]
        random.Random(3).shuffle(shuffled)
        phase("shuffled, 5 copies each", shuffled * 5, ("replayed",))
        # forged counters far ahead fail authentication and must not advance the window
        rng = random.Random(9)
        mutated = H.mutate_transports(rng, captured[:5])
        before = snapshot(site)
        _replay(hx, mutated)
        settle_counters()
        m_drops = drop_delta(snapshot(site), before)
        assert sum(m_drops.values()) == len(mutated), m_drops
        # each original gave one counter-ahead forgery: it fails authentication (and the
        # "after 50 newer packets" phase below shows the window did not jump ahead)
        assert m_drops.get("decrypt_failed", 0) == 5, m_drops
        rows.append(("mutated", len(mutated), m_drops, len(mutated), 0))
        # the session moves on: 50 more echoes, then the old datagrams again
        assert peer_ns.call(icmp_echo, "10.0.0.1", 50, 10, 0.02, timeout=20) == 50
        phase("after 50 newer packets", shuffled, ("replayed",))
        # a new handshake: the captured datagrams belong to an older session now
        hs0 = peer_wg.latest_handshake(site.gw_keys[1])
        time.sleep(1.1)  # latest-handshake has one-second resolution

        def new_handshake() -> None:
            peer_wg.set_peer(site.gw_keys[1], remove=True)
            peer_wg.set_peer(site.gw_keys[1], allowed_ips=["10.0.0.0/24"],
                             endpoint=f"10.99.0.1:{GW_PORT}")  # fmt: skip
            assert ping(peer_ns, "10.0.0.1", count=2, timeout=10)

        initiation = capture_during(site, 1, new_handshake, seconds=10, initiations=True)
        assert peer_wg.latest_handshake(site.gw_keys[1]) > hs0
        assert len(initiation) == 1, initiation
        phase("after a new handshake", shuffled, ("replayed", "unknown_index", "key_expired"))
        # the honest initiation itself, replayed: its timestamp is not newer, so no response
        # goes to the attacker, and the session and the endpoint stay
        hs1 = peer_wg.latest_handshake(site.gw_keys[1])
        phase("initiation, 5 copies", initiation * 5, ("stale_timestamp", "initiation_flood"))
        assert ping(peer_ns, "10.0.0.1", count=2, timeout=10)
        assert peer_wg.latest_handshake(site.gw_keys[1]) == hs1
        status = read_status(site.gw.ifname, interval=0)
        assert status.peers[0].endpoint == "10.99.0.2:51821", status.peers[0].endpoint
        assert ping(peer_ns, "10.0.0.1", count=3, timeout=10)
        print("\nreplay phase             sent  gateway rx  echo requests delivered  drops")
        for name, sent, drops, rx, echoes in rows:
            print(f"  {name:<24}{sent:>4}{rx:>12}{echoes:>25}  {drops}")
    finally:
        assert site.gw.stop() == 0


def test_empty_datagrams_are_counted(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    hx = add_hostile(netns_factory, site)
    try:
        assert ping(site.peers[0][0], "10.0.0.1", count=1, timeout=10), site.gw.log_text()
        before = snapshot(site)
        sent = hx.ns.call(H.blast, HOSTILE_GW, GW_PORT, [b""], 1000, sources=4, rate=5000).sent
        settle_counters()
        after = snapshot(site)
        drops = drop_delta(after, before)
        rx = after.rx_packets - before.rx_packets
        arrived = H.diff(after.net, before.net)["hveth.rx_packets"]
        print(f"\n{sent} empty datagrams sent, {arrived} arrived, gateway rx {rx}, drops {drops}")
        assert sent == 1000 and arrived >= 1000
        assert drops.get("too_short", 0) == 1000 and rx >= 1000, (rx, drops)
    finally:
        assert site.gw.stop() == 0
