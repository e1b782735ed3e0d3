"""TUN queues: creation via ioctl, batched non-blocking reads and writes, foreign-queue detection.

Each queue is its own fd on /dev/net/tun. With IFF_MULTI_QUEUE the supervisor opens one per worker
up front (see ENGINE-NOTES) so a worker restart never changes the queue set. Anyone with
CAP_NET_ADMIN can attach one more queue to a multiqueue TUN by name and take a share of the traffic,
so `foreign_queue_holders` scans /proc for exactly that.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import socket
import struct
from collections.abc import Sequence

from shardwg.io import netlink

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETQUEUE = 0x400454D9
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
VNET_HDR_LEN = 10
MAX_QUEUES = 256

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name + ifr_flags, padded to 40 bytes
_BAD_NAME_CHARS = frozenset("/: \t\n\r\v\f%")
_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EIO, errno.ENOMEM})


class TunError(OSError):
    """TUN setup failed; the message says why in operator terms."""


def _check_name(name: str) -> bytes:
    """Apply the kernel's dev_valid_name rules up front so the error names the real cause."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise TunError(errno.EINVAL, f"interface name {name!r} must be 1-{IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in _BAD_NAME_CHARS for c in name):
        raise TunError(errno.EINVAL, f"interface name {name!r} has a character Linux rejects")
    return raw


def _open_queue(raw_name: bytes, flags: int) -> tuple[int, str]:
    """Open /dev/net/tun and bind it to the interface; returns (fd, name the kernel used)."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise TunError(errno.ENOENT, f"{TUN_PATH} is missing (no tun module or device node)") from e
    except PermissionError as e:
        raise TunError(e.errno, f"no permission to open {TUN_PATH} (need CAP_NET_ADMIN)") from e
    try:
        out = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw_name, flags))
    except OSError as e:
        os.close(fd)
        raise _explain_setiff(raw_name.decode(), flags, e) from e
    return fd, _IFREQ.unpack(out)[0].rstrip(b"\0").decode()


def _explain_setiff(name: str, flags: int, e: OSError) -> TunError:
    """Turn TUNSETIFF's bare errno into a cause an operator can act on."""
    kind = netlink.link_kind(name) if e.errno in (errno.EINVAL, errno.EBUSY) else None
    if e.errno in (errno.EPERM, errno.EACCES):
        why = "no permission (need CAP_NET_ADMIN, or the tun is owned by another user)"
    elif kind is not None and kind != "tun":
        why = f"an interface of that name exists already and is a {kind or 'non-tun device'}"
    elif e.errno == errno.EINVAL and kind == "tun":
        mq = "with" if flags & IFF_MULTI_QUEUE else "without"
        why = f"a tun of that name exists with other flags (we asked {mq} IFF_MULTI_QUEUE)"
    elif e.errno == errno.EBUSY:
        why = "the tun exists and is in use (single-queue, or exclusive was requested)"
    else:
        why = e.strerror or "TUNSETIFF failed"
    return TunError(e.errno or errno.EINVAL, f"cannot open tun {name!r}: {why}")


