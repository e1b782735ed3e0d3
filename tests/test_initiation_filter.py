"""The kernel socket filter that sheds cookie-less initiations, on live loopback sockets."""

from __future__ import annotations

import socket
import time

import cbpf_model
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.netns import Namespace
from shardwg.io import initiation_filter as F
from shardwg.proto.constants import INITIATION_MAC2_OFFSET, INITIATION_SIZE, MessageType


def initiation(mac2: bytes = bytes(16), size: int = INITIATION_SIZE) -> bytes:
    body = bytes([MessageType.INITIATION, 0, 0, 0]) + b"\x55" * (INITIATION_MAC2_OFFSET - 4)
    return (body + mac2)[:size].ljust(size, b"\x55")


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    yield rx, tx
    rx.close()
    tx.close()


@pytest.fixture
def pair6() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        rx.bind(("::1", 0))
    except OSError:
        rx.close()
        pytest.skip("no IPv6 loopback")
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname()[:2])
    yield rx, tx
    rx.close()
    tx.close()


def received(rx: socket.socket) -> list[bytes]:
    time.sleep(0.05)  # loopback delivery is synchronous; this only guards a busy box
    out = []
    while len(out) < 100_000:
        try:
            out.append(rx.recv(2048))
        except BlockingIOError:
            break
    return out


