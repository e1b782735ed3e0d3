"""Hostile traffic for hardening tests: malformed, mutated, replayed and spoofed WireGuard
datagrams, sent fast, plus the packet counters that tell what arrived.

Everything here runs inside a namespace (through `Namespace.call`) and touches only the
addresses it is given. Senders are bounded in count and in time. Speed comes from
`sendmmsg(2)` over payloads laid out once in one ctypes buffer: a million datagrams is about
a thousand system calls and no per-datagram Python work.

Pieces:
    payload builders  pure functions of a seeded `random.Random`: garbage, wrong sizes, bad
                      mac1, unknown indices, mutations of captured datagrams, valid-mac1
                      initiations (built with shardwg.proto, the code under test is the
                      receiver only)
    blast             sendmmsg over UDP sockets (several source ports, so the gateway's
                      reuseport hash spreads them over workers), optionally paced
    spoof_blast       the same over a raw IP_HDRINCL socket, source addresses drawn from a
                      prefix the caller routes back to this namespace
    Sniffer           AF_PACKET socket with a classic BPF filter: count (PACKET_STATISTICS)
                      or capture matching UDP datagrams on one interface
    CookieClient      a single real source that answers cookie replies (valid mac2)
    net counters      interface and /proc/net/snmp counters of the current namespace
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shardwg.proto import noise
from shardwg.proto.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
    MessageType,
)
from shardwg.proto.cookie import CookieGenerator
from shardwg.proto.tai64n import timestamp

# --------------------------------------------------------------------------- sendmmsg

_libc = ctypes.CDLL(None, use_errno=True)
_MAX_VLEN = 1024  # UIO_MAXIOV: the kernel caps one sendmmsg call at this many messages


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int


class MessageVector:
    """Payloads packed once into C memory with one mmsghdr each, for connected sockets."""

    def __init__(self, payloads: Sequence[bytes]) -> None:
        if not payloads:
            raise ValueError("no payloads")
        self.count = len(payloads)
        total = sum(len(p) for p in payloads)
        self._data = ctypes.create_string_buffer(b"".join(payloads), max(1, total))
        self._iov = (_IoVec * self.count)()
        self._msgs = (_MMsgHdr * self.count)()
        base = ctypes.addressof(self._data)
        off = 0
        for i, p in enumerate(payloads):
            self._iov[i].base = base + off
            self._iov[i].len = len(p)
            m = self._msgs[i].hdr
            m.iov = ctypes.addressof(self._iov[i])
            m.iovlen = 1
            off += len(p)
        self._base = ctypes.addressof(self._msgs)
        self._stride = ctypes.sizeof(_MMsgHdr)

    def send(self, fd: int, start: int, n: int) -> int:
        """sendmmsg messages [start, start + n) (n <= 1024); returns how many went, or -errno."""
        got = _libc.sendmmsg(fd, self._base + start * self._stride, n, 0)
        return got if got >= 0 else -ctypes.get_errno()


@dataclass
class BlastResult:
    """What a sender did: datagrams it tried, the kernel accepted, and errors it saw."""

    tried: int = 0
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0
    errnos: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def _pump(
    fds: Sequence[int],
    vec: MessageVector,
    count: int,
    rate: float | None,
    max_seconds: float,
    batch: int,
    stop: threading.Event | None = None,
) -> BlastResult:
    """Send `count` messages cycling over vec, round-robin over fds, one batch per call."""
    res = BlastResult()
    batch = max(1, min(batch, _MAX_VLEN))
    t0 = time.monotonic()
    deadline = t0 + max_seconds
    pos = 0
    turn = 0
    calls_left = count + 16  # every call moves >= 1 message or counts an error: bounded
    while res.tried < count and calls_left > 0:
        calls_left -= 1
        now = time.monotonic()
        if now >= deadline or (stop is not None and stop.is_set()):
            break
        if rate:
            ahead = res.tried / rate - (now - t0)
            if ahead > 0:
                time.sleep(min(ahead, 0.05))
        n = min(batch, vec.count - pos, count - res.tried)
        got = vec.send(fds[turn % len(fds)], pos, n)
        turn += 1
        if got < 0:
            err = -got
            res.errnos[err] = res.errnos.get(err, 0) + 1
            res.errors += 1
            res.tried += 1  # the first message of the batch failed; skip it
            got = 1
        else:
            res.tried += got
            res.sent += got
        pos = (pos + got) % vec.count
    res.seconds = time.monotonic() - t0
    return res


def blast(
    dst: str,
    port: int,
    payloads: Sequence[bytes],
    count: int,
    *,
    sources: int = 8,
    rate: float | None = None,
    max_seconds: float = 60.0,
    batch: int = 256,
    sndbuf: int = 4 << 20,
) -> BlastResult:
    """Send `count` UDP datagrams to dst:port cycling over `payloads`, from `sources` sockets
    (distinct source ports), at most `rate` per second, for at most `max_seconds`."""
    vec = MessageVector(payloads)
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    socks = [socket.socket(fam, socket.SOCK_DGRAM) for _ in range(max(1, sources))]
    try:
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            s.connect((dst, port))
        return _pump([s.fileno() for s in socks], vec, count, rate, max_seconds, batch)
    finally:
        for s in socks:
            s.close()


def _ip_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """IPv4 + UDP header in front of payload. The kernel fills the IP checksum and total
    length for IP_HDRINCL; a UDP checksum of 0 means "none", legal on IPv4."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0x4000, 64,
                     socket.IPPROTO_UDP, 0, src, dst)  # fmt: skip
    return ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def spoofed_packets(
    rng: random.Random, src_net: str, dst: str, port: int, payloads: Sequence[bytes], n: int
) -> list[bytes]:
    """n IPv4/UDP packets to dst:port, each from a random host of src_net and a random port,
    carrying payloads round-robin."""
    net = ipaddress.IPv4Network(src_net)
    first, size = int(net.network_address) + 1, max(1, net.num_addresses - 2)
    dst_b = socket.inet_aton(dst)
    out = []
    for i in range(n):
        src = struct.pack("!I", first + rng.randrange(size))
        out.append(_ip_udp(src, dst_b, rng.randint(1024, 65535), port,
                           payloads[i % len(payloads)]))  # fmt: skip
    return out


