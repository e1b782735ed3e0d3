"""Applying configuration changes to a running gateway: the UAPI backend, SIGHUP, SaveConfig.

Every change goes the same way: build the new Config (`reconfigure`), diff it
against the running one, then apply the diff: peers added, updated or removed
are broadcast to every worker as control messages (the owner changes the
peer's protocol state, the others their routing of remote peers), routes follow
the allowed IPs, peer slots are assigned and freed. Other peers' sessions are
never touched. A new private key invalidates every session, so workers are
restarted with empty slots; a new listen port rebinds the UDP group and
restarts workers, which resume their sessions from shared memory.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import logging
import os
import signal
import time
from collections import deque
from typing import Any

from shardwg.config.diff import config_from_set, diff_configs, prefixes_delta
from shardwg.config.endpoints import EndpointError, format_endpoint, resolve
from shardwg.config.model import (
    Config,
    ConfigError,
    Endpoint,
    PeerConfig,
    format_config,
    load_config,
    packet_spread_peers,
    spread_settings,
)
from shardwg.engine import control
from shardwg.engine.context import EngineControl, SharedMemory
from shardwg.engine.placer import Placer
from shardwg.io import netlink
from shardwg.io.interface import routing_table
from shardwg.proto.crypto import low_order, public_key
from shardwg.shm.layout import MAX_PEERS
from shardwg.shm.peerslot import PeerRecord, decode_peer
from shardwg.uapi import DeviceView, PeerView, SetRequest

log = logging.getLogger("shardwg.engine.live")
ROUTES_INLINE = 64  # route changes up to this size are made in the loop, bigger in a child
SLOT_REUSE_DELAY = 2.0  # a freed slot waits this long: its old owner may still publish once


class LiveConfig:
    """Keeper of the running configuration and of which shared-memory slot each peer has.

    `slot_of` is shared with the supervisor (which hands a copy to every worker it forks);
    `memory` is attached once the region exists (the UAPI socket is opened before it).
    """

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        *,
        ifname: str,
        slot_of: dict[bytes, int],
        engine: EngineControl,
        memory: SharedMemory | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.ifname = ifname
        self.slot_of = slot_of
        self.engine = engine
        self.memory = memory
        # The placement table's keeper (engine/placer.py), attached with the region: every
        # added peer is placed before a worker hears of it, and counts are evened after.
        self.placer: Placer | None = None
        self._freeing: list[tuple[float, int]] = []
        self._route_jobs: deque[tuple[list[str], list[str], int | None]] = deque()
        self.route_pid = 0  # the child applying a big route change
        # Endpoints as resolved when they were set (config endpoint -> socket address): `get`
        # answers from the workers' records or from here, never from DNS in the loop.
        self._resolved: dict[Endpoint, Any] = {}

    # ------------------------------------------------------------------ UAPI backend
    def uapi_get(self) -> DeviceView:
        cfg = self.config
        peers = []
        for p in cfg.peers:
            view = PeerView(
                public_key=p.public_key,
                preshared_key=p.preshared_key,
                persistent_keepalive=p.persistent_keepalive,
                allowed_ips=list(p.allowed_ips),
            )
            rec = self._record(p.public_key)
            endpoint = rec.endpoint if rec is not None and rec.endpoint else None
            if endpoint is None and p.endpoint is not None:
                endpoint = self._resolved.get(p.endpoint) or literal_endpoint(p.endpoint)
            view.endpoint = format_endpoint(endpoint) or None
            if rec is not None:
                sec = int(rec.last_handshake_wall)
                view.last_handshake_sec = sec
                view.last_handshake_nsec = int((rec.last_handshake_wall - sec) * 1e9)
                view.rx_bytes, view.tx_bytes = rec.rx_bytes, rec.tx_bytes
            peers.append(view)
        return DeviceView(
            private_key=cfg.interface.private_key,
            listen_port=self.engine.listen_port(),
            fwmark=cfg.interface.fwmark,
            peers=peers,
        )

    def uapi_set(self, req: SetRequest) -> int:
        cfg = self.config
        try:
            new = config_from_set(cfg, req, public_key(cfg.interface.private_key))
        except (ValueError, ConfigError) as exc:
            log.warning("uapi set refused: %s", exc)
            return errno.EINVAL
        return self.apply(new, "uapi")

    def _record(self, key: bytes) -> PeerRecord | None:
        index = self.slot_of.get(key)
        mem = self.memory
        if index is None or mem is None:
            return None
        try:
            rec = decode_peer(mem.layout.peer_slot(mem.region.buf, index).read(max_retries=1000))
        except Exception:
            return None
        return rec if rec is not None and rec.public_key == key else None

    # ------------------------------------------------------------------ applying
    def apply(self, new: Config, source: str) -> int:
        """Make `new` the running configuration; returns an errno (0: applied)."""
        old = self.config
        d = diff_configs(old, new)
        if new.interface.listen_port in (None, 0):
            # `wg syncconf` always sends listen_port (0 when unset): keep our port then.
            d.listen_port_changed = False
        elif new.interface.listen_port == self.engine.listen_port():
            d.listen_port_changed = False
        if d.empty():
            self.config = new
            return 0
        specs: dict[bytes, control.PeerSpec] = {}
        try:
            for p in d.added + [n for _o, n in d.updated]:
                endpoint = resolve(p.endpoint) if p.endpoint is not None else None
                specs[p.public_key] = control.peer_spec(p, endpoint)
                if p.endpoint is not None and specs[p.public_key].endpoint is not None:
                    self._resolved[p.endpoint] = specs[p.public_key].endpoint_tuple()
        except EndpointError as exc:
            log.warning("%s change refused: %s", source, exc)
            return errno.EINVAL
        free = self._free_slots(len(d.added), {p.public_key for p in d.removed})
        if free is None:
            log.warning("%s change refused: %d peers would exceed the maximum of %d per "
                        "gateway", source, len(new.peers), MAX_PEERS)  # fmt: skip
            return errno.ENOSPC
        self.config = new
        # One message per worker and one route update for the whole change: its cost grows
        # with the peers it changes, not with the peers configured.
        batch = control.Batch()
        changed: list[tuple[PeerConfig | None, PeerConfig | None]] = []
        for p in d.removed:
            batch.removed.append(p.public_key)
            changed.append((p, None))
            index = self.slot_of.pop(p.public_key, None)
            if index is not None:
                self._freeing.append((time.monotonic() + SLOT_REUSE_DELAY, index))
            if self.placer is not None:
                self.placer.remove(p.public_key, write=False)
        for p, index in zip(d.added, free, strict=False):
            warn_low_order(p, source)
            self.slot_of[p.public_key] = index
            if self.placer is not None:  # placed before any worker hears of it
                self.placer.add(p.public_key, index, write=False)
            batch.added.append(control.AddPeer(specs[p.public_key], index))
            changed.append((None, p))
        self._publish_high_water()  # before any worker writes a new slot
        spread_moved = False  # a peer's `Spread` changed: the table says it, no worker message
        if self.placer is not None:
            spread_moved = self.placer.set_overrides(spread_settings(new), write=False,
                                                     packets=packet_spread_peers(new))  # fmt: skip
        if self.placer is not None and (d.added or d.removed or spread_moved):
            self.placer.flush()  # one table write for the whole change
        for o, n in d.updated:
            batch.updated.append(
                control.UpdatePeer(specs[n.public_key], endpoint_changed=o.endpoint != n.endpoint)
            )
            changed.append((o, n))
        self._broadcast(batch)
        if self.placer is not None and spread_moved:
            self.placer.notify()  # every worker re-reads the table
        if self.placer is not None and (d.added or d.removed):
            self.placer.rebalance()  # a few moves at most, so counts stay even
        if self.placer is not None and (d.added or d.removed or d.updated or spread_moved):
            self.placer.announce()  # a peer's prefixes may have changed (TUN steering's routes)
        self._routes(changed)
        if d.fwmark_changed:
            self.engine.set_fwmark(new.interface.fwmark)
        if d.private_key_changed:
            log.info("%s: private key changed; restarting workers without sessions", source)
            self.engine.restart_workers(keep_sessions=False)
        elif d.listen_port_changed:
            log.info("%s: listen port -> %s", source, new.interface.listen_port)
            self.engine.rebind(new.interface.listen_port or 0)
        log.info(
            "%s: %d peer(s) added, %d removed, %d updated, %d with a new Spread",
            source, len(d.added), len(d.removed), len(d.updated), len(d.spread_changed),
        )  # fmt: skip
        return 0

    def _free_slots(self, n: int, leaving: set[bytes]) -> list[int] | None:
        """The n lowest free slots (low first keeps the readers' high-water mark low)."""
        assert self.memory is not None
        used = set(self.slot_of.values()) | {i for _t, i in self._freeing}
        if len(used) + n > self.memory.layout.peer_capacity:
            return None
        free: list[int] = []
        i = 0
        while len(free) < n:
            if i not in used:
                free.append(i)
            i += 1
        return free

    def _publish_high_water(self) -> None:
        used = [*self.slot_of.values(), *(i for _t, i in self._freeing)]
        self.engine.set_peer_slots(max(used) + 1 if used else 0)

    def tick(self, now: float) -> None:
        """Start queued route changes; wipe freed slots once their old owner can no longer
        write them."""
        if self.route_pid or self._route_jobs:
            self._next_route_job()
        mem = self.memory
        due = [i for t, i in self._freeing if t <= now]
        if not due or mem is None:
            return
        self._freeing = [(t, i) for t, i in self._freeing if t > now]
        in_use = set(self.slot_of.values())
        for index in due:
            if index not in in_use:
                mem.wipe_slot(index)
        self._publish_high_water()

    def _broadcast(self, msg: control.Control) -> None:
        """One message for every worker; the engine queues it without ever blocking."""
        self.engine.broadcast(control.encode(msg))

    def _routes(self, changed: list[tuple[PeerConfig | None, PeerConfig | None]]) -> None:
        """Routes follow the allowed IPs of the changed peers, one netlink pass each way (a
        prefix that moved between two of them keeps its route). A small change is applied
        at once; a big one (thousands of routes take seconds of netlink) in a short-lived
        child process, so the loop (UAPI, watchdog, /metrics) never waits for it."""
        table = routing_table(self.config)
        if table == "off":
            return
        add: set[str] = set()
        remove: set[str] = set()
        for old, new in changed:
            a, r = prefixes_delta(old, new)
            add.update(a)
            remove.update(r)
        remove -= add
        if not add and not remove:
            return
        job = (sorted(add), sorted(remove), table if isinstance(table, int) else None)
        if len(add) + len(remove) <= ROUTES_INLINE and not self._route_jobs and not self.route_pid:
            apply_routes(self.ifname, *job)
        else:
            self._route_jobs.append(job)
            self._next_route_job()

    def _next_route_job(self) -> None:
        """Start the oldest queued route change once the previous one has finished."""
        if self.route_pid:
            try:
                done, _ = os.waitpid(self.route_pid, os.WNOHANG)
            except ChildProcessError:  # the supervisor's reaper took it
                done = self.route_pid
            if done != self.route_pid:
                return
            self.route_pid = 0
        if not self._route_jobs:
            return
        add, remove, table = self._route_jobs.popleft()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child only talks netlink, then leaves
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                apply_routes(self.ifname, add, remove, table)
                code = 0
            finally:
                os._exit(code)
        self.route_pid = pid

    # ------------------------------------------------------------------ file
    def reload(self) -> None:
        """SIGHUP: re-read the config file and apply the difference (like wg syncconf)."""
        if not self.config_path:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: %s; configuration unchanged", exc)
            return
        # Interface-level settings that need the interface rebuilt are kept as running.
        cur = self.config.interface
        if (new.interface.addresses, new.interface.mtu) != (cur.addresses, cur.mtu):
            log.warning("SIGHUP: Address/MTU changes need a restart; kept as running")
        self.apply(new, "reload")

    def save(self) -> None:
        """SaveConfig = true: write the running configuration back, owner-only, atomically."""
        if not self.config_path or not self.config.interface.save_config:
            return
        tmp = f"{self.config_path}.tmp{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(format_config(self.config))
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.config_path)
            log.info("configuration saved to %s", self.config_path)
        except (OSError, ValueError) as exc:
            log.error("could not save configuration: %s", exc)
            if os.path.exists(tmp):
                os.unlink(tmp)


