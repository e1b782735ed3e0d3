"""The map of a gateway's shared memory region, computed from (workers, peer capacity).

Why one place: the supervisor, every worker and `shardwg show` must agree on
every offset. Right after region.HEADER_SIZE sits a fixed 64-byte layout block
holding the parameters, so a reader that only knows the region's name recovers
the whole map with `Layout.read_from(buf)`.

Map (every part 64-aligned, in this order):
  HEADER_SIZE   layout block: "SWLAYOUT", u32 version, u32 workers, u32 peer
                capacity, u32 ring slots, u32 ring slot size, u32 peer record
                size, u64 total size
  global        one seqlock slot holding GlobalState (written by the supervisor)
  counters      one shm/counters.py block per worker (each written by its worker)
  endpoints     one seqlock slot per worker: its peers' recent endpoints
                (shm/endpoints.py, written by that worker, read by every filter)
  peers         peer_capacity seqlock slots of PEER_RECORD_SIZE (each written by
                the peer's owning worker). A gateway sizes this for MAX_PEERS up front:
                the region is a sparse tmpfs file, so slots never written cost no memory
                (32 MiB of address space for 65,536), and nobody reads past the high-water
                mark the supervisor publishes (`GlobalState.peer_slots`).
  handoff       HandoffMesh: workers * (workers - 1) SPSC rings
  placement     one seqlock slot: the supervisor's peer -> worker table (shm/placement.py)
  spread        the spread ledger (shm/spread.py): per peer slot, the owner's spread base
                and each worker's published counter block (each cell one writer)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from shardwg.shm.counters import WorkerCounters, counters_size
from shardwg.shm.endpoints import LIST_SIZE as ENDPOINT_LIST_SIZE
from shardwg.shm.handoff import INITIATION_PAYLOAD_SIZE, HandoffMesh
from shardwg.shm.peerslot import PEER_RECORD_SIZE
from shardwg.shm.placement import table_size
from shardwg.shm.region import HEADER_SIZE
from shardwg.shm.seqlock import SeqlockSlot, slot_stride
from shardwg.shm.spread import SpreadArea
from shardwg.shm.spread import area_size as spread_area_size

LAYOUT_MAGIC = b"SWLAYOUT"
# 2: no secrets in the named region; 3: GlobalState.peer_slots; 4: a 128-byte datapath
LAYOUT_VERSION = 4
_BLOCK = struct.Struct("<8sIIIIIIQ")
LAYOUT_BLOCK_SIZE = 64
MAX_WORKERS = 256  # the receiver index carries the owner in one byte
# Peers one gateway can hold, as wireguard-go's MaxPeers: the table is sized for this at start
# (sparse, see above), so it never has to grow under running workers; beyond it a start or a
# live change is refused with a clear error.
MAX_PEERS = 1 << 16
RING_SLOT_SIZE = 2048  # the smallest ring slot: a 1420-byte MTU packet, an initiation
RING_MIN_SLOTS = 64  # a worker reads up to 64 packets per turn (engine/budgets.py BATCH)

_GLOBAL_MAGIC = b"SWGS"
_GLOBAL = struct.Struct("<4sIIIQdQ16sHxxxxxxdI4x128s")  # datapath: DATAPATH_SIZE
GLOBAL_SIZE = _GLOBAL.size
DATAPATH_SIZE = 128


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


@dataclass(slots=True)
class GlobalState:
    """Gateway-wide state; written only by the supervisor. Times are CLOCK_MONOTONIC
    except started_wall (Unix seconds). No secret: the cookie secret is in shm/secrets.py."""

    workers: int
    peer_capacity: int
    config_generation: int = 0
    under_load_until: float = 0.0
    supervisor_pid: int = 0
    interface: str = ""
    listen_port: int = 0
    started_wall: float = 0.0
    peer_slots: int = 0  # slots [0, peer_slots) may be in use: readers stop there (0: unknown)
    # Which data path the workers run, e.g. "native (OpenSSL 3.0.19 ...)"; its longest, the
    # "python (the native extension is not built ...)", is 90 bytes.
    datapath: str = ""


def encode_global(state: GlobalState) -> bytes:
    """GLOBAL_SIZE bytes; ValueError on a field that does not fit."""
    name = state.interface.encode()
    if len(name) > 15 or b"\0" in name:
        raise ValueError(f"bad interface name {state.interface!r}")
    try:
        return _GLOBAL.pack(
            _GLOBAL_MAGIC,
            LAYOUT_VERSION,
            state.workers,
            state.peer_capacity,
            state.config_generation,
            state.under_load_until,
            state.supervisor_pid,
            name,
            state.listen_port,
            state.started_wall,
            state.peer_slots,
            state.datapath.encode()[:DATAPATH_SIZE],
        )
    except struct.error as exc:
        raise ValueError(f"global state field out of range: {exc}") from exc


def decode_global(data: bytes | bytearray | memoryview) -> GlobalState | None:
    """None if never written (all zero); ValueError on a foreign or corrupt block."""
    if len(data) < GLOBAL_SIZE:
        raise ValueError(f"global state needs {GLOBAL_SIZE} bytes")
    v = _GLOBAL.unpack_from(data, 0)
    if v[0] == bytes(4) and data[:GLOBAL_SIZE] == bytes(GLOBAL_SIZE):
        return None
    if v[0] != _GLOBAL_MAGIC or v[1] != LAYOUT_VERSION:
        raise ValueError("not a shardwg global state block")
    return GlobalState(
        workers=v[2],
        peer_capacity=v[3],
        config_generation=v[4],
        under_load_until=v[5],
        supervisor_pid=v[6],
        interface=v[7].rstrip(b"\0").decode(),
        listen_port=v[8],
        started_wall=v[9],
        peer_slots=v[10],
        datapath=v[11].rstrip(b"\0").decode(errors="replace"),
    )


@dataclass(frozen=True)
class Layout:
    """Offsets of every part of the region (all 64-aligned)."""

    workers: int
    peer_capacity: int
    ring_slots: int = 256
    ring_slot_size: int = 2048  # RING_SLOT_SIZE; `sized` raises it to the MTU
    layout_offset: int = field(init=False)
    global_offset: int = field(init=False)
    counters_offset: int = field(init=False)
    endpoints_offset: int = field(init=False)
    peers_offset: int = field(init=False)
    peer_stride: int = field(init=False)
    handoff_offset: int = field(init=False)
    placement_offset: int = field(init=False)
    spread_offset: int = field(init=False)
    total_size: int = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}, got {self.workers}")
        if self.peer_capacity < 0:
            raise ValueError("negative peer capacity")
        if self.ring_slots < 1 or self.ring_slots & (self.ring_slots - 1):
            raise ValueError(f"ring slots {self.ring_slots} is not a power of two")
        if not 0 < self.ring_slot_size <= 0xFFFFFFFF:
            raise ValueError(f"bad ring slot size {self.ring_slot_size}")
        put = object.__setattr__  # frozen: derived fields are set once, here
        put(self, "layout_offset", HEADER_SIZE)
        put(self, "global_offset", _align(HEADER_SIZE + LAYOUT_BLOCK_SIZE))
        put(self, "counters_offset", self.global_offset + slot_stride(GLOBAL_SIZE, 64))
        put(self, "endpoints_offset", _align(self.counters_offset + counters_size(self.workers)))
        ends = self.workers * slot_stride(ENDPOINT_LIST_SIZE, 64)
        put(self, "peers_offset", _align(self.endpoints_offset + ends))
        put(self, "peer_stride", slot_stride(PEER_RECORD_SIZE, 64))
        put(self, "handoff_offset", self.peers_offset + self.peer_capacity * self.peer_stride)
        mesh = HandoffMesh.size(self.workers, self.ring_slots, self.ring_slot_size)
        put(self, "placement_offset", _align(self.handoff_offset + mesh))
        placement = slot_stride(table_size(self.peer_capacity), 64)
        put(self, "spread_offset", _align(self.placement_offset + placement))
        spread = spread_area_size(self.peer_capacity, self.workers)
        put(self, "total_size", _align(self.spread_offset + spread))

    @classmethod
    def sized(
        cls,
        workers: int,
        peer_capacity: int,
        mesh_budget_per_worker: int = 8 << 20,
        mtu: int = 1420,
    ) -> Layout:
        """A layout whose ring slots carry a whole `mtu`-byte packet (a handed-over TUN packet
        is up to MTU bytes) and whose handoff mesh fits `mesh_budget_per_worker` x workers.

        The mesh grows as workers squared, each worker's incoming rings as workers, so
        the budget is per worker (what its N-1 incoming rings may use once they have all
        cycled; untouched pages cost nothing): ring slots shrink from 256 as workers grow,
        never below RING_MIN_SLOTS, one turn's batch from one worker to one owner. A fixed
        32 MiB budget shrank them to 16 at 32 workers, so a single turn's packets for
        one owner overflowed its ring: 16 workers keep 256 slots, 32 keep 128, 64 keep 64.
        """
        slot_size = max(RING_SLOT_SIZE, mtu, INITIATION_PAYLOAD_SIZE)
        slots = 256
        budget = mesh_budget_per_worker * workers
        while slots > RING_MIN_SLOTS and HandoffMesh.size(workers, slots, slot_size) > budget:
            slots //= 2
        return cls(workers, peer_capacity, slots, slot_size)

    def write_to(self, buf: Any) -> None:
        """Record the parameters in the layout block (the creator does this once)."""
        self._check_fits(buf)
        _BLOCK.pack_into(
            buf,
            self.layout_offset,
            LAYOUT_MAGIC,
            LAYOUT_VERSION,
            self.workers,
            self.peer_capacity,
            self.ring_slots,
            self.ring_slot_size,
            PEER_RECORD_SIZE,
            self.total_size,
        )

    @classmethod
    def read_from(cls, buf: Any) -> Layout:
        """The layout a creator recorded in `buf`; ValueError if absent or incompatible."""
        if len(buf) < HEADER_SIZE + LAYOUT_BLOCK_SIZE:
            raise ValueError("buffer too small for a layout block")
        magic, version, workers, capacity, slots, slot_size, rec_size, total = _BLOCK.unpack_from(
            buf, HEADER_SIZE
        )
        if magic != LAYOUT_MAGIC or version != LAYOUT_VERSION:
            raise ValueError(f"no shardwg v{LAYOUT_VERSION} layout block in this region")
        if rec_size != PEER_RECORD_SIZE:
            raise ValueError(
                f"peer records of {rec_size} bytes, this build uses {PEER_RECORD_SIZE}"
            )
        layout = cls(workers, capacity, slots, slot_size)
        if layout.total_size != total:
            raise ValueError("layout block disagrees with this build's layout")
        layout._check_fits(buf)
        return layout

    def _check_fits(self, buf: Any) -> None:
        if len(buf) < self.total_size:
            raise ValueError(f"layout needs {self.total_size} bytes, buffer has {len(buf)}")

    def peer_slots_used(self, buf: Any) -> int:
        """How many slots from 0 may hold a peer (the published high-water mark; the
        capacity when the global block is unreadable)."""
        try:
            g = decode_global(self.global_slot(buf).read(max_retries=1000))
        except Exception:  # torn or foreign: read everything rather than miss a peer
            return self.peer_capacity
        if g is None or g.peer_slots == 0:  # never published (e.g. lab/enginetest.py)
            return self.peer_capacity
        return min(g.peer_slots, self.peer_capacity)

    def peer_slot(self, buf: Any, index: int) -> SeqlockSlot:
        if not 0 <= index < self.peer_capacity:
            raise IndexError(f"peer slot {index} outside capacity {self.peer_capacity}")
        return SeqlockSlot(buf, self.peers_offset + index * self.peer_stride, PEER_RECORD_SIZE)

    def placement_slot(self, buf: Any) -> SeqlockSlot:
        """The placement table (written by the supervisor only)."""
        return SeqlockSlot(buf, self.placement_offset, table_size(self.peer_capacity))

    def endpoint_list(self, buf: Any, worker: int) -> SeqlockSlot:
        """Worker `worker`'s list of recent peer endpoints (shm/endpoints.py)."""
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} outside 0..{self.workers - 1}")
        stride = slot_stride(ENDPOINT_LIST_SIZE, 64)
        return SeqlockSlot(buf, self.endpoints_offset + worker * stride, ENDPOINT_LIST_SIZE)

    def spread_area(self, buf: Any) -> SpreadArea:
        """The spread ledger (shm/spread.py): counter blocks of peers spread over workers."""
        size = spread_area_size(self.peer_capacity, self.workers)
        view = memoryview(buf)[self.spread_offset : self.spread_offset + size]
        return SpreadArea(view, self.peer_capacity, self.workers)

    def global_slot(self, buf: Any) -> SeqlockSlot:
        return SeqlockSlot(buf, self.global_offset, GLOBAL_SIZE)

    def counters(self, buf: Any, worker: int, **kw: Any) -> WorkerCounters:
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} outside 0..{self.workers - 1}")
        return WorkerCounters.for_worker(buf, self.counters_offset, worker, **kw)

    def mesh(self, buf: Any, eventfds: list[int] | None = None) -> HandoffMesh:
        return HandoffMesh(
            buf, self.handoff_offset, self.workers, self.ring_slots, self.ring_slot_size, eventfds
        )
