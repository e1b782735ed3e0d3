"""What a freshly forked worker does before its loop: build the device for its shard.

It adds the peers the supervisor's placement table gives it, registers the others
as remote so their packets are handed over, restores sessions a predecessor
published in shared memory (a replacement resumes without a handshake; a peer moved
here by placement the same way, engine/adoption.py), and keeps the shared cookie
secret and under-load flag in step from the supervisor's block.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from shardwg.config.endpoints import EndpointError, resolve
from shardwg.config.model import PeerConfig
from shardwg.engine import control
from shardwg.engine.adoption import ShardPlacement
from shardwg.engine.context import BootContext
from shardwg.engine.exits import EXIT_BOOT_FAILURE
from shardwg.engine.worker import Worker
from shardwg.proto.device import Device
from shardwg.proto.peer import Peer
from shardwg.shm import counters as C
from shardwg.shm import endpoints
from shardwg.shm.layout import decode_global
from shardwg.shm.publisher import SessionPublisher
from shardwg.shm.secrets import SecretArea, decode_cookie

log = logging.getLogger("shardwg.engine.worker")
GLOBAL_SYNC_INTERVAL = 0.25


class BootFailure(Exception):
    """The configuration cannot work in this worker; replacing it would fail the same way."""


@dataclass
class Shard:
    """A built worker before its loop: the peers it owns and when it was built."""

    worker: Worker
    owned: list[Peer]
    now: float
    wall: float

    def greet(self) -> None:
        """Keepalives to owned peers that want them and have no session; first heartbeat."""
        for peer in self.owned:
            if peer.endpoint is not None and peer.persistent_keepalive and peer.current is None:
                peer.send_keepalive(self.now, self.wall)
        self.worker.counters.beat(self.now)


def boot_worker(ctx: BootContext, index: int, restarts: int, control: socket.socket) -> int:
    """A forked worker's life: build the shard, take the signals, serve until told to stop."""
    try:
        shard = build_shard(ctx, index, restarts)
    except BootFailure as exc:
        log.error("worker %d: cannot build its peers: %s", index, exc)
        return EXIT_BOOT_FAILURE
    worker = shard.worker

    def on_term(_signum: int, _frame: Any) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    shard.greet()
    control.setblocking(False)
    worker.run(control.fileno())
    return 0


def build_shard(ctx: BootContext, index: int, restarts: int) -> Shard:
    """Build worker `index`'s device, restore its sessions (after a restart) and wire its
    hooks; raises BootFailure when the configuration cannot work."""
    cfg = ctx.config
    n = ctx.workers
    buf = ctx.buf
    layout = ctx.layout
    counters = layout.counters(buf, index)
    counters.load()
    counters.set(C.PID, os.getpid())
    counters.set(C.RESTARTS, restarts)
    mesh = layout.mesh(buf, list(ctx.eventfds))
    publisher = SessionPublisher(layout, buf, dict(ctx.slot_of), index, ctx.secrets)
    now, wall = time.monotonic(), time.time()
    try:
        device = Device(
            cfg.interface.private_key, os.urandom, worker_id=index, mtu=cfg.interface.mtu
        )
        device.table.allocator.steer_spread = ctx.spread
        specs = {p.public_key: boot_spec(p, index) for p in cfg.peers}
        placement = ShardPlacement(
            device, publisher, layout, buf, index, specs, ring_pusher(mesh, index, n), counters.v
        )
        placement.resume_followers = restarts > 0
        placement.refresh()
        placement.reconcile(now, wall, strict=True)  # ours adopted (restored), others remote
    except (ValueError, OSError) as exc:
        raise BootFailure(str(exc)) from exc
    owned = list(device.peers.values())
    resumed = sum(1 for p in owned if p.current is not None)
    if resumed:
        log.info("worker %d: resumed %d session(s) from shared memory", index, resumed)

    worker = Worker(
        device,
        ctx.tun_fd,
        ctx.udp4,
        ctx.udp6,
        counters,
        worker_id=index,
        mesh=mesh if n > 1 else None,
        publisher=publisher,
    )
    worker.placement = placement
    placement.push = worker.push_handoff
    device.forward = worker.forward_transport
    worker.endpoint_slot = layout.endpoint_list(buf, index)
    for peer in owned:
        if peer.endpoint is not None:
            worker.recent.touch(peer.public_key, peer)
    lists = [layout.endpoint_list(buf, w) for w in range(n)]
    worker.known_endpoints = lambda: endpoints.read_all(lists)
    sync = GlobalSync(layout, buf, ctx.secrets)

    def on_tick(w: Worker, now: float, wall: float) -> None:
        sync.on_tick(w, now, wall)
        placement.on_tick(now, wall)
        if w.held and not placement.incoming:
            w.replay_held(now, wall)

    worker.on_tick = on_tick
    worker.on_control = ShardControl(worker, publisher, index).handle
    sync.on_tick(worker, now, wall)
    return Shard(worker, owned, now, wall)


def boot_spec(p: PeerConfig, index: int) -> control.PeerSpec:
    """A configured peer as a worker keeps it (every worker keeps every peer: any may
    adopt any after a placement move)."""
    try:
        endpoint = resolve(p.endpoint) if p.endpoint is not None else None
    except EndpointError as exc:
        log.warning("worker %d: %s; waiting for the peer to contact us", index, exc)
        endpoint = None
    return control.peer_spec(p, endpoint)


