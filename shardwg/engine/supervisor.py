"""The supervisor: sets the gateway up, forks one worker per shard, keeps them alive.

Start-up order matters. The supervisor creates the shared-memory region, every
TUN queue and every UDP socket (in join order) before the first fork and keeps
them open for its whole life, so the reuseport group's slots never move: a
replacement worker inherits exactly the socket and queue its predecessor had,
and datagrams that arrive meanwhile wait in that socket's buffer.

Signal handlers only set flags and poke a wake-up pipe; the loop does the work
(`_handle_signal`). Every turn it reaps dead workers (replaced at once) and kills
stuck ones (engine/workers.py), rotates the shared cookie secret and publishes the
shared under-load flag (engine/global_block.py), drives placement (engine/placer.py)
and live configuration (engine/live.py), and checks that no foreign process has
attached a queue to our TUN.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shardwg.config.keys import encode_key
from shardwg.config.model import Config, packet_spread_peers, spread_settings
from shardwg.datapath import select as datapath_select
from shardwg.engine import control
from shardwg.engine.boot import boot_worker
from shardwg.engine.context import BootContext, SharedMemory
from shardwg.engine.exits import EXIT_FOREIGN_QUEUE
from shardwg.engine.global_block import GlobalBlock
from shardwg.engine.hooks import HookError, Hooks, trust_problem
from shardwg.engine.live import LiveConfig, warn_low_order
from shardwg.engine.placement import tun_routes
from shardwg.engine.placer import Placer
from shardwg.engine.workers import WorkerPool, WorkerSlot, no_core_dumps
from shardwg.io import netlink, steering
from shardwg.io import tun as tun_io
from shardwg.io.interface import Gateway, GatewayError
from shardwg.io.tun_steering import TunSteering
from shardwg.observe.metrics import MetricsServer
from shardwg.observe.status import HEALTHY_BEAT, GatewayStatus, read_status, with_config
from shardwg.proto.keypair import AeadSelfTestError, aead_self_test
from shardwg.shm import counters as C
from shardwg.shm import ordering
from shardwg.shm.handoff import HandoffMesh
from shardwg.shm.layout import MAX_PEERS, GlobalState, Layout
from shardwg.shm.placement import Mode, SpreadWhy
from shardwg.shm.region import RegionError, SharedRegion, region_name
from shardwg.shm.secrets import SecretArea
from shardwg.uapi.server import UapiServer

log = logging.getLogger("shardwg.engine.supervisor")

FOREIGN_CHECK_INTERVAL = 1.0  # attached queues counted in sysfs: one directory listing
FOREIGN_SCAN_INTERVAL = 30.0  # every process's fds read from /proc even when the count is ours
LOOP_INTERVAL = 0.1
_HEARTBEAT = struct.Struct("@d")


class SupervisorError(Exception):
    pass


@dataclass
class Supervisor:
    start_config: Config  # the running one is `config` (live changes included)
    ifname: str
    workers: int
    gateway: Gateway | None = None
    region: SharedRegion | None = None
    secrets: SecretArea | None = None  # session keys and cookie secrets: never in `region`
    layout: Layout | None = None
    slot_of: dict[bytes, int] = field(default_factory=dict)
    pool: WorkerPool = field(init=False)  # the worker processes (engine/workers.py)
    eventfds: list[int] = field(default_factory=list)
    config_path: str | None = None
    exit_code: int = 0
    live: LiveConfig | None = None
    uapi: UapiServer | None = None
    metrics_addr: tuple[str, int] | None = None
    tun_offload: str = "auto"  # "on", "off", or "auto": on with the native kernel only
    metrics: MetricsServer | None = None
    run_hooks: bool = True  # wg-quick's PreUp/PostUp/PreDown/PostDown (False: --no-hooks)
    set_dns: bool = True  # DNS = through resolvconf (False: --no-dns)
    hooks: Hooks | None = None
    placement: str = "load"  # --placement: load, count or hash (engine/placement.py)
    spread: str = "auto"  # --spread: off, auto or on (engine/placement.spread_reasons)
    placer: Placer | None = None
    tun_steering: TunSteering | None = None  # io/tun_steering.py (2 workers or more)
    shared: GlobalBlock | None = None  # GlobalState and the cookie secret (the workers')
    _stop: bool = False
    _wake_r: int = -1
    _wake_w: int = -1
    _next_scan: float = 0.0

    def __post_init__(self) -> None:
        self.pool = WorkerPool(self.workers, self._worker_main, self.heartbeat)

    @property
    def config(self) -> Config:
        """The running configuration: live changes (UAPI, SIGHUP) included."""
        return self.live.config if self.live is not None else self.start_config

    # ------------------------------------------------------------------ set-up
    def _steer_tun(self, spread_now: Mapping[bytes, SpreadWhy]) -> None:
        """The TUN's steering follows the placement table: an unspread peer's packets to its
        owner's queue, a spread peer's flows to the queues in turn, and a `Spread = packets`
        peer's packets to the queues one by one (io/tun_steering.py)."""
        if self.tun_steering is None:
            return
        allowed = {p.public_key: p.allowed_ips for p in self.config.peers}
        owners = self.placer.owners if self.placer is not None else {}
        self.tun_steering.set_routes(tun_routes(allowed, owners, spread_now))  # before an
        self.tun_steering.set(bool(spread_now))  # attach, which fills the trie with them

    def wants_tun_offload(self) -> bool:
        """TSO/USO reads pay off when the native kernel cuts and checksums the super-packets;
        the pure-Python path does that at ~2.5 us per segment, a net loss, so auto keeps it
        off there (docs/performance.md)."""
        mode = self.tun_offload
        return mode == "on" or (mode == "auto" and datapath_select.current().name == "native")

    def start(self) -> None:
        n = self.workers
        try:
            ordering.check_workers(n)
        except ValueError as exc:
            raise SupervisorError(str(exc)) from exc
        try:  # before anything is created: a data path that cannot seal must not serve
            aead_self_test()
        except AeadSelfTestError as exc:
            raise SupervisorError(f"transport AEAD self-test failed: {exc}") from exc
        if len(self.config.peers) > MAX_PEERS:
            raise SupervisorError(
                f"{len(self.config.peers)} peers configured; a gateway holds at most {MAX_PEERS}"
            )
        no_core_dumps()
        for p in self.start_config.peers:
            warn_low_order(p, "config")
        self.slot_of = {p.public_key: i for i, p in enumerate(self.start_config.peers)}
        self.live = LiveConfig(
            self.start_config, self.config_path, ifname=self.ifname, slot_of=self.slot_of,
            engine=self,
        )  # fmt: skip
        self.uapi = UapiServer(self.ifname, self.live)
        try:
            self.uapi.start()
        except OSError as exc:
            self.uapi = None
            raise SupervisorError(
                f"UAPI socket for {self.ifname}: {exc} (is another instance running?)"
            ) from exc
        capacity = MAX_PEERS  # sized up front, sparse: only used slots cost memory
        self.layout = Layout.sized(n, capacity, mtu=self.config.interface.mtu)
        try:
            self.region = SharedRegion.create(region_name(self.ifname), self.layout.total_size)
        except RegionError as exc:
            raise SupervisorError(f"shared memory for {self.ifname}: {exc}") from exc
        buf = self.region.buf
        self.layout.write_to(buf)
        self.secrets = SecretArea(capacity)  # before the first fork: every worker inherits it
        self.live.memory = SharedMemory(self.layout, self.region, self.secrets)
        self.placer = Placer(Mode[self.placement.upper()], n, self.layout, buf, self._nudge)
        self.placer.spread_policy = self.spread
        self.placer.set_overrides(spread_settings(self.config), write=False,
                                  packets=packet_spread_peers(self.config))  # fmt: skip
        self.placer.start([p.public_key for p in self.config.peers], self.slot_of)
        self.live.placer = self.placer
        try:
            impl = datapath_select.current()  # chosen once, before the workers fork
        except ImportError as exc:  # SHARDWG_NATIVE=1 without the extension
            self._teardown()
            raise SupervisorError(str(exc)) from exc
        offload = self.wants_tun_offload()
        log.info("data path: %s; TUN offloads %s (--tun-offload %s)",
                 datapath_select.describe(impl),
                 "wanted" if offload else "off", self.tun_offload)  # fmt: skip
        self.gateway = Gateway(self.config, self.ifname, n, tun_offload=offload)
        self.hooks = Hooks(self.ifname, self.config.interface, self.run_hooks, self.set_dns)
        try:
            self._pre_up()
            self.gateway.open()
            for group in (self.gateway.udp4, self.gateway.udp6):
                if group:
                    steering.attach(group[0], n, spread=self.spread != "off")
            if n > 1 and self.gateway.tun is not None:  # TUN queues by route and in turn
                self.tun_steering = TunSteering(self.gateway.tun.fds[0])
                self.placer.on_spread = self._steer_tun
                self.placer.announce()
            self.hooks.set_dns()
        except HookError as exc:
            self._teardown()
            raise SupervisorError(str(exc)) from exc
        except BaseException:
            self._teardown()
            raise
        if self.config.interface.table == "off":
            log.info("Table = off: no routes added")
        state = GlobalState(
            workers=n,
            peer_capacity=capacity,
            supervisor_pid=os.getpid(),
            interface=self.ifname,
            listen_port=self.gateway.port,
            started_wall=time.time(),
            peer_slots=max(1, len(self.slot_of)),
            datapath=datapath_select.describe(impl),
        )
        self.shared = GlobalBlock(self.layout, buf, self.secrets, state)
        self.shared.start(time.monotonic())
        self.eventfds = HandoffMesh.make_eventfds(n)
        if self.metrics_addr is not None:
            try:
                self.metrics = MetricsServer(self.metrics_addr, self._status, self._ready)
            except OSError as exc:
                self._teardown()
                raise SupervisorError(f"--metrics {self.metrics_addr}: {exc}") from exc
            log.info("metrics on http://%s:%d/metrics", *self.metrics_addr)

    def _pre_up(self) -> None:
        """wg-quick's order: refuse an existing interface, then PreUp, then create it."""
        assert self.hooks is not None
        if netlink.link_exists(self.ifname):
            raise GatewayError(f"interface {self.ifname} already exists (another instance?)")
        if self.hooks.configured() and not self.run_hooks:
            log.info("%d hook(s) in the config not run (--no-hooks)", self.hooks.configured())
        elif self.hooks.configured():
            problem = trust_problem(self.config_path)
            if problem:
                raise HookError(f"refusing to run hooks as root: {problem}; chmod go-w / chown "
                                "root it, or --no-hooks")  # fmt: skip
        self.hooks.run("PreUp")

    def _pump(self) -> bool:
        """While a hook runs: serve the UAPI and metrics; False once asked to stop."""
        if self.uapi is not None:
            try:
                self.uapi.poll(0.0)
            except Exception:
                log.exception("uapi error")
        if self.metrics is not None:
            self.metrics.poll()
        return not self._stop

    def set_peer_slots(self, high_water: int) -> None:
        """Publish how many slots from 0 readers must scan (live changes move it); at
        least 1, as 0 means "not published" (readers then scan the whole table)."""
        if self.shared is not None:
            self.shared.set_peer_slots(high_water)

    # ------------------------------------------------------------------ workers
    def _worker_main(self, slot: WorkerSlot, control: socket.socket) -> int:
        """A forked worker's life (the pool's `main`)."""
        ctx = self.boot_context(slot.index)
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        return boot_worker(ctx, slot.index, slot.restarts, control)

    def boot_context(self, index: int) -> BootContext:
        """What worker `index` boots from: the running configuration, the shared memory,
        its own TUN queue and UDP sockets."""
        gw = self.gateway
        assert self.layout is not None and self.region is not None and self.secrets is not None
        assert gw is not None and gw.tun is not None
        return BootContext(
            config=self.config,
            workers=self.workers,
            layout=self.layout,
            buf=self.region.buf,
            secrets=self.secrets,
            slot_of=self.slot_of,
            eventfds=self.eventfds,
            tun_fd=gw.tun.fds[index],
            udp4=gw.udp4[index] if gw.udp4 else None,
            udp6=gw.udp6[index] if gw.udp6 else None,
            spread=self.spread != "off",
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        pending: list[int] = []

        def on_signal(signum: int, _frame: Any) -> None:
            pending.append(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, on_signal)
        try:
            self.pool.spawn_all()
            try:
                assert self.hooks is not None
                self.hooks.run("PostUp", self._pump_signals(pending))
                self.hooks.up = True
            except HookError as exc:  # wg-quick: undo what came up, run nothing further
                log.error("%s; removing %s", exc, self.ifname)
                self._fail(1)
                return self.exit_code
            log.info(
                "shardwg serving %s with %d worker(s) on UDP port %d",
                self.ifname,
                self.workers,
                self.gateway.port if self.gateway else 0,
            )
            next_foreign = time.monotonic() + FOREIGN_CHECK_INTERVAL
            self._next_scan = time.monotonic() + FOREIGN_SCAN_INTERVAL
            watch: list[Any] = [self._wake_r] + ([self.uapi.fileno()] if self.uapi else [])
            while not self._stop:
                fds = watch + (self.metrics.fds() if self.metrics else [])
                out = self.pool.backlogged()
                with contextlib.suppress(InterruptedError):
                    select.select(fds, out, [], LOOP_INTERVAL)
                now = time.monotonic()
                for link in out:
                    link.flush(now)
                if self.metrics is not None:
                    self.metrics.poll()
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
                while pending:
                    self._handle_signal(pending.pop(0))
                if self.uapi is not None:
                    try:
                        self.uapi.poll(0.0)
                    except Exception:  # the UAPI must never take the gateway down
                        log.exception("uapi error")
                now = time.monotonic()
                if self.live is not None:
                    self.live.tick(now)
                code = self.pool.reap(now, replace=not self._stop)
                if code:
                    self._fail(code)
                self.pool.check_heartbeats(now)
                if self.shared is not None:
                    self.shared.maintain(now)
                if self.placer is not None:
                    self.placer.tick(now)
                if now >= next_foreign:
                    self._check_foreign_queues(now)
                    next_foreign = now + FOREIGN_CHECK_INTERVAL
        finally:
            self.shutdown()
        return self.exit_code

    def _pump_signals(self, pending: list[int]) -> Callable[[], bool]:
        """The PostUp pump: also handles signals (SIGTERM abandons the hook and the start)."""

        def pump() -> bool:
            while pending:
                self._handle_signal(pending.pop(0))
            return self._pump()

        return pump

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            self._stop = True
        elif signum == signal.SIGHUP and self.live is not None:
            log.info("SIGHUP: reloading %s", self.config_path)
            self.live.reload()

    def _fail(self, code: int) -> None:
        self.exit_code = code
        self._stop = True

    def heartbeat(self, worker: int) -> float:
        assert self.layout is not None and self.region is not None
        off = self.layout.counters_offset + worker * C.BLOCK_SIZE
        return float(_HEARTBEAT.unpack_from(self.region.buf, off)[0])

    def _check_foreign_queues(self, now: float) -> None:
        """A foreign process attaching a queue to our TUN raises the kernel's count of attached
        queues above ours: then (or every FOREIGN_SCAN_INTERVAL, which also finds a foreign fd
        whose queue is detached, or when sysfs cannot tell) scan /proc for who holds them.
        Scanning every process's fds every second cost the supervisor more with every
        process on the machine."""
        tun = self.gateway.tun if self.gateway is not None else None
        attached = tun_io.attached_queue_count(self.ifname)
        if (
            tun is not None
            and attached is not None
            and attached <= len(tun.attached_fds)
            and now < self._next_scan
        ):
            return
        self._next_scan = now + FOREIGN_SCAN_INTERVAL
        ours = {os.getpid()} | self.pool.pids()
        if self.live is not None and self.live.route_pid:
            ours.add(self.live.route_pid)  # our route helper inherited the queues
        if self.metrics is not None:  # children rendering /metrics hold our fds until they exit
            ours |= self.metrics.renderers
        try:
            foreign = tun_io.foreign_queue_holders(self.ifname, ours)
        except OSError:
            return
        if foreign:
            log.critical(
                "process(es) %s attached a queue to %s and could read tunnel traffic; "
                "refusing to run with a compromised interface",
                ", ".join(map(str, foreign)), self.ifname,
            )  # fmt: skip
            self._fail(EXIT_FOREIGN_QUEUE)

    # ------------------------------------------------------------------ reconfiguration
    # (EngineControl: what live configuration asks of the processes)
    def listen_port(self) -> int:
        return self.gateway.port if self.gateway is not None else 0

    def broadcast(self, data: bytes) -> None:
        self.pool.broadcast(data)

    def set_fwmark(self, mark: int) -> None:
        if self.gateway is not None:
            for s in self.gateway.udp4 + self.gateway.udp6:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)

    def restart_workers(self, keep_sessions: bool) -> None:
        """Replace every worker (new key or port); sessions resume if `keep_sessions`."""
        self.pool.stop()
        if not keep_sessions and self.live is not None and self.live.memory is not None:
            self.live.memory.wipe_sessions()
        self.pool.spawn_all(restart=True)

    def rebind(self, port: int) -> None:
        """Move the UDP group to a new port: sockets are recreated in join order."""
        assert self.gateway is not None
        self.pool.stop()
        try:
            self.gateway.rebind_udp(port)
            for group in (self.gateway.udp4, self.gateway.udp6):
                if group:
                    steering.attach(group[0], self.workers, spread=self.spread != "off")
            if self.shared is not None:
                self.shared.set_listen_port(self.gateway.port)
        except OSError as exc:
            log.error("cannot rebind to port %d: %s; stopping", port, exc)
            self._fail(1)
            return
        self.pool.spawn_all(restart=True)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        self._stop = True
        hooks, up = self.hooks, self.hooks is not None and self.hooks.up
        if hooks is not None and up:
            hooks.up = False
            self._down_hook(hooks, "PreDown")
        if self.live is not None:
            self.live.save()
        self.pool.stop()
        self._teardown()
        if hooks is not None and up:
            self._down_hook(hooks, "PostDown")

    def _down_hook(self, hooks: Hooks, phase: str) -> None:
        """A failing down hook skips the rest of its phase but never the teardown."""
        try:
            # PreDown runs while the interface and the UAPI are still up: keep serving it
            hooks.run(phase, (lambda: self._pump() or True) if phase == "PreDown" else None)
        except HookError as exc:
            log.error("%s", exc)
            self.exit_code = self.exit_code or 1

    def _teardown(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.uapi is not None:
            self.uapi.close()
            self.uapi = None
        self.pool.close_links()
        if self.gateway is not None:
            self.gateway.close()
            self.gateway = None
        if self.hooks is not None:
            self.hooks.unset_dns()
        if self.eventfds:
            HandoffMesh.close_eventfds(self.eventfds)
            self.eventfds = []
        if self.secrets is not None:
            self.secrets.wipe()  # key material never outlives the gateway
            self.secrets.close()
            self.secrets = None
        if self.region is not None:
            self.region.zero()
            self.region.close()
            self.region.unlink()
            self.region = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _status(self) -> GatewayStatus:
        """What /metrics shows: the shared-memory status, peers as the running config has them."""
        peers = {encode_key(p.public_key): p.allowed_ips for p in self.config.peers}
        owners = {encode_key(p.public_key): self.owner(p.public_key) for p in self.config.peers}
        return with_config(read_status(self.ifname, interval=0), peers, owners)

    def _ready(self, st: GatewayStatus) -> tuple[bool, str]:
        if not netlink.link_exists(self.ifname):
            return False, f"interface {self.ifname} is missing"
        bad = [w.worker for w in st.worker_stats if not w.alive or w.heartbeat_age > HEALTHY_BEAT]
        if bad:
            return False, f"worker(s) {', '.join(map(str, bad))} not beating"
        return True, f"ok: {self.ifname} up, {len(st.worker_stats)} worker(s) beating"

    def owner(self, public_key: bytes) -> int:
        """The worker the placement table gives the peer (-1: not placed)."""
        return self.placer.owner(public_key) if self.placer is not None else -1

    def _nudge(self) -> None:
        """The placement table changed: every running worker re-reads it."""
        self.broadcast(control.encode(control.Placement()))  # a worker being replaced reads it


__all__ = ["GatewayError", "Supervisor", "SupervisorError"]
