"""Sniffing: an AF_PACKET socket with a classic BPF filter that counts
(PACKET_STATISTICS) or captures matching UDP datagrams on one interface."""

from __future__ import annotations

import contextlib
import ctypes
import select
import socket
import struct
import time

from shardwg.proto.constants import (
    TRANSPORT_MIN_SIZE,
    MessageType,
)

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
