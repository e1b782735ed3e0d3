"""A running gateway's status, read from its shared memory by any process (show, metrics).

Nothing here writes: readers attach the region read-only, take seqlocked
snapshots of the global block and peer slots and plain reads of the per-worker
counter blocks, so looking never disturbs the data path. Rates come from two
snapshots `interval` seconds apart. `GatewayStatus` is the stable JSON schema of
`shardwg show --json` (docs/show-json.md).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec

from shardwg.config.endpoints import format_endpoint
from shardwg.observe.cpus import cpu_seconds
from shardwg.shm import counters as C
from shardwg.shm.layout import Layout, decode_global
from shardwg.shm.peerslot import decode_peer
from shardwg.shm.placement import PlacementTable, decode_table
from shardwg.shm.region import RegionError, SharedRegion, region_name


class StatusError(Exception):
    pass


class PeerStatus(msgspec.Struct):
    public_key: str  # base64, as wg prints it
    owner: int
    endpoint: str | None
    latest_handshake: int  # Unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
    session: bool  # a current session exists
    allowed_ips: list[str] = []
    persistent_keepalive: int = 0
    # over every worker, why: "policy" (--spread on), "override" (its Spread = on), "traffic"
    # (--spread auto: its worker was saturated by it), "fewer" (--spread auto: fewer peers
    # than workers), "packets" (its Spread = packets: one flow's packets too); "" when one
    # worker carries it
    spread: str = ""


class WorkerStatus(msgspec.Struct):
    worker: int
    pid: int
    alive: bool
    heartbeat_age: float  # seconds since the worker last beat
    peers_owned: int
    restarts: int
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    rx_pps: float
    tx_pps: float
    rx_bps: float  # bits per second
    tx_bps: float
    handshakes_sent: int
    handshakes_received: int
    handshakes_completed: int
    handoffs_in: int
    handoffs_out: int
    handshake_backlog: int
    kernel_drops: int  # the kernel's drop count on the worker's UDP sockets (full buffer, filter)
    initiations_offered: int  # cookie-less initiations/s arriving, kernel-filtered ones included
    initiation_share: float  # share of them the kernel filter admits (1.0: no filter)
    drops: dict[str, int]
    cpu_seconds: float = 0.0  # user + system CPU time of the current worker process
    cpu_share: float = 0.0  # cores it used over the interval (1.0: one core busy)


class MoveStatus(msgspec.Struct):
    public_key: str  # base64
    src: int  # worker it left
    dst: int  # worker it went to
    reason: str  # "count" (a configuration change evened the counts) or "load"
    time: float  # Unix seconds when the supervisor decided it
    ratio: float  # load moves: the hot worker's load over the mean when it moved
    latency: float  # seconds until the new owner adopted the slot (-1: still in flight)


class PlacementStatus(msgspec.Struct):
    mode: str  # "load", "count" or "hash" (shardwg run --placement)
    moves: int  # moves since the gateway started
    recent: list[MoveStatus] = []  # the last few, newest first


class GatewayStatus(msgspec.Struct):
    interface: str
    listen_port: int
    workers: int
    supervisor_pid: int
    uptime: float
    running: bool  # the supervisor is alive (False: a crashed gateway's leftover region)
    under_load: bool
    peers: list[PeerStatus]
    worker_stats: list[WorkerStatus]
    drops_total: dict[str, int]
    placement: PlacementStatus | None = None
    datapath: str = ""  # "native (OpenSSL ...)" or "python (why)"


class ShmReader:
    """Read-only view of a gateway's region, found by interface name."""

    def __init__(self, interface: str) -> None:
        try:
            self.region = SharedRegion.attach(region_name(interface), readonly=True)
        except (RegionError, OSError) as exc:
            raise StatusError(f"no shardwg gateway on {interface} ({exc})") from exc
        try:
            self.layout = Layout.read_from(self.region.buf)
        except ValueError as exc:
            self.region.close()
            raise StatusError(f"{interface}: {exc}") from exc

    def counters(self) -> list[C.WorkerStats]:
        return C.read_all(self.region.buf, self.layout.counters_offset, self.layout.workers)

    def global_state(self) -> Any:
        return decode_global(self.layout.global_slot(self.region.buf).read())

    def slots(self) -> list[tuple[int, Any]]:
        """(slot index, record) of every published peer."""
        out = []
        for i in range(self.layout.peer_slots_used(self.region.buf)):
            try:
                rec = decode_peer(self.layout.peer_slot(self.region.buf, i).read(max_retries=1000))
            except Exception:  # torn by a dying writer or corrupt: skip, never crash a reader
                continue
            if rec is not None:
                out.append((i, rec))
        return out

    def placement(self) -> PlacementTable | None:
        try:
            return decode_table(self.layout.placement_slot(self.region.buf).read(max_retries=1000))
        except Exception:
            return None

    def close(self) -> None:
        self.region.close()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