def spoof_blast(
    dst: str,
    packets: Sequence[bytes],
    count: int,
    *,
    rate: float | None = None,
    max_seconds: float = 60.0,
    batch: int = 256,
) -> BlastResult:
    """Send prebuilt IPv4 packets (spoofed_packets) over a raw IP_HDRINCL socket."""
    vec = MessageVector(packets)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.connect((dst, 0))
        return _pump([s.fileno()], vec, count, rate, max_seconds, batch)
    finally:
        s.close()


# --------------------------------------------------------------------------- payloads

_T = struct.Struct("<I")


def _typed(t: int, size: int, rng: random.Random) -> bytes:
    """A datagram whose header says type t, `size` bytes long, the rest random."""
    if size < 4:
        return bytes([t, 0, 0, 0])[:size]
    return _T.pack(t) + rng.randbytes(size - 4)


def random_garbage(rng: random.Random, n: int) -> list[bytes]:
    """Uniformly random bytes of random lengths 0..300 (a few will look like a type)."""
    return [rng.randbytes(rng.randint(0, 300)) for _ in range(n)]


def wrong_sizes(rng: random.Random) -> list[bytes]:
    """Every message type at sizes that are not its own, runts of 0-3 bytes, and right-size
    messages with non-zero reserved bytes or an unknown type."""
    out: list[bytes] = [b"", b"\x01", b"\x04\x00", b"\x04\x00\x00"]
    exact = {1: INITIATION_SIZE, 2: RESPONSE_SIZE, 3: COOKIE_REPLY_SIZE}
    for t, size in exact.items():
        for s in (4, 5, size - 1, size + 1, size + 16, size * 2, 31, 32):
            if s != size:
                out.append(_typed(t, s, rng))
    for s in (4, 8, 16, TRANSPORT_HEADER_SIZE, TRANSPORT_MIN_SIZE - 1):
        out.append(_typed(4, s, rng))
    for t in (0, 5, 6, 0x7F, 0xFF):  # unknown types at plausible sizes
        for s in (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE, TRANSPORT_MIN_SIZE, 200):
            out.append(_typed(t, s, rng))
    for t, size in (*exact.items(), (4, 64)):  # reserved bytes not zero
        d = bytearray(_typed(t, size, rng))
        d[1 + rng.randrange(3)] = rng.randint(1, 255)
        out.append(bytes(d))
    return out


def bad_mac1_initiations(rng: random.Random, n: int) -> list[bytes]:
    """Right-size initiations full of random bytes: mac1 cannot match."""
    return [_typed(1, INITIATION_SIZE, rng) for _ in range(n)]