class TunDevice:
    """A TUN interface with one or more queues (IFF_TUN|IFF_NO_PI, optional multiqueue/vnet hdr)."""

    def __init__(self, name: str, fds: list[int], flags: int) -> None:
        self.name = name
        self.fds = fds
        self.flags = flags
        self.vnet_hdr = bool(flags & IFF_VNET_HDR)
        self.detached: set[int] = set()

    @classmethod
    def create(
        cls,
        name: str,
        queues: int = 1,
        multi_queue: bool = True,
        vnet_hdr: bool = False,
        *,
        exclusive: bool = False,
    ) -> TunDevice:
        """Create (or attach to an existing persistent) TUN with `queues` non-blocking fds.

        exclusive=True sets IFF_TUN_EXCL: fail with EBUSY instead of joining a TUN that exists.
        """
        if not 1 <= queues <= MAX_QUEUES:
            raise TunError(errno.EINVAL, f"queues must be 1-{MAX_QUEUES}, got {queues}")
        raw = _check_name(name)
        flags = IFF_TUN | IFF_NO_PI
        if queues > 1 or multi_queue:
            flags |= IFF_MULTI_QUEUE
        if vnet_hdr:
            flags |= IFF_VNET_HDR
        fd, real = _open_queue(raw, flags | (IFF_TUN_EXCL if exclusive else 0))
        dev = cls(real, [fd], flags)
        try:
            for _ in range(queues - 1):
                dev.attach_queue()
        except BaseException:
            dev.close()
            raise
        return dev

    @property
    def multi_queue(self) -> bool:
        return bool(self.flags & IFF_MULTI_QUEUE)

    @property
    def attached_fds(self) -> list[int]:
        """Queue fds currently in the kernel's rotation (fdinfo cannot tell detached ones)."""
        return [fd for fd in self.fds if fd not in self.detached]

    def attach_queue(self) -> int:
        """Open one more queue on this TUN and return its fd (multiqueue only)."""
        if not self.multi_queue:
            raise TunError(errno.EINVAL, f"tun {self.name!r} is single-queue")
        fd, _ = _open_queue(self.name.encode(), self.flags)
        self.fds.append(fd)
        return fd

    def detach_queue(self, fd: int) -> None:
        """Take a queue out of the kernel's rotation without closing it (kept for reattach)."""
        self._set_queue(fd, IFF_DETACH_QUEUE)
        self.detached.add(fd)

    def reattach_queue(self, fd: int) -> None:
        """Put a detached queue back into rotation."""
        self._set_queue(fd, IFF_ATTACH_QUEUE)
        self.detached.discard(fd)

    def _set_queue(self, fd: int, flag: int) -> None:
        if fd not in self.fds:
            raise TunError(errno.EBADF, f"fd {fd} is not a queue of tun {self.name!r}")
        try:
            fcntl.ioctl(fd, TUNSETQUEUE, _IFREQ.pack(b"", flag))
        except OSError as e:
            raise TunError(e.errno or errno.EINVAL, f"TUNSETQUEUE on {self.name!r}: {e}") from e

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD (TUN_F_*): lets the kernel hand over GSO super-packets (vnet_hdr only)."""
        fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, flags)

    def close(self) -> None:
        """Close every queue fd; the kernel removes a non-persistent link with the last one."""
        fds, self.fds = self.fds, []
        self.detached.clear()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_files: dict[int, io.FileIO] = {}


def _file(fd: int) -> io.FileIO:
    """A cached unbuffered FileIO over fd: readinto returns None on EAGAIN, so no exception per
    empty poll and no per-call list as os.readv needs. closefd=False: the number is all it holds,
    so a closed-and-reused fd number still reads the file now behind it."""
    f = _files.get(fd)
    if f is None:
        f = _files[fd] = io.FileIO(fd, "rb", closefd=False)
    return f


def read_batch(
    fd: int,
    bufs: Sequence[bytearray | memoryview],
    sizes: list[int],
    max_packets: int,
) -> int:
    """Read up to max_packets packets (one per buffer) into preallocated buffers; return the count.

    Stops at the first EAGAIN (a detached queue just reads EAGAIN). Another error after some
    packets were read returns what was read (the next call raises it); with nothing read it
    raises OSError (e.g. EBADFD: the tun was deleted under us).
    """
    f = _file(fd)
    n = 0
    limit = min(max_packets, len(bufs))
    while n < limit:
        try:
            got = f.readinto(bufs[n])
        except OSError:
            if n:
                return n
            raise
        if got is None:
            break
        sizes[n] = got
        n += 1
    return n


def write_packet(fd: int, data: bytes | bytearray | memoryview) -> bool:
    """Write one packet; False (a drop for the caller to count) when the kernel refuses it.

    EAGAIN/ENOBUFS/ENOMEM are load, EINVAL a malformed packet (not IPv4/IPv6), EIO a link that is
    down: all per-packet outcomes, never exceptions on the hot path. EBADF/EBADFD still raise.
    """
    try:
        os.write(fd, data)
    except OSError as e:
        if e.errno in _DROP_ERRNOS:
            return False
        raise
    return True


def _netns_id(pid: int | str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def queue_holders(name: str, *, same_netns: bool = True) -> dict[int, int]:
    """PID -> number of queue fds of tun `name` it holds, from /proc/*/fdinfo "iff:" lines.

    A queue detached with TUNSETQUEUE still names its tun there (the kernel keeps the binding
    so it can reattach), so detached queues count too: right for spotting foreign holders,
    who can reattach at will. TunDevice.attached_fds knows our own split.
    Names are per network namespace, so by default only processes in our own namespace are
    considered (an attacher must have opened /dev/net/tun in the tun's namespace; one that
    moves away afterwards is missed: a known limit).
    """
    want = f"iff:\t{name}\n"
    ours = _netns_id("self") if same_netns else None
    held: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if ours is not None and _netns_id(pid) != ours:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != TUN_PATH:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as fi:
                    info = fi.read()
            except OSError:
                continue
            if want in info:
                held[pid] = held.get(pid, 0) + 1
    return held


def attached_queue_count(name: str) -> int | None:
    """Queues of tun `name` in the kernel's rotation right now, from sysfs (one directory
    listing: a multiqueue TUN has one queues/tx-N per attached queue); None when this mount
    namespace's /sys does not show our netns's `name` (then only `queue_holders` can tell).
    """
    base = f"/sys/class/net/{name}"
    try:
        with open(f"{base}/ifindex") as f:
            if int(f.read()) != socket.if_nametoindex(name):
                return None  # a /sys of another network namespace
        return sum(1 for e in os.listdir(f"{base}/queues") if e.startswith("tx-"))
    except (OSError, ValueError):
        return None


def count_queues(name: str) -> int:
    """How many queue fds are bound to tun `name` right now (all processes, our netns;
    attached or detached)."""
    return sum(queue_holders(name).values())


def foreign_queue_holders(name: str, our_pids: set[int]) -> list[int]:
    """PIDs outside our_pids that hold an attached queue of tun `name` (sorted)."""
    return sorted(pid for pid in queue_holders(name) if pid not in our_pids)
