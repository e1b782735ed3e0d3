"""A gateway in memory: the real engine on `tuntest` queues and `bindtest` sockets, no root.

`MemoryGateway` plays the supervisor's process side and nothing else: it creates the shared
region (POSIX shm in /dev/shm, which any user may use), one in-memory TUN queue and one
loopback reuseport socket per worker, the handoff eventfds, and forks every worker through
the real `engine.boot.boot_worker` with the same `BootContext` the supervisor builds. The
workers are real processes (a kill is a SIGKILL; a replacement boots from the slot its
predecessor published). Live configuration is the real `LiveConfig`, driving the workers
through their control sockets; the gateway is its `EngineControl`.

Not here: the TUN device, netlink routes, UAPI socket, metrics, heartbeat policing and
restart storms (tests/test_supervisor.py covers those against a real gateway).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from lab.bindtest import LoopbackGroup
from lab.tuntest import TunQueue
from shardwg.config.model import Config, Endpoint, InterfaceConfig, PeerConfig
from shardwg.engine import control
from shardwg.engine.boot import boot_worker
from shardwg.engine.context import BootContext, SharedMemory
from shardwg.engine.exits import EXIT_CRASH
from shardwg.engine.live import LiveConfig
from shardwg.proto import crypto
from shardwg.proto.cookie import ROTATE_INTERVAL
from shardwg.proto.ownership import owner_of
from shardwg.shm import counters as C
from shardwg.shm.handoff import HandoffMesh
from shardwg.shm.layout import GlobalState, Layout, encode_global
from shardwg.shm.peerslot import PeerRecord, decode_peer
from shardwg.shm.region import SharedRegion, region_name
from shardwg.shm.secrets import CookieSecrets, SecretArea, encode_cookie

log = logging.getLogger("lab.enginetest")
_names = itertools.count()
STOP_WAIT = 3.0


def new_key() -> tuple[bytes, bytes]:
    """(private, public) raw keys."""
    private = crypto.generate_private_key(os.urandom(32))
    return private, crypto.public_key(private)


def key_owned_by(worker: int, workers: int) -> tuple[bytes, bytes]:
    """A key pair whose public key `owner_of` gives to `worker` (bounded tries)."""
    for _ in range(64 * workers):
        private, public = new_key()
        if owner_of(public, workers) == worker:
            return private, public
    raise RuntimeError(f"no key owned by worker {worker} of {workers}")


def peer(public: bytes, allowed: list[str], endpoint: tuple[str, int] | None = None,
         keepalive: int = 0) -> PeerConfig:  # fmt: skip
    return PeerConfig(
        public_key=public,
        allowed_ips=allowed,
        endpoint=Endpoint(*endpoint) if endpoint else None,
        persistent_keepalive=keepalive,
    )


def config(private: bytes, peers: list[PeerConfig]) -> Config:
    """Table = off: there is no interface to route to."""
    return Config(InterfaceConfig(private_key=private, table="off"), peers)


class MemoryGateway:
    def __init__(self, cfg: Config, workers: int = 1, capacity: int = 64) -> None:
        self.workers = workers
        self.ifname = f"swm{os.getpid() % 100000}x{next(_names)}"[:15]
        self.layout = Layout.sized(workers, capacity, mtu=cfg.interface.mtu)  # as supervisor
        self.region = SharedRegion.create(region_name(self.ifname), self.layout.total_size)
        self.layout.write_to(self.region.buf)
        self.tun = [TunQueue() for _ in range(workers)]
        self.group = LoopbackGroup(workers)
        self.eventfds = HandoffMesh.make_eventfds(workers)
        self.slot_of = {p.public_key: i for i, p in enumerate(cfg.peers)}
        self.pids = [0] * workers
        self.restarts = [0] * workers
        self.controls: list[socket.socket | None] = [None] * workers
        now = time.monotonic()
        self.secrets = SecretArea(self.layout.peer_capacity)  # inherited by the forked shards
        self.secrets.cookie_slot().write(encode_cookie(CookieSecrets(
            os.urandom(32), now, os.urandom(32), now + ROTATE_INTERVAL
        )))  # fmt: skip
        self.global_state = GlobalState(
            workers=workers, peer_capacity=capacity, supervisor_pid=os.getpid(),
            interface=self.ifname, listen_port=self.group.port, started_wall=time.time(),
        )  # fmt: skip
        self.layout.global_slot(self.region.buf).write(encode_global(self.global_state))
        self.live = LiveConfig(
            cfg, None, ifname=self.ifname, slot_of=self.slot_of, engine=self,
            memory=SharedMemory(self.layout, self.region, self.secrets),
        )  # fmt: skip
        self.public_key = crypto.public_key(cfg.interface.private_key)

    @property
    def addr(self) -> tuple[str, int]:
        return self.group.addr

    # ------------------------------------------------------------------ workers
    def boot_context(self, index: int) -> BootContext:
        return BootContext(
            config=self.live.config,
            workers=self.workers,
            layout=self.layout,
            buf=self.region.buf,
            secrets=self.secrets,
            slot_of=self.slot_of,
            eventfds=self.eventfds,
            tun_fd=self.tun[index].fd,
            udp4=self.group.socks[index],
            udp6=None,
        )

    def start(self, index: int | None = None) -> None:
        """Fork worker `index` (every worker if None), as WorkerPool.spawn does."""
        for i in range(self.workers) if index is None else [index]:
            ctx = self.boot_context(i)
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = EXIT_CRASH
                try:
                    parent_end.close()
                    code = boot_worker(ctx, i, self.restarts[i], child_end)
                except BaseException:
                    log.exception("worker %d crashed", i)
                finally:
                    os._exit(code)
            child_end.close()
            old = self.controls[i]
            if old is not None:
                old.close()
            self.controls[i] = parent_end
            self.pids[i] = pid

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until every started worker has published its pid and a heartbeat."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.stats()
            if all(s.pid == p and s.heartbeat > 0 for s, p in zip(stats, self.pids, strict=True)
                   if p):  # fmt: skip
                return
            time.sleep(0.01)
        raise TimeoutError(f"{self.ifname}: workers {self.pids} not beating")

    def kill(self, index: int) -> int:
        """SIGKILL worker `index` and reap it; returns its wait status."""
        pid = self.pids[index]
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        self.pids[index] = 0
        return status

    def replace(self, index: int) -> None:
        """Boot a replacement into a dead worker's slot (the supervisor's `_reap`)."""
        self.restarts[index] += 1
        self.start(index)

    def stop(self) -> list[int]:
        """SIGTERM every worker, wait (then SIGKILL); exit codes of those that exited."""
        codes = []
        for pid in self.pids:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        for i, pid in enumerate(self.pids):
            if not pid:
                continue
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes.append(os.waitstatus_to_exitcode(status))
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
            self.pids[i] = 0
        return codes

    # ------------------------------------------------------------------ observing
    def stats(self) -> list[C.WorkerStats]:
        return C.read_all(self.region.buf, self.layout.counters_offset, self.workers)

    def total(self) -> C.WorkerStats:
        return C.total(self.stats())

    def record(self, public: bytes) -> PeerRecord | None:
        """The peer's record in its shared-memory slot (None: no slot, or never written)."""
        index = self.slot_of.get(public)
        return None if index is None else self.record_at(index)

    def session(self, public: bytes, timeout: float = 5.0) -> PeerRecord:
        """The peer's record once it holds a current session (the owner publishes at the end
        of the loop turn that confirmed it, which may be after the packets of that turn)."""
        found: list[PeerRecord] = []

        def published() -> bool:
            rec = self.record(public)
            if rec is None or rec.current is None:
                return False
            found.append(rec)
            return True

        if not wait_for(published, timeout):
            raise TimeoutError(f"no current session published for {public.hex()[:8]}")
        return found[-1]

    def record_at(self, index: int) -> PeerRecord | None:
        return decode_peer(self.layout.peer_slot(self.region.buf, index).read())

    def read_tun(self, timeout: float = 2.0, pump: Callable[[], object] | None = None
                 ) -> tuple[int, bytes] | None:  # fmt: skip
        """(queue, packet) of the next packet any worker wrote to its TUN queue; `pump` runs
        while waiting (a `Wire` to forward)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, q in enumerate(self.tun):
                got = q.read(0.0)
                if got is not None:
                    return i, got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pump is not None:
                pump()
            select.select([q._host for q in self.tun], [], [], min(left, 0.01))

    # ------------------------------------------------------------------ EngineControl
    def listen_port(self) -> int:
        return self.group.port

    def broadcast(self, data: bytes) -> None:
        """As the supervisor's, but blocking (the supervisor queues: control_link.py)."""
        frame = control.frame_bytes(data)
        for pid, ctl in zip(self.pids, self.controls, strict=True):
            if pid and ctl is not None:
                ctl.sendall(frame)

    def set_fwmark(self, mark: int) -> None:
        for s in self.group.socks:  # needs CAP_NET_ADMIN, as in the real gateway
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)

    def restart_workers(self, keep_sessions: bool) -> None:
        self.stop()
        if not keep_sessions:
            assert self.live.memory is not None
            self.live.memory.wipe_sessions()  # as the supervisor's
        for i in range(self.workers):
            self.restarts[i] += 1
        self.start()

    def rebind(self, port: int) -> None:
        raise NotImplementedError("the in-memory gateway keeps its loopback port")

    def set_peer_slots(self, high_water: int) -> None:
        self.global_state.peer_slots = max(1, high_water)
        self.layout.global_slot(self.region.buf).write(encode_global(self.global_state))

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        self.stop()
        for ctl in self.controls:
            if ctl is not None:
                ctl.close()
        for q in self.tun:
            q.close()
        self.group.close()
        HandoffMesh.close_eventfds(self.eventfds)
        self.secrets.wipe()
        with contextlib.suppress(BufferError):  # views of shards built here may remain
            self.secrets.close()
        self.region.zero()
        self.region.unlink()
        try:
            self.region.close()
        except BufferError:  # a shard built in this process still holds views (cycles)
            gc.collect()
            with contextlib.suppress(BufferError):
                self.region.close()  # else unmapped at exit; the name is already gone

    def __enter__(self) -> MemoryGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_all(*gateways: MemoryGateway) -> None:
    """Fork every worker of each gateway, in order, and wait until each one beats."""
    for gw in gateways:
        gw.start()
        gw.wait_ready()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0,
             pump: Callable[[], object] | None = None) -> bool:  # fmt: skip
    """Poll `cond` (running `pump` between polls) until true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if pump is not None:
            pump()
        time.sleep(0.005)
    return cond()