def bad_mac1_responses(rng: random.Random, n: int) -> list[bytes]:
    return [_typed(2, RESPONSE_SIZE, rng) for _ in range(n)]


def unknown_index_transports(rng: random.Random, n: int, avoid: Iterable[int] = ()) -> list[bytes]:
    """Transport datagrams (32..200 bytes) to random receiver indices not in `avoid`."""
    skip = set(avoid)
    out: list[bytes] = []
    while len(out) < n:
        index = rng.getrandbits(32)
        if index in skip:
            continue
        body = rng.randbytes(rng.randint(TRANSPORT_MIN_SIZE, 200) - 8)
        out.append(_T.pack(4) + struct.pack("<I", index) + body)
    return out


def unknown_index_cookie_replies(rng: random.Random, n: int) -> list[bytes]:
    return [_typed(3, COOKIE_REPLY_SIZE, rng) for _ in range(n)]


def receiver_index(datagram: bytes) -> int:
    return int(struct.unpack_from("<I", datagram, 4)[0])


def transport_counter(datagram: bytes) -> int:
    return int(struct.unpack_from("<Q", datagram, 8)[0])


def mutate_transports(rng: random.Random, captured: Sequence[bytes]) -> list[bytes]:
    """Variants of real transport datagrams that must all fail: a flipped ciphertext or tag
    bit, a counter moved far ahead (must not advance the replay window), another receiver
    index, truncation below and above the minimum, extra bytes, a zeroed tag."""
    out = []
    for d in captured:
        b = bytearray(d)
        flip = bytearray(d)
        flip[rng.randrange(TRANSPORT_HEADER_SIZE, len(d))] ^= 1 << rng.randrange(8)
        out.append(bytes(flip))
        ahead = bytearray(d)
        struct.pack_into("<Q", ahead, 8, transport_counter(d) + rng.randint(10_000, 1 << 40))
        out.append(bytes(ahead))
        other = bytearray(d)
        struct.pack_into("<I", other, 4, receiver_index(d) ^ (rng.getrandbits(24) << 8 | 1))
        out.append(bytes(other))
        out.append(bytes(b[: rng.randint(4, TRANSPORT_MIN_SIZE - 1)]))
        if len(d) > TRANSPORT_MIN_SIZE + 1:
            out.append(bytes(b[: rng.randint(TRANSPORT_MIN_SIZE, len(d) - 1)]))
        out.append(bytes(b) + rng.randbytes(rng.randint(1, 16)))
        zero_tag = bytearray(d)
        zero_tag[-16:] = bytes(16)
        out.append(bytes(zero_tag))
    return out


def valid_mac1_initiations(
    gateway_public: bytes, n: int, rng: random.Random, static_private: bytes | None = None
) -> list[bytes]:
    """n well-formed initiations to the gateway with a valid mac1 and no mac2, from a static
    key the gateway does not know (random unless given). Each costs the sender two DHs."""
    priv = static_private or bytes(rng.randbytes(32))
    local = noise.LocalIdentity.from_private(priv)
    peer = noise.PeerCrypto.build(local, gateway_public, None)
    gen = CookieGenerator(peer.mac1_key, peer.cookie_key)
    out = []
    now = time.time()
    for i in range(n):
        msg, _state = noise.create_initiation(
            local, peer, rng.getrandbits(32), bytes(rng.randbytes(32)), timestamp(now + i * 0.02)
        )
        gen.add_macs(msg, 0.0)
        out.append(bytes(msg))
    return out


# --------------------------------------------------------------------------- sniffing

ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26


def _udp_filter(port: int, src: bool, first_word: int | None, size: int | None,
                min_size: int | None) -> bytes:  # fmt: skip
    """Classic BPF on cooked (SOCK_DGRAM) IPv4 frames: UDP, src or dst port == port, first
    payload word == first_word, payload length == size or >= min_size. Assumes a 20-byte IP
    header (others fail the port check and are ignored)."""
    # (load code, k, compare code, value): ldb [9] protocol; ldh [20|22] port; ld [28] the
    # first payload word (big-endian); ld len (the IP packet's length)
    checks: list[tuple[int, int, int, int]] = [
        (0x30, 9, 0x15, socket.IPPROTO_UDP),
        (0x28, 20 if src else 22, 0x15, port),
    ]
    if first_word is not None:
        checks.append((0x20, 28, 0x15, first_word))
    if size is not None:
        checks.append((0x80, 0, 0x15, 28 + size))
    elif min_size is not None:
        checks.append((0x80, 0, 0x35, 28 + min_size))
    ins: list[tuple[int, int, int, int]] = []
    reject = 2 * len(checks) + 1  # index of the final "ret 0"
    for load, k, cmp, want in checks:
        ins.append((load, 0, 0, k))
        ins.append((cmp, 0, reject - (len(ins) + 1), want))  # jeq/jge want, else ret 0
    ins.append((0x06, 0, 0, 0xFFFF))
    ins.append((0x06, 0, 0, 0))
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


