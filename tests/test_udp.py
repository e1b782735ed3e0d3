"""shardwg.io.udp (in a namespace's loopback), and the wireguard-go interop baseline."""

from __future__ import annotations

import errno
import socket

import pytest

from lab.keys import keypair
from lab.netns import veth_link, wait_for
from lab.ping import ping
from shardwg.io import udp
from shardwg.io.udp import UdpStats, open_udp_group, recv_batch, send_to, sockaddr_bytes


def _buffers(n: int) -> tuple[list[bytearray], list[memoryview], list[int], list[object]]:
    bufs = [bytearray(2048) for _ in range(n)]
    return bufs, [memoryview(b) for b in bufs], [0] * n, [None] * n


def _group_props() -> dict[str, object]:
    v4, v6, port = open_udp_group(0, 2, fwmark=0x51)
    try:
        return {
            "n": (len(v4), len(v6)),
            "port": port,
            "ports": {s.getsockname()[1] for s in v4 + v6},
            "blocking": [s.getblocking() for s in v4 + v6],
            "reuseport": [s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in v4 + v6],
            "v6only": [s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) for s in v6],
            "mark": [s.getsockopt(socket.SOL_SOCKET, udp.SO_MARK) for s in v4 + v6],
            "rcvbuf": min(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in v4 + v6),
        }
    finally:
        for s in v4 + v6:
            s.close()


@pytest.mark.netns
def test_group_properties(netns_factory) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(_group_props)
    assert r["n"] == (2, 2) and r["port"] != 0 and r["ports"] == {r["port"]}
    assert r["blocking"] == [False] * 4 and all(r["reuseport"]) and all(r["v6only"])
    assert r["mark"] == [0x51] * 4
    assert r["rcvbuf"] >= 4 << 20  # SO_RCVBUFFORCE as root beats rmem_max


def _batches() -> dict[str, object]:
    out: dict[str, object] = {}
    v4, v6, port = open_udp_group(0, 2)
    clients = []
    try:
        for i in range(10):
            fam, host = (socket.AF_INET, "127.0.0.1") if i % 2 else (socket.AF_INET6, "::1")
            c = socket.socket(fam, socket.SOCK_DGRAM)
            clients.append(c)
            c.sendto(b"dgram-%d" % i, (host, port))
        bufs, views, sizes, addrs = _buffers(4)
        got: list[tuple[bytes, object]] = []
        per_socket = []
        for s in v4 + v6:
            first = True
            for _ in range(10):  # bounded drain
                n = recv_batch(s, bufs, views, sizes, addrs, 3 if first else 4)
                if first:
                    per_socket.append(n)
                first = False
                got += [(bytes(views[i][: sizes[i]]), addrs[i][1]) for i in range(n)]
                if n == 0:
                    break
        out["got"] = sorted(got, key=lambda g: g[0])
        out["client_ports"] = sorted(c.getsockname()[1] for c in clients)
        out["first_batches"] = per_socket
        # send_to answers through the group; an unroutable destination is a counted drop
        stats = UdpStats()
        out["send_ok"] = send_to(v4[0], b"reply", ("127.0.0.1", clients[1].getsockname()[1]))
        out["reply"] = clients[1].recv(100)
        out["send_unreach"] = send_to(v4[0], b"x", ("10.77.0.1", 9), stats)
        out["stats"] = (stats.send_errors, stats.last_send_errno)
    finally:
        for s in v4 + v6 + clients:
            s.close()
    return out


@pytest.mark.netns
def test_send_and_recv_batches(netns_factory) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(_batches)
    assert [g[0] for g in r["got"]] == [b"dgram-%d" % i for i in range(10)]
    assert sorted(g[1] for g in r["got"]) == r["client_ports"]
    assert all(n <= 3 for n in r["first_batches"])
    assert r["send_ok"] is True and r["reply"] == b"reply"
    assert r["send_unreach"] is False and r["stats"] == (1, errno.ENETUNREACH)


def _port_rules() -> dict[str, object]:
    out: dict[str, object] = {}
    v4, v6, port = open_udp_group(0, 1, ipv6=False)
    out["no_v6"] = v6
    for s in v4:
        s.close()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("0.0.0.0", port))  # not reuseport: the group must not join it
    try:
        open_udp_group(port, 2)
        out["fixed"] = "opened"
    except OSError as e:
        out["fixed"] = e.errno
    blocker.close()
    v4, v6, again = open_udp_group(port, 3)
    out["reopened"] = (again == port, len(v4), len(v6))
    for s in v4 + v6:
        s.close()
    return out