def ring_pusher(mesh: Any, index: int, workers: int) -> Any:
    """(dst, payload, kind) -> pushed? on our ring towards dst, before the Worker exists."""

    def push(dst: int, data: bytes | memoryview, kind: int) -> bool:
        if workers < 2 or dst == index or not 0 <= dst < workers:
            return False
        if not mesh.ring(index, dst).push(data, kind):
            return False
        mesh.wake(dst)
        return True

    return push


class ShardControl:
    """Applies the supervisor's live configuration changes to this worker's shard."""

    def __init__(self, worker: Worker, publisher: SessionPublisher, index: int):
        self.worker = worker
        self.device = worker.device
        self.publisher = publisher
        self.index = index

    def handle(self, data: bytes, now: float, wall: float) -> bool:
        try:
            msg = control.decode(data)
        except Exception:
            log.error("worker %d: undecodable control message ignored", self.index)
            return True
        if isinstance(msg, control.Stop):
            return False
        if isinstance(msg, control.Batch):  # one change: removals, additions, updates
            for key in msg.removed:
                self._one(control.RemovePeer(key), now, wall)
            if msg.added:
                self._add_many(msg.added, now, wall)
            for update in msg.updated:
                self._one(update, now, wall)
        else:
            self._one(msg, now, wall)
        self.worker.counters.set(C.PEERS_OWNED, len(self.device.peers))
        return True

    def _one(self, msg: control.Control, now: float, wall: float) -> None:
        try:
            placement = self.worker.placement
            if isinstance(msg, control.RemovePeer):
                self.device.remove_peer(msg.public_key)
                self.worker.recent.forget(msg.public_key)
                self.publisher.forget(msg.public_key)
                self.publisher.slot_of.pop(msg.public_key, None)  # the slot is freed
                if placement is not None:
                    placement.forget(msg.public_key)
            elif isinstance(msg, control.AddPeer):
                self._add_many([msg], now, wall)
            elif isinstance(msg, control.UpdatePeer):
                self._update(msg.peer, msg.endpoint_changed)
                if placement is not None and msg.peer.public_key in placement.specs:
                    placement.specs[msg.peer.public_key] = msg.peer  # applied: keep it
            elif isinstance(msg, control.Placement) and placement is not None:
                if placement.refresh():
                    placement.reconcile(now, wall)
                    self.worker.replay_held(now, wall)
        except ValueError as exc:  # one bad peer: the rest of the change still applies
            log.error("worker %d: control change not applied: %s", self.index, exc)

    def _add_many(self, adds: list[control.AddPeer], now: float, wall: float) -> None:
        """Peers added by one change: the placement table is read once for all of them
        (a change costs what it adds, not added x configured peers)."""
        placement = self.worker.placement
        assert placement is not None
        for msg in adds:
            if msg.slot >= 0:  # our copy of slot_of dates from the fork
                self.publisher.slot_of[msg.peer.public_key] = msg.slot
            placement.specs[msg.peer.public_key] = msg.peer
        placement.refresh()  # the supervisor placed the peers before telling us
        keys = [msg.peer.public_key for msg in adds]
        placement.reconcile(now, wall, keys)  # a peer it cannot hold is dropped and logged
        for key in keys:
            peer = self.device.peers.get(key)
            if peer is not None and peer.endpoint is not None:
                self.worker.recent.touch(key, peer)  # the filter's list of known endpoints
            if peer is not None and peer.endpoint is not None and peer.persistent_keepalive:
                peer.send_keepalive(now, wall)

    def _update(self, spec: control.PeerSpec, endpoint_changed: bool) -> None:
        key = spec.public_key
        remote = self.device.remote.get(key)
        if remote is not None:
            self.device.set_allowed_ips(remote, list(spec.allowed_ips))
            return
        peer = self.device.peers.get(key)
        if peer is None:
            return
        self.device.set_allowed_ips(peer, list(spec.allowed_ips))
        self.device.set_preshared_key(peer, spec.preshared_key)
        if endpoint_changed:
            peer.endpoint = spec.endpoint_tuple()
            self.worker.recent.touch(key, peer)
        peer.persistent_keepalive = spec.persistent_keepalive
        self.publisher.publish(peer)


class GlobalSync:
    """Keeps a worker's cookie secret and under-load flag in step with the supervisor."""

    def __init__(self, layout: Any, buf: Any, secrets: SecretArea) -> None:
        self.slot = layout.global_slot(buf)
        self.cookie_slot = secrets.cookie_slot()
        self.next_sync = 0.0
        self.cookie_switch = -1.0

    def on_tick(self, worker: Worker, now: float, wall: float) -> None:
        worker.counters.set(C.HANDSHAKE_BACKLOG, len(worker.handshake_queue))
        if now < self.next_sync:
            return
        self.next_sync = now + GLOBAL_SYNC_INTERVAL
        intake = worker.device.intake
        try:
            cookie = decode_cookie(self.cookie_slot.read())
            g = decode_global(self.slot.read())
        except Exception:  # a torn or missing block: keep what we have
            return
        if cookie is not None and cookie.next_born != self.cookie_switch:
            intake.checker.set_schedule(
                cookie.current, cookie.current_born, cookie.next, cookie.next_born
            )
            self.cookie_switch = cookie.next_born
        if g is None:
            return
        if g.under_load_until > intake.under_load_until:
            intake.under_load_until = g.under_load_until
