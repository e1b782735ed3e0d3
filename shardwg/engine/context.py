"""What boot and live configuration need from the rest of the engine, named explicitly.

Why: a worker's boot and the live configuration used to take the whole `Supervisor`
(and import it back), so the three modules formed an import circle and nothing
could boot a worker or apply a change without one. Now the supervisor hands over
small contexts: a frozen `BootContext` per worker (configuration, shared memory,
the worker's own queue and sockets), `SharedMemory` (layout, region, secrets) and an
`EngineControl` (the few things live configuration asks of the processes). The
in-memory engine tests build the same contexts around socketpairs and loopback
sockets.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shardwg.config.model import Config
from shardwg.shm.layout import Layout
from shardwg.shm.region import SharedRegion
from shardwg.shm.secrets import SecretArea
from shardwg.shm.spread import area_size as spread_area_size


@dataclass(frozen=True)
class BootContext:
    """Everything one worker builds its shard from, captured when it is forked."""

    config: Config
    workers: int  # how many workers share the peers (owners: the placement table)
    layout: Layout
    buf: Any  # the shared region's mapping (counters, peer slots, rings, global block)
    secrets: SecretArea  # session keys and cookie secrets, never in the named region
    slot_of: Mapping[bytes, int]  # peer public key -> its shared-memory slot
    eventfds: Sequence[int]  # one wake-up eventfd per worker (handoff rings)
    tun_fd: int  # this worker's TUN queue (speaks virtio_net_hdr frames)
    udp4: socket.socket | None  # this worker's member of the reuseport group, per family
    udp6: socket.socket | None
    spread: bool = False  # spread steering on (shardwg run --spread auto|on): see proto/index


@dataclass(frozen=True)
class SharedMemory:
    """The region and its layout, as live configuration reads and wipes peer slots."""

    layout: Layout
    region: SharedRegion
    secrets: SecretArea  # a removed peer's keys are wiped with its slot

    def wipe_slot(self, index: int) -> None:
        """Forget what a freed peer slot held before another peer gets it: its record, its
        keys and its spread ledger cells (a stale ledger tag equal to a later session's
        index would hand that session its predecessor's counter base)."""
        layout = self.layout
        self.region.zero(layout.peers_offset + index * layout.peer_stride, layout.peer_stride)
        self.secrets.zero_keys(index)
        layout.spread_area(self.region.buf).clear(index)

    def wipe_sessions(self) -> None:
        """Every peer's sessions, with the workers stopped (a new private key): records, the
        keys of the slots in use (the rest were never written), the spread ledger."""
        layout = self.layout
        self.region.zero(layout.peers_offset, layout.peer_capacity * layout.peer_stride)
        for i in range(layout.peer_slots_used(self.region.buf)):
            self.secrets.zero_keys(i)
        self.region.zero(layout.spread_offset, spread_area_size(layout.peer_capacity,
                                                                layout.workers))  # fmt: skip


class EngineControl(Protocol):
    """The process side of the engine, as live configuration drives it (the supervisor)."""

    def listen_port(self) -> int:
        """The UDP port the workers listen on now (0 before the sockets exist)."""

    def broadcast(self, data: bytes) -> None:
        """Send one encoded control message to every running worker."""

    def set_fwmark(self, mark: int) -> None:
        """Mark every UDP socket's outgoing packets."""

    def restart_workers(self, keep_sessions: bool) -> None:
        """Replace every worker; sessions resume from shared memory if `keep_sessions`."""

    def rebind(self, port: int) -> None:
        """Move the UDP group to a new port and restart the workers."""

    def set_peer_slots(self, high_water: int) -> None:
        """Publish how many peer slots from 0 readers must scan (GlobalState.peer_slots)."""