def test_shift_zero_without_a_filter_is_fine(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair
    F.set_shift(rx, 0)
    F.set_shift(rx, 0)
    tx.send(initiation())
    assert received(rx) == [initiation()]


def test_program_rejects_shift_out_of_range() -> None:
    with pytest.raises(ValueError):
        F.program(0)
    with pytest.raises(ValueError):
        F.program(F.MAX_SHIFT + 1)


def test_cookieless_initiations_are_shed_and_counted(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    rx, tx = pair
    drops0 = F.kernel_drops(rx)
    F.set_shift(rx, F.MAX_SHIFT)  # admit 1 in 4096
    for _ in range(300):
        tx.send(initiation())
    got = received(rx)
    # P(more than 3 of 300 pass at 1/4096) is below 1e-7
    assert len(got) <= 3, len(got)
    assert F.kernel_drops(rx) - drops0 == 300 - len(got)


def test_everything_else_passes(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair
    F.set_shift(rx, F.MAX_SHIFT)
    keep = [
        # a retry that carries a cookie's mac2: any of its four words non-zero
        *(initiation(bytes(4 * w) + b"\x00\x00\x00\x01" + bytes(12 - 4 * w)) for w in range(4)),
        initiation(size=INITIATION_SIZE - 1),  # wrong size: the worker counts it as bad_size
        initiation().replace(b"\x01\x00\x00\x00", b"\x01\x00\x00\x07", 1),  # reserved bytes set
        bytes([MessageType.RESPONSE, 0, 0, 0]) + bytes(88),
        bytes([MessageType.COOKIE_REPLY, 0, 0, 0]) + bytes(60),
        bytes([MessageType.TRANSPORT, 0, 0, 0]) + bytes(INITIATION_SIZE - 4),  # same size
        bytes([MessageType.TRANSPORT, 0, 0, 0]) + bytes(1400),  # longer: transport passes
        b"",
        b"\x01",
    ]
    for msg in keep:
        tx.send(msg)
    assert received(rx) == keep


def test_longer_than_an_initiation_passes_only_as_transport(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """What a merged receive could hide (module docstring): shed like cookie-less initiations."""
    rx, tx = pair
    F.set_shift(rx, F.MAX_SHIFT)
    shed = [
        initiation(size=INITIATION_SIZE + 1),  # not transport first
        initiation() * 3,  # a burst of initiations, as GRO would merge them
        bytes([MessageType.RESPONSE, 0, 0, 0]) + bytes(200),
        bytes([MessageType.TRANSPORT, 0, 0, 0]) + bytes(300) + initiation(),  # 148-byte last
    ]
    for msg in shed:
        tx.send(msg)
    assert received(rx) == []
    assert F.kernel_drops(rx) >= len(shed)


def test_half_share_passes_about_half(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair
    F.set_shift(rx, 1)
    for _ in range(2000):
        tx.send(initiation())
    got = len(received(rx))
    assert 800 < got < 1200, got  # binomial(2000, 1/2): sd 22


def test_detach_restores_everything(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair
    F.set_shift(rx, F.MAX_SHIFT)
    F.set_shift(rx, 3)  # replaced, not stacked
    F.set_shift(rx, 0)
    for _ in range(50):
        tx.send(initiation())
    assert len(received(rx)) == 50


def test_ipv6_socket_sees_the_same_offsets(pair6: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair6
    F.set_shift(rx, F.MAX_SHIFT)
    for _ in range(100):
        tx.send(initiation())
    tx.send(initiation(b"\x01" + bytes(15)))
    got = received(rx)
    assert got[-1] == initiation(b"\x01" + bytes(15))
    assert len(got) <= 3


def packed(addr: tuple[str, int]) -> bytes:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    return socket.inet_pton(family, addr[0]) + addr[1].to_bytes(2, "big")


def test_known_endpoints_always_pass(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        other.connect(rx.getsockname())
        me = tx.getsockname()
        junk = [packed((f"10.1.{i // 250}.{i % 250 + 1}", 51820)) for i in range(40)]
        same_port_other_ip = packed(("127.0.0.2", me[1]))
        same_ip_other_port = packed(("127.0.0.1", other.getsockname()[1] ^ 1))
        F.set_shift(rx, F.MAX_SHIFT, [*junk, same_port_other_ip, same_ip_other_port, packed(me)])
        for _ in range(200):
            tx.send(initiation())
            other.send(initiation(size=INITIATION_SIZE))
        got = received(rx)
        assert 200 <= len(got) <= 203, len(got)  # all of tx's, ~none of other's
    finally:
        other.close()


def test_endpoint_list_is_capped_and_the_kernel_takes_the_longest_program() -> None:
    v6 = [packed((f"2001:db8::{i:x}", 51820)) for i in range(F.MAX_ENDPOINTS + 10)]
    assert len(F.program(1, v6)) < 4096  # BPF_MAXINSNS
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        F.set_shift(s, 1, v6)  # the kernel's checker accepts it
        F.set_shift(s, 1, [packed(("10.0.0.1", 1)), *v6[:3]])  # the other family is skipped
    finally:
        s.close()
    with pytest.raises(ValueError):
        F.program(1, [b"\x01\x02\x03"])


def test_known_ipv6_endpoint_passes(pair6: tuple[socket.socket, socket.socket]) -> None:
    rx, tx = pair6
    F.set_shift(rx, F.MAX_SHIFT, [packed(("::2", tx.getsockname()[1]))])
    for _ in range(50):
        tx.send(initiation())
    assert len(received(rx)) <= 3  # ::2 is not us
    F.set_shift(rx, F.MAX_SHIFT, [packed(("::1", tx.getsockname()[1]))])
    for _ in range(50):
        tx.send(initiation())
    assert len(received(rx)) == 50


# ---------------------------------------------------------------- the program against a model
def ip_header(src: bytes) -> bytes:
    """Enough of an IPv4 or IPv6 header for the source address loads."""
    if len(src) == 4:
        return bytes(12) + src + bytes([10, 99, 0, 1])
    return bytes(8) + src + bytes(16)


def shed(payload: bytes, source: bytes, endpoints: list[bytes], lucky: bool) -> bool:
    """The filter's contract, written plainly: one cookie-less initiation, or a longer
    (perhaps merged) receive that does not start with a transport message or whose last
    148 bytes start with an initiation's type word."""
    word = bytes([MessageType.INITIATION, 0, 0, 0])
    if len(payload) == INITIATION_SIZE:
        candidate = payload[:4] == word and payload[INITIATION_MAC2_OFFSET:] == bytes(16)
    elif len(payload) > INITIATION_SIZE:
        candidate = (
            payload[:4] != bytes([MessageType.TRANSPORT, 0, 0, 0])
            or payload[-INITIATION_SIZE:][:4] == word
        )
    else:
        candidate = False
    return candidate and source not in endpoints and not lucky


@given(
    kind=st.sampled_from(
        ["cookieless", "with mac2", "other type", "wrong size", "random", "merged", "merged last"]
    ),
    body=st.binary(min_size=0, max_size=200),
    v6=st.booleans(),
    src_host=st.integers(0, 3),
    src_port=st.sampled_from([51820, 51821, 443]),
    known=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([51820, 51821])), max_size=4),
    shift=st.integers(1, F.MAX_SHIFT),
    rnd=st.integers(0, 2**32 - 1),
)
@settings(max_examples=400, deadline=None)
def test_program_matches_its_contract(
    kind: str,
    body: bytes,
    v6: bool,
    src_host: int,
    src_port: int,
    known: list[tuple[int, int]],
    shift: int,
    rnd: int,
) -> None:
    def addr(host: int) -> bytes:
        return (bytes(15) + bytes([host + 1])) if v6 else bytes([10, 9, 0, host + 1])

    if kind == "cookieless":
        payload = initiation()
    elif kind == "with mac2":
        payload = initiation(body[:16].ljust(16, b"\x00")[:15] + b"\x01")
    elif kind == "other type":
        payload = bytes([body[0] % 5 if body else 2, 0, 0, 0]) + initiation()[4:]
    elif kind == "wrong size":
        payload = initiation(size=len(body) % 300 if len(body) % 300 != INITIATION_SIZE else 1)
    elif kind == "merged":  # a burst of 148-byte datagrams, any of them an initiation
        n = 2 + len(body) % 130
        payload = b"".join(
            initiation() if (body[i % len(body)] if body else i) % 3 == 0 else b"\x04" * 148
            for i in range(n)
        )[: 148 * n - (body[0] % 100 if body else 0)]
        if body and body[-1] % 2:  # a transport-typed first datagram
            payload = bytes([MessageType.TRANSPORT, 0, 0, 0]) + payload[4:]
    elif kind == "merged last":  # datagrams of S > 148 bytes, a 148-byte initiation last
        payload = bytes([4, 0, 0, 0]) + body.ljust(200, b"\x07") + initiation()
    else:
        payload = body
    source = addr(src_host) + src_port.to_bytes(2, "big")
    endpoints = [addr(h) + p.to_bytes(2, "big") for h, p in known]
    prog = F.program(shift, endpoints)
    udp = src_port.to_bytes(2, "big") + bytes(6)
    verdict = cbpf_model.run(prog, ip_header(source[:-2]), udp + payload, rnd)
    lucky = rnd < (1 << (32 - shift))
    assert verdict == (0 if shed(payload, source, endpoints, lucky) else F.PASS)


def _fit_in_small_optmem() -> tuple[int, int, list[bool]]:
    """In a namespace whose net.core.optmem_max is 8 KiB: how many of 256 IPv6 endpoints fit,
    and does the filter still pass the first known endpoint and shed the rest?"""
    with open("/proc/sys/net/core/optmem_max", "w") as f:
        f.write("8192")
    rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx.bind(("::1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname()[:2])
    me = packed(("::1", tx.getsockname()[1]))
    eps = [me] + [packed((f"2001:db8::{i:x}", 51820)) for i in range(255)]
    taken = F.set_shift_fitting(rx, F.MAX_SHIFT, eps)
    for _ in range(20):
        tx.send(initiation())
    mine = len(received(rx))
    other = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    other.connect(rx.getsockname()[:2])
    for _ in range(100):
        other.send(initiation())
    return taken, mine, [len(received(rx)) <= 3]


@pytest.mark.netns
def test_a_filter_too_big_for_option_memory_keeps_what_fits() -> None:
    ns = Namespace("optmem")
    try:
        ns.ip("link", "set", "lo", "up")
        taken, mine, shed_others = ns.call(_fit_in_small_optmem, timeout=30)
    finally:
        ns.close()
    assert 0 < taken < 256, taken  # 256 do not fit in 8 KiB; some do
    assert mine == 20 and all(shed_others), (mine, shed_others)
