"""shardwg.io.tun in throwaway namespaces: the test logic runs in the namespace via ns.call."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from lab.netns import wait_for
from shardwg.io import netlink as nl
from shardwg.io import tun
from shardwg.io.tun import TunDevice, TunError, read_batch, write_packet

pytestmark = pytest.mark.netns

LOCAL4, REMOTE4 = "10.200.0.1", "10.201.0.9"
LOCAL6, REMOTE6 = "fd00:200::1", "fd00:201::9"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    """An IPv4 packet with a valid header checksum."""
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def udp4(src: str, sport: int, dst: str, dport: int, data: bytes) -> bytes:
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def _setup(name: str, queues: int = 1, **kw: bool) -> TunDevice:
    dev = TunDevice.create(name, queues=queues, **kw)
    _configure(name)
    return dev


def _configure(name: str) -> None:
    nl.set_link_up(name, 1420)
    nl.add_addresses(name, [f"{LOCAL4}/24", f"{LOCAL6}/64"])
    nl.add_routes(name, ["10.201.0.0/24", "fd00:201::/64"])


def _read_until(fds: list[int], match: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    """Read all queues until a packet matches (the kernel also sends its own IPv6 chatter)."""
    bufs = [bytearray(2048) for _ in range(16)]
    sizes = [0] * 16
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
        for fd in ready:
            for i in range(read_batch(fd, bufs, sizes, 16)):
                pkt = bytes(bufs[i][: sizes[i]])
                if match(pkt):
                    return pkt
    raise AssertionError("no matching packet from the tun")


def _is_udp4_to(dst: str, port: int) -> Callable[[bytes], bool]:
    raw = socket.inet_aton(dst)
    return lambda p: (
        p[0] >> 4 == 4 and p[9] == 17 and p[16:20] == raw and p[22:24] == port.to_bytes(2, "big")
    )


def _single_queue() -> dict[str, object]:
    out: dict[str, object] = {}
    dev = TunDevice.create("tun0", queues=1, multi_queue=False)
    fd = dev.fds[0]
    out["flags_mq"] = dev.multi_queue
    out["empty"] = read_batch(fd, [bytearray(2048)], [0], 1)  # down, so EAGAIN -> 0, no raise
    _configure("tun0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello-tun", (REMOTE4, 9999))
    pkt = _read_until([fd], _is_udp4_to(REMOTE4, 9999))
    out["v4_src"] = socket.inet_ntoa(pkt[12:16])
    out["v4_payload"] = pkt[(pkt[0] & 15) * 4 + 8 :]
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"hello-v6", (REMOTE6, 9999))
    raw6 = socket.inet_pton(socket.AF_INET6, REMOTE6)
    pkt = _read_until([fd], lambda p: p[0] >> 4 == 6 and p[6] == 17 and p[24:40] == raw6)
    out["v6_payload"] = pkt[48:]
    # write path 1: a crafted UDP datagram from the "remote" side reaches a local socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r:
        r.bind((LOCAL4, 0))
        r.settimeout(5)
        port = r.getsockname()[1]
        out["write_udp"] = write_packet(fd, udp4(REMOTE4, 5555, LOCAL4, port, b"from-tun"))
        data, addr = r.recvfrom(2048)
        out["udp_got"] = (data, addr)
    # write path 2: answer a real ICMP echo request with a crafted echo reply
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as ic:
        ic.settimeout(5)
        body = struct.pack("!HH", 0x5157, 1) + b"ping-payload"
        req = struct.pack("!BBH", 8, 0, _csum(b"\x08\x00\x00\x00" + body)) + body
        ic.sendto(req, (REMOTE4, 0))
        pkt = _read_until([fd], lambda p: p[0] == 0x45 and p[9] == 1 and p[20] == 8)
        echo = pkt[20:]
        icmp = b"\x00\x00\x00\x00" + echo[4:]
        icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
        out["write_icmp"] = write_packet(fd, memoryview(ipv4(REMOTE4, LOCAL4, 1, icmp)))
        for _ in range(20):
            reply = ic.recv(2048)
            if reply[20] == 0:
                out["icmp_reply"] = reply[24:]
                break
    out["write_garbage"] = write_packet(fd, b"\x00" * 40)  # not IPv4/IPv6: EINVAL -> False
    out["count"] = tun.count_queues("tun0")
    dev.close()
    out["gone"] = wait_for(lambda: not nl.link_exists("tun0"), 3)
    return out


def test_single_queue_read_write(netns_factory) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(_single_queue)
    assert r["flags_mq"] is False and r["empty"] == 0
    assert r["v4_src"] == LOCAL4 and r["v4_payload"] == b"hello-tun"
    assert r["v6_payload"] == b"hello-v6"
    assert r["write_udp"] is True and r["udp_got"] == (b"from-tun", (REMOTE4, 5555))
    assert r["write_icmp"] is True
    assert r["icmp_reply"] == struct.pack("!HH", 0x5157, 1) + b"ping-payload"
    assert r["write_garbage"] is False
    assert r["count"] == 1
    assert r["gone"] is True


FOREIGN = """
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", sys.argv[1].encode(), 0x1000 | 0x0001 | 0x0100))
print("attached", flush=True)
sys.stdin.read()
"""


def _spread(fds: list[int], base_port: int, flows: int = 24) -> dict[int, int]:
    """Send one datagram per flow into the tun; return queue index -> packets read there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for port in range(base_port, base_port + flows):
            s.sendto(b"flow", (REMOTE4, port))
    seen: dict[int, int] = {}
    bufs = [bytearray(2048) for _ in range(32)]
    sizes = [0] * 32
    deadline = time.monotonic() + 5
    while sum(seen.values()) < flows and time.monotonic() < deadline:
        select.select(fds, [], [], 0.2)
        for q, fd in enumerate(fds):
            for i in range(read_batch(fd, bufs, sizes, 32)):
                if bufs[i][0] == 0x45 and bufs[i][9] == 17:
                    seen[q] = seen.get(q, 0) + 1
    return seen


