"""The raw facts behind `shardwg check`: kernel features the data path uses, the native data
path, and the cores this process may use.

Probes that must create something (a multiqueue TUN, sockets, a reuseport BPF program) run in
a forked child that first moves into a new network namespace of its own (unshare
CLONE_NEWNET): everything it makes disappears with it, and the host's interfaces and ports are
never touched. Without the privilege for that, they run in the current namespace on a
non-persistent TUN with a name of our own and loopback sockets, all closed before returning.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import select
import signal
import socket
import struct
import time
from collections.abc import Callable

import msgspec

from shardwg.observe.cpus import affinity_cores, cgroup_cpu_limit, default_workers
from shardwg.shm import ordering

CLONE_NEWNET = 0x40000000
PROBE_TIMEOUT = 20.0  # seconds the probing child may take
SEGMENT = 1000  # UDP GSO probe: 3 datagrams of this size in one send


class Probes(msgspec.Struct):
    """Raw facts; an error text (or False) where something is missing."""

    kernel: str = ""
    machine: str = ""  # platform.machine(): more than one worker needs x86-64
    root: bool = False
    where: str = ""  # where the network probes ran
    tun: str | None = None  # error opening /dev/net/tun
    multiqueue: str | None = None  # error creating a 2-queue IFF_MULTI_QUEUE|IFF_VNET_HDR TUN
    tun_tso: bool = False
    tun_uso: bool = False
    udp_gso: str | None = None
    udp_gro: bool = False
    reuseport_bpf: str | None = None
    tun_steering: str | None = None  # error loading the TUN steering program (eBPF, CAP_BPF)
    recvmmsg: bool = False
    native: str | None = None  # OpenSSL version of the native data path
    native_error: str = ""  # why it is not there
    native_disabled: bool = False  # SHARDWG_NATIVE=0
    cpus_online: int = 0
    affinity: int = 0
    cgroup_limit: int | None = None
    workers: int = 0


# -- probes ---------------------------------------------------------------------------------


def probe() -> Probes:
    """The network probes (in a throwaway namespace when allowed), then the rest on top."""
    p = _in_throwaway_namespace()
    if p is None:
        p = _net_probes()
        p.where = "the current network namespace (no right to make a new one)"
    p.kernel = platform.release()
    p.root = os.geteuid() == 0
    p.cpus_online = os.cpu_count() or 1
    p.affinity = affinity_cores()
    p.cgroup_limit = cgroup_cpu_limit()
    p.machine = ordering.machine()
    usable = default_workers(p.affinity, p.cgroup_limit)
    p.workers = usable if ordering.multi_worker_ok() else 1  # as shardwg run decides
    p.native, p.native_error = _native()
    p.native_disabled = os.environ.get("SHARDWG_NATIVE", "") == "0"
    from shardwg.io import mmsg

    p.recvmmsg = mmsg.available()
    return p


def _native() -> tuple[str | None, str]:
    try:
        from shardwg.datapath import _native  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, str(exc)
    return str(getattr(_native, "OPENSSL_VERSION", "unknown OpenSSL")), ""


def _in_throwaway_namespace() -> Probes | None:
    """The network probes in a forked child inside a new network namespace; None when the
    child cannot unshare (not privileged): the caller probes here instead."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                os._exit(3)
            from shardwg.io import netlink

            netlink.set_link_up("lo", 65536)
            net = _net_probes()
            net.where = "a throwaway network namespace"
            os.write(w, msgspec.json.encode(net))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        _reap(pid)
    if not data:
        return None
    return msgspec.json.decode(data, type=Probes)


def _reap(pid: int) -> None:
    for _ in range(100):
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _net_probes() -> Probes:
    p = Probes()
    p.tun, p.multiqueue, p.tun_tso, p.tun_uso = _tun_probes()
    p.udp_gso = _attempt(_udp_gso)
    p.udp_gro = _attempt(_udp_gro) is None
    p.reuseport_bpf = _attempt(_reuseport_bpf)
    p.tun_steering = _attempt(_tun_steering)
    return p


def _attempt(fn: Callable[[], None]) -> str | None:
    try:
        fn()
    except OSError as exc:
        return exc.strerror or str(exc)
    except Exception as exc:  # a probe must never take the check down
        return str(exc)
    return None


def _tun_probes() -> tuple[str | None, str | None, bool, bool]:
    from shardwg.io.tun import TunDevice
    from shardwg.io.vnet import TUN_F_TCP, TUN_F_UDP

    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return exc.strerror or str(exc), "no /dev/net/tun", False, False
    name = f"swgchk{os.getpid() % 100000}"
    try:
        tun = TunDevice.create(name, queues=2, multi_queue=True, vnet_hdr=True, exclusive=True)
    except OSError as exc:
        return None, exc.strerror or str(exc), False, False
    try:  # non-persistent: the link goes away with the last queue closed below
        tso = _attempt(lambda: tun.set_offload(TUN_F_TCP)) is None
        uso = tso and _attempt(lambda: tun.set_offload(TUN_F_TCP | TUN_F_UDP)) is None
    finally:
        tun.close()
    return None, None, tso, uso


def _udp_pair() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(1.0)
    return rx, tx


def _udp_gso() -> None:
    """One sendmsg with UDP_SEGMENT must arrive as three datagrams."""
    from shardwg.io.udpgso import SOL_UDP, UDP_SEGMENT

    rx, tx = _udp_pair()
    with rx, tx:
        cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", SEGMENT))]
        tx.sendmsg([b"g" * (3 * SEGMENT)], cmsg, 0, rx.getsockname())
        sizes = [len(rx.recv(65536)) for _ in range(3)]
    if sizes != [SEGMENT] * 3:
        raise OSError(errno.EINVAL, f"UDP_SEGMENT send arrived as {sizes}")


def _udp_gro() -> None:
    from shardwg.io.udpgso import SOL_UDP, UDP_GRO

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(SOL_UDP, UDP_GRO, 1)


def _reuseport_bpf() -> None:
    from shardwg.io import steering

    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        socks[0].bind(("127.0.0.1", 0))
        socks[1].bind(socks[0].getsockname())
        steering.attach(socks[0], 2)
    finally:
        for s in socks:
            s.close()


def _tun_steering() -> None:
    """The TUN steering program and its maps load (bpf(2): CAP_BPF, Linux 5.12+); nothing is
    attached, and they go with their fds."""
    from shardwg.io import tun_steering

    prog, trie = tun_steering.load_routed()
    os.close(prog)
    os.close(trie)