HEALTHY_BEAT = 1.0  # a worker whose heartbeat is older than this is not ready


def read_status(interface: str, interval: float = 0.5) -> GatewayStatus:
    reader = ShmReader(interface)
    try:
        before = reader.counters()
        cpu_before = [cpu_seconds(w.pid) for w in before]
        t0 = time.monotonic()
        if interval > 0:
            time.sleep(interval)
        after = reader.counters()
        cpu_after = [cpu_seconds(w.pid) for w in after]
        dt = max(time.monotonic() - t0, 1e-9)
        g = reader.global_state()
        records = reader.slots()
        table = reader.placement()
    finally:
        reader.close()
    now = time.monotonic()
    workers = []
    for a, b, ca, cb in zip(before, after, cpu_before, cpu_after, strict=True):
        workers.append(
            WorkerStatus(
                worker=b.worker,
                pid=b.pid,
                alive=_alive(b.pid),
                heartbeat_age=round(max(0.0, now - b.heartbeat), 3),
                peers_owned=b.peers_owned,
                restarts=b.restarts,
                rx_packets=b.rx_packets,
                rx_bytes=b.rx_bytes,
                tx_packets=b.tx_packets,
                tx_bytes=b.tx_bytes,
                rx_pps=round((b.rx_packets - a.rx_packets) / dt, 1),
                tx_pps=round((b.tx_packets - a.tx_packets) / dt, 1),
                rx_bps=round((b.rx_bytes - a.rx_bytes) * 8 / dt, 1),
                tx_bps=round((b.tx_bytes - a.tx_bytes) * 8 / dt, 1),
                handshakes_sent=b.handshakes_sent,
                handshakes_received=b.handshakes_received,
                handshakes_completed=b.handshakes_completed,
                handoffs_in=b.handoffs_in,
                handoffs_out=b.handoffs_out,
                handshake_backlog=b.handshake_backlog,
                kernel_drops=b.kernel_drops,
                initiations_offered=b.initiations_offered,
                initiation_share=1.0 / (1 << min(b.initiation_shift, 62)),
                drops={k: v for k, v in b.drops.items() if v},
                cpu_seconds=round(cb, 2),
                cpu_share=round(max(0.0, cb - ca) / dt, 3) if a.pid == b.pid else 0.0,
            )
        )
    owners = table.owners if table is not None else []
    why = table.spread_why if table is not None else {}
    peers = [
        PeerStatus(
            public_key=base64.b64encode(r.public_key).decode(),
            owner=owners[i] if i < len(owners) and owners[i] >= 0 else r.owner,
            endpoint=format_endpoint(r.endpoint) or None,
            latest_handshake=int(r.last_handshake_wall),
            rx_bytes=r.rx_bytes,
            tx_bytes=r.tx_bytes,
            session=r.current is not None,
            spread=why[i].name.lower() if i in why else "",
        )
        for i, r in records
    ]
    totals: dict[str, int] = {}
    for w in workers:
        for k, v in w.drops.items():
            totals[k] = totals.get(k, 0) + v
    return GatewayStatus(
        interface=g.interface if g else interface,
        listen_port=g.listen_port if g else 0,
        workers=len(workers),
        supervisor_pid=g.supervisor_pid if g else 0,
        uptime=round(time.time() - g.started_wall, 1) if g else 0.0,
        running=bool(g and _alive(g.supervisor_pid)),
        under_load=bool(g and g.under_load_until > now),
        peers=peers,
        worker_stats=workers,
        drops_total=totals,
        placement=placement_status(table),
        datapath=g.datapath if g else "",
    )


def placement_status(t: PlacementTable | None) -> PlacementStatus | None:
    if t is None:
        return None
    return PlacementStatus(
        mode=t.mode.name.lower(),
        moves=t.moves_total,
        recent=[
            MoveStatus(base64.b64encode(m.public_key).decode(), m.src, m.dst,
                       m.reason.name.lower(), round(m.wall, 3), round(m.ratio, 3),
                       round(m.latency, 4))  # fmt: skip
            for m in t.history
        ],
    )


def with_config(
    st: GatewayStatus, peers: dict[str, list[str]], owners: dict[str, int] | None = None
) -> GatewayStatus:
    """The status as the running configuration sees it, the same peer list as `wg show`:
    `peers` maps each configured public key (base64) to its allowed IPs, `owners` to the
    worker placement gave it. A configured peer whose owner has not published it yet gets
    zero counters, a removed one whose slot is not wiped yet is left out, and allowed_ips
    are filled in."""
    seen = {p.public_key: p for p in st.peers}
    out = []
    for key, allowed in peers.items():
        p = seen.get(key)
        if p is None:
            p = PeerStatus(key, (owners or {}).get(key, -1), None, 0, 0, 0, False)
        p.allowed_ips = list(allowed)
        out.append(p)
    st.peers = out
    return st