class Sniffer:
    """AF_PACKET socket on one interface of the current namespace that sees only matching
    IPv4/UDP datagrams (both directions). `stats()` returns (matched, dropped) since the last
    call (PACKET_STATISTICS resets); `capture()` reads payloads."""

    def __init__(self, ifname: str, port: int, *, src_port: bool, first_word: int | None = None,
                 size: int | None = None, min_size: int | None = None,
                 rcvbuf: int = 32 << 20) -> None:  # fmt: skip
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        prog = _udp_filter(port, src_port, first_word, size, min_size)
        self._prog_buf = ctypes.create_string_buffer(prog, len(prog))
        fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(self._prog_buf))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        self.sock.bind((ifname, ETH_P_IP))
        # packets queued between socket() and the filter/bind may be anything: drain them
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(10_000):
                self.sock.recv(65536)
        self.stats()

    def stats(self) -> tuple[int, int]:
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        packets, drops = struct.unpack("II", raw)
        return packets, drops

    def capture(self, count: int, seconds: float, outgoing: bool | None = None) -> list[bytes]:
        """Up to `count` UDP payloads within `seconds`; outgoing: only sent (True) / only
        received (False) frames, or both (None)."""
        out: list[bytes] = []
        deadline = time.monotonic() + seconds
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                continue
            is_out = addr[2] == socket.PACKET_OUTGOING
            if outgoing is not None and is_out != outgoing:
                continue
            ihl = (data[0] & 0x0F) * 4
            out.append(bytes(data[ihl + 8 :]))
        return out

    def close(self) -> None:
        self.sock.close()


def capture_messages(
    ifname: str,
    port: int,
    mtype: int,
    count: int,
    seconds: float,
    size: int | None = None,
    min_size: int | None = None,
) -> list[bytes]:
    """WireGuard messages of type `mtype` to UDP `port` seen arriving on ifname (a gateway-side
    veth), of exactly `size` or at least `min_size` bytes. Call from a thread while traffic
    flows; returns after `count` or `seconds`."""
    sn = Sniffer(ifname, port, src_port=False, first_word=int(mtype) << 24, size=size,
                 min_size=min_size)  # fmt: skip
    try:
        return sn.capture(count, seconds, outgoing=False)
    finally:
        sn.close()


def capture_transports(ifname: str, port: int, count: int, seconds: float,
                       min_size: int = TRANSPORT_MIN_SIZE + 1) -> list[bytes]:  # fmt: skip
    """Transport datagrams at least min_size long (default: no keepalives); see
    capture_messages."""
    return capture_messages(ifname, port, MessageType.TRANSPORT, count, seconds,
                            min_size=min_size)  # fmt: skip


# --------------------------------------------------------------------------- cookies


@dataclass
class FloodReport:
    """A spoofed flood with the cookie replies seen coming back, and a real source that
    answers its cookies."""

    flood: BlastResult
    cookie_replies: int
    cookie_replies_dropped_by_sniffer: int
    client_cookies: int = 0
    client_sent_with_mac2: int = 0
    client_seconds: float = 0.0