def _multi_queue() -> dict[str, object]:
    out: dict[str, object] = {}
    me = os.getpid()
    dev = _setup("tun1", queues=4)
    out["n_fds"] = len(dev.fds)
    out["count"] = tun.count_queues("tun1")
    out["holders"] = tun.queue_holders("tun1")
    out["flows"] = _spread(dev.fds, 20000)
    # a detached queue keeps its fd (fdinfo still names the tun) but gets no traffic
    dev.detach_queue(dev.fds[3])
    out["after_detach"] = (tun.count_queues("tun1"), dev.attached_fds == dev.fds[:3])
    out["detached_flows"] = _spread(dev.fds, 21000)
    dev.reattach_queue(dev.fds[3])
    out["after_reattach"] = tun.count_queues("tun1")
    extra = dev.attach_queue()
    out["after_attach"] = (tun.count_queues("tun1"), extra in dev.fds)
    # a foreign process joins the same multiqueue tun
    child = subprocess.Popen(
        [sys.executable, "-c", FOREIGN, "tun1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "attached"
        out["foreign"] = (tun.foreign_queue_holders("tun1", {me}), child.pid)
        out["count_with_foreign"] = tun.count_queues("tun1")
    finally:
        child.kill()
        child.wait(5)
    out["foreign_after"] = tun.foreign_queue_holders("tun1", {me})
    dev.close()
    out["gone"] = wait_for(lambda: not nl.link_exists("tun1"), 3)
    return out


def test_multi_queue_and_foreign_holder(netns_factory) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(_multi_queue)
    assert r["n_fds"] == 4 and r["count"] == 4
    assert list(r["holders"].values()) == [4]
    assert sum(r["flows"].values()) == 24
    assert len(r["flows"]) >= 2, f"24 flows all on one queue: {r['flows']}"
    assert r["after_detach"] == (4, True)
    assert sum(r["detached_flows"].values()) == 24 and 3 not in r["detached_flows"]
    assert r["after_reattach"] == 4
    assert r["after_attach"] == (5, True)
    holders, pid = r["foreign"]
    assert holders == [pid]
    assert r["count_with_foreign"] == 6
    assert r["foreign_after"] == []
    assert r["gone"] is True


def _vnet_hdr() -> dict[str, object]:
    dev = _setup("tun2", vnet_hdr=True)
    fd = dev.fds[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"vnet", (REMOTE4, 7777))
    off = tun.VNET_HDR_LEN
    pkt = _read_until([fd], lambda p: len(p) > off and _is_udp4_to(REMOTE4, 7777)(p[off:]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r:
        r.bind((LOCAL4, 0))
        r.settimeout(5)
        hdr = bytes(tun.VNET_HDR_LEN)  # no offload requested: an all-zero virtio_net_hdr
        ok = write_packet(fd, hdr + udp4(REMOTE4, 1, LOCAL4, r.getsockname()[1], b"vnet-in"))
        got = r.recv(100)
    dev.close()
    return {"tail": pkt[-4:], "ok": ok, "got": got}


def test_vnet_hdr(netns_factory) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(_vnet_hdr)
    assert r == {"tail": b"vnet", "ok": True, "got": b"vnet-in"}


def _errors() -> dict[str, str]:
    out: dict[str, str] = {}
    subprocess.run(["ip", "link", "add", "vx0", "type", "veth", "peer", "name", "vx1"], check=True)
    mq = TunDevice.create("tun3", queues=2)
    for label, kwargs in {
        "veth": {"name": "vx0"},
        "lo": {"name": "lo"},
        "flags": {"name": "tun3", "multi_queue": False},
        "excl": {"name": "tun3", "exclusive": True},
    }.items():
        try:
            TunDevice.create(**kwargs).close()  # type: ignore[arg-type]
            out[label] = "created"
        except TunError as e:
            out[label] = str(e)
    mq.close()
    return out


def test_create_errors_in_namespace(netns_factory) -> None:
    (ns,) = netns_factory(1)
    r = ns.call(_errors)
    assert "exists already and is a veth" in r["veth"]
    assert "exists already" in r["lo"]
    assert "other flags" in r["flags"]
    assert "in use" in r["excl"]


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "..", "wg%d"])
def test_bad_names(name: str) -> None:
    with pytest.raises(TunError, match="interface name"):
        TunDevice.create(name)


def test_missing_device_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tun, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(TunError, match="missing"):
        TunDevice.create("tunx")


def test_no_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(*_: object, **__: object) -> int:
        raise PermissionError(errno.EACCES, "denied")

    monkeypatch.setattr(tun.os, "open", deny)
    with pytest.raises(TunError, match="no permission"):
        TunDevice.create("tunx")


def test_queue_bounds() -> None:
    with pytest.raises(TunError, match="queues"):
        TunDevice.create("tunx", queues=0)
    with pytest.raises(TunError, match="queues"):
        TunDevice.create("tunx", queues=257)


def test_ifreq_layout() -> None:
    """struct ifreq is 40 bytes on Linux x86-64; the flags sit right after the 16-byte name."""
    raw = tun._IFREQ.pack(b"tun0", tun.IFF_TUN | tun.IFF_NO_PI)
    assert len(raw) == 40 and raw[16:18] == struct.pack("H", 0x1001)


# ---------------------------------------------------------------- offloads (io/interface.py)
def _offloads() -> dict[str, int]:
    from shardwg.io.interface import enable_tun_offloads

    dev = TunDevice.create("tunoff0", vnet_hdr=True)
    try:
        return {"flags": enable_tun_offloads(dev)}
    finally:
        dev.close()


def test_tun_offloads_taken_by_this_kernel(netns_factory) -> None:
    """A real vnet-header TUN takes TSO4/6 + CSUM, and USO4/6 from Linux 6.2 on."""
    from shardwg.io.vnet import TUN_F_TCP, TUN_F_UDP

    (ns,) = netns_factory(1)
    flags = ns.call(_offloads)["flags"]
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    assert flags == (TUN_F_TCP | TUN_F_UDP if (major, minor) >= (6, 2) else TUN_F_TCP)


class _RefusingTun:
    """A TUN whose kernel refuses offload sets above `allowed` (a double for old kernels)."""

    name = "tunx"

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.calls: list[int] = []

    def set_offload(self, flags: int) -> None:
        self.calls.append(flags)
        if flags & ~self.allowed:
            raise OSError(errno.EINVAL, "Invalid argument")


@pytest.mark.parametrize("allowed", [0x7F, 0x07, 0x00])
def test_tun_offload_fallback_is_logged_once(
    allowed: int, caplog: pytest.LogCaptureFixture
) -> None:
    from shardwg.io.interface import enable_tun_offloads
    from shardwg.io.vnet import TUN_F_TCP, TUN_F_UDP

    t = _RefusingTun(allowed)
    with caplog.at_level("INFO", logger="shardwg.io.interface"):
        got = enable_tun_offloads(t)  # type: ignore[arg-type]
    want = {0x7F: TUN_F_TCP | TUN_F_UDP, 0x07: TUN_F_TCP, 0x00: 0}[allowed]
    assert got == want and t.calls[-1] == want
    lines = [r for r in caplog.records if "offloads" in r.getMessage()]
    assert len(lines) == 1
    assert (lines[0].levelname == "WARNING") == (want == 0)
