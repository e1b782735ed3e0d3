"""An in-memory TUN queue for the real worker, as wireguard-go's `tun/tuntest` is for its device.

Why a socketpair: the worker only ever reads and writes its queue's file descriptor
(`io/tun.read_batch`: unbuffered readinto until EAGAIN; `io/tun.write_packet`: os.write;
epoll for readiness). An AF_UNIX SOCK_SEQPACKET socketpair keeps what those calls rely on
from a TUN queue opened with IFF_TUN | IFF_NO_PI | IFF_VNET_HDR: one read returns one whole
frame (truncated if the buffer is short), one write sends one frame, the worker's end is
non-blocking and pollable. No root, no /dev/net/tun, and no change to the worker.

The test holds the other end and plays the kernel: `write` delivers a packet to the worker
as the host's stack would (a 10-byte virtio_net_hdr, all zero for a plain packet, then the
IP packet); `read` returns what the worker wrote towards the host, header checked and
stripped. What the double does not do: route, check IP headers, segment GSO frames (the
worker only writes those when offloads are on; `read_frame` returns them as they are).
"""

from __future__ import annotations

import select
import socket
import struct

from lab.ping import checksum
from shardwg.io.vnet import GSO_NONE, VNET, VNET_HDR_LEN, ZERO_HDR

FRAME_BUFFER = 1 << 17  # socket buffers: room for a few 64 KiB coalesced frames


class TunQueue:
    """One queue: `fd` goes to the Worker, the test talks through write/read."""

    def __init__(self) -> None:
        self._worker, self._host = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        for s in (self._worker, self._host):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FRAME_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FRAME_BUFFER)
        self._worker.setblocking(False)
        self._host.setblocking(False)

    @property
    def fd(self) -> int:
        """The worker's end (what `TunDevice.fds[i]` would be)."""
        return self._worker.fileno()

    def write(self, packet: bytes, header: bytes = ZERO_HDR) -> None:
        """Deliver an IP packet to the worker, as if the host routed it into the tunnel."""
        if len(header) != VNET_HDR_LEN:
            raise ValueError(f"virtio_net_hdr is {VNET_HDR_LEN} bytes, not {len(header)}")
        self._host.send(header + packet)

    def read_frame(self, timeout: float = 2.0) -> tuple[tuple[int, ...], bytes] | None:
        """The next frame the worker wrote: (decoded virtio_net_hdr fields, packet), or None
        when nothing arrives within `timeout` seconds."""
        ready, _, _ = select.select([self._host], [], [], timeout)
        if not ready:
            return None
        frame = self._host.recv(FRAME_BUFFER)
        if len(frame) < VNET_HDR_LEN:
            raise AssertionError(f"the worker wrote a {len(frame)}-byte frame, no vnet header")
        return VNET.unpack_from(frame), frame[VNET_HDR_LEN:]

    def read(self, timeout: float = 2.0) -> bytes | None:
        """The next plain packet the worker wrote (a GSO frame is an error here)."""
        got = self.read_frame(timeout)
        if got is None:
            return None
        hdr, packet = got
        if hdr[1] != GSO_NONE:
            raise AssertionError(f"GSO frame (type {hdr[1]}); use read_frame")
        return packet

    def drain(self) -> list[bytes]:
        """Every frame waiting now (headers stripped), without waiting."""
        out = []
        while (got := self.read_frame(0.0)) is not None:
            out.append(got[1])
        return out

    def close(self) -> None:
        self._worker.close()
        self._host.close()

    def __enter__(self) -> TunQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, ttl: int = 64) -> bytes:
    """A valid IPv4/UDP packet (both checksums filled in), as a host would send it."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    udp_len = 8 + len(payload)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, ttl,
                      socket.IPPROTO_UDP, 0, s, d)  # fmt: skip
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + udp