def apply_routes(name: str, add: list[str], remove: list[str], table: int | None) -> None:
    """Each prefix is its own netlink message, so one the kernel refuses (e.g. routed through
    another link) costs only its own route: it is logged, and the others are in place."""
    if remove:
        try:
            netlink.remove_routes(name, remove, table)
        except OSError as exc:
            log.warning("routes via %s not removed: %s", name, exc)
    if add:
        try:
            failed = netlink.try_add_routes(name, add, table)
        except OSError as exc:  # the link is gone, or netlink itself failed
            log.warning("routes via %s not added: %s", name, exc)
            return
        for prefix, why in failed:
            log.warning("route %s via %s not added: %s", prefix, name, why)


def warn_low_order(p: PeerConfig, source: str) -> None:
    """Such a peer is kept (as wireguard-go does) but can never complete a handshake."""
    if low_order(p.public_key):
        log.warning(
            "%s: peer %s has a low-order public key: kept, but no handshake with it can "
            "ever complete", source, base64.b64encode(p.public_key).decode(),
        )  # fmt: skip


def literal_endpoint(endpoint: Endpoint) -> Any:
    """The socket address of an IP-literal endpoint (no DNS); None for a host name."""
    try:
        ipaddress.ip_address(endpoint.host)
    except ValueError:
        return None
    return resolve(endpoint)