class CookieClient:
    """One real source (fixed address and port) sending valid-mac1 initiations from an unknown
    key; when a cookie reply comes it stores the cookie, so later initiations carry a valid
    mac2 and pass to the per-source rate limiter."""

    def __init__(self, dst: str, port: int, gateway_public: bytes, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.local = noise.LocalIdentity.from_private(bytes(rng.randbytes(32)))
        self.peer = noise.PeerCrypto.build(self.local, gateway_public, None)
        self.gen = CookieGenerator(self.peer.mac1_key, self.peer.cookie_key)
        msg, _st = noise.create_initiation(
            self.local, self.peer, rng.getrandbits(32), bytes(rng.randbytes(32)),
            timestamp(time.time()),
        )  # fmt: skip
        self.msg = msg
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((dst, port))
        self.sock.setblocking(False)
        self.cookies = 0
        self.sent_with_mac2 = 0

    def _drain(self, now: float) -> None:
        for _ in range(1000):
            try:
                data = self.sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if len(data) == COOKIE_REPLY_SIZE and data[0] == 3:
                if self.gen.consume_reply(data, now):
                    self.cookies += 1
                    self.gen.add_macs(self.msg, now)

    def run(self, seconds: float, rate: float) -> None:
        """Send at `rate` per second for `seconds`: initiations without mac2 until a cookie
        arrives, with a valid mac2 after."""
        t0 = time.monotonic()
        self.gen.add_macs(self.msg, 0.0)
        sent = 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            self._drain(now)
            has = self.gen.has_fresh_cookie(now)
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                self.sock.send(self.msg)
                sent += 1
                if has:
                    self.sent_with_mac2 += 1
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        self._drain(time.monotonic())

    def close(self) -> None:
        self.sock.close()


def flood_with_cookie_client(
    sniff_ifname: str,
    dst: str,
    port: int,
    packets: Sequence[bytes],
    count: int,
    rate: float,
    max_seconds: float,
    gateway_public: bytes,
    client_rate: float = 200.0,
    client_delay: float = 1.0,
) -> FloodReport:
    """Spoofed flood of prebuilt packets, counting type-3 replies from `port` seen on
    `sniff_ifname`; meanwhile a CookieClient from this namespace's own address answers
    cookies and keeps sending (from `client_delay` s until the flood ends)."""
    sn = Sniffer(sniff_ifname, port, src_port=True, first_word=int(MessageType.COOKIE_REPLY) << 24,
                 size=COOKIE_REPLY_SIZE)  # fmt: skip
    client = CookieClient(dst, port, gateway_public)
    stop = threading.Event()

    def client_run() -> None:
        if stop.wait(client_delay):
            return
        t0 = time.monotonic()
        client.run(max(0.5, flood_seconds - client_delay - 0.5), client_rate)
        report.client_seconds = time.monotonic() - t0

    flood_seconds = min(max_seconds, count / rate if rate else max_seconds)
    report = FloodReport(BlastResult(), 0, 0)
    th = threading.Thread(target=client_run, daemon=True)
    th.start()
    try:
        report.flood = spoof_blast(dst, packets, count, rate=rate, max_seconds=max_seconds)
    finally:
        stop.set()
        th.join(timeout=max_seconds + 5)
        time.sleep(0.3)  # the last replies in flight
        got, dropped = sn.stats()
        sn.close()
        client.close()
    report.cookie_replies = got
    report.cookie_replies_dropped_by_sniffer = dropped
    report.client_cookies = client.cookies
    report.client_sent_with_mac2 = client.sent_with_mac2
    return report


# --------------------------------------------------------------------------- counters


def link_stats(ifname: str) -> dict[str, int]:
    """rx/tx packet and drop counters of an interface in the current namespace, from
    /proc/net/dev (which follows the calling task's namespace; /sys does not after setns)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == ifname:
                v = [int(x) for x in rest.split()]
                return {"rx_packets": v[1], "rx_dropped": v[3], "tx_packets": v[9],
                        "tx_dropped": v[11]}  # fmt: skip
    raise FileNotFoundError(f"no interface {ifname} in this namespace")


def snmp(proto: str = "Udp") -> dict[str, int]:
    """One protocol's counters from /proc/net/snmp of the current namespace (e.g. Udp
    RcvbufErrors, Icmp InEchos)."""
    with open("/proc/net/snmp") as f:
        lines = [ln.split() for ln in f if ln.startswith(proto + ":")]
    names, values = lines[0][1:], lines[1][1:]
    return {k: int(v) for k, v in zip(names, values, strict=True)}


def net_counters(ifnames: Sequence[str]) -> dict[str, int]:
    """Interface counters (prefixed "<ifname>.") plus Udp and Icmp snmp counters of the
    current namespace, in one snapshot."""
    out: dict[str, int] = {}
    for name in ifnames:
        for k, v in link_stats(name).items():
            out[f"{name}.{k}"] = v
    for k, v in snmp("Udp").items():
        out[f"Udp.{k}"] = v
    for k, v in snmp("Icmp").items():
        out[f"Icmp.{k}"] = v
    return out


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def rss_kib(pid: int) -> int:
    """Resident set size of pid in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pids_rss(pids: Iterable[int]) -> dict[int, int]:
    return {p: rss_kib(p) for p in pids}


def cpu_count() -> int:
    return os.cpu_count() or 1