@pytest.mark.netns
def test_port_rules(netns_factory) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(_port_rules)
    assert r["no_v6"] == []
    assert r["fixed"] == errno.EADDRINUSE
    assert r["reopened"] == (True, 3, 3)


class _FakeSock:
    """Scripted recvfrom_into results: bytes, an exception to raise, or BlockingIOError."""

    def __init__(self, script: list[object]) -> None:
        self.script = script

    def recvfrom_into(self, view: memoryview) -> tuple[int, tuple[str, int]]:
        item = self.script.pop(0) if self.script else BlockingIOError()
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, bytes)
        view[: len(item)] = item
        return len(item), ("10.0.0.1", 51820)


def test_recv_batch_skips_errors() -> None:
    stats = UdpStats()
    sock = _FakeSock([b"a", ConnectionRefusedError(errno.ECONNREFUSED, "x"), b"bc", b"d"])
    bufs, views, sizes, addrs = _buffers(8)
    n = recv_batch(sock, bufs, views, sizes, addrs, 8, stats)  # type: ignore[arg-type]
    assert n == 3 and sizes[:3] == [1, 2, 1] and bytes(views[1][:2]) == b"bc"
    assert stats.recv_errors == 1 and stats.last_recv_errno == errno.ECONNREFUSED
    # errors use up attempts: a socket stuck in error cannot spin the loop
    sock = _FakeSock([OSError(errno.EIO, "x")] * 100)
    assert recv_batch(sock, bufs, views, sizes, addrs, 5, stats) == 0  # type: ignore[arg-type]
    assert stats.recv_errors == 6 and len(sock.script) == 95


def test_send_to_raises_real_bugs() -> None:
    class Bad:
        def sendto(self, *_: object) -> int:
            raise OSError(errno.EBADF, "closed")

    with pytest.raises(OSError):
        send_to(Bad(), b"x", ("10.0.0.1", 1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("addr", "packed"),
    [
        (("10.1.2.3", 51820), bytes([10, 1, 2, 3]) + b"\xca\x6c"),
        (("::ffff:10.1.2.3", 51820, 0, 0), bytes([10, 1, 2, 3]) + b"\xca\x6c"),
        (("fd00::1", 1, 0, 0), b"\xfd" + bytes(14) + b"\x01" + b"\x00\x01"),
        (("fe80::1%eth0", 65535, 0, 2), b"\xfe\x80" + bytes(13) + b"\x01\xff\xff"),
        (("0.0.0.0", 0), bytes(6)),
    ],
)
def test_sockaddr_bytes(addr: tuple[object, ...], packed: bytes) -> None:
    assert sockaddr_bytes(addr) == packed


@pytest.mark.interop
def test_wireguard_go_baseline(netns_factory) -> None:
    """Two real wireguard-go peers ping through their tunnel: proves the interop harness."""
    from lab.netns import unique_ifname

    a, b = netns_factory(2)
    veth_link(a, b, ["10.20.0.1/24", "fd00:20::1/64"], ["10.20.0.2/24", "fd00:20::2/64"])
    ka, kb = keypair(), keypair()
    wa = netns_factory.wireguard_go(
        a, unique_ifname(), ka[0], 51820,
        [{"public_key": kb[1], "allowed_ips": ["10.99.0.2/32", "fd00:99::2/128"],
          "endpoint": "10.20.0.2:51821"}],
        ["10.99.0.1/24", "fd00:99::1/64"],
    )  # fmt: skip
    wb = netns_factory.wireguard_go(
        b, unique_ifname(), kb[0], 51821,
        [{"public_key": ka[1], "allowed_ips": ["10.99.0.1/32", "fd00:99::1/128"]}],
        ["10.99.0.2/24", "fd00:99::2/64"],
    )  # fmt: skip
    assert ping(a, "10.99.0.2", timeout=15), wa.log_text()[-2000:]
    assert ping(b, "fd00:99::1")
    assert wa.latest_handshake(kb[1]) > 0 and wb.latest_handshake(ka[1]) > 0
    assert wb.endpoint(ka[1]) == "10.20.0.1:51820"  # learned by roaming
    rx, tx = wa.transfer(kb[1])
    assert rx > 0 and tx > 0
    assert kb[1] in wa.show_dump()
    wb.set_peer(ka[1], remove=True)
    assert wait_for(lambda: ka[1] not in wb.show_dump(), 2)
