"""Publishing a worker's peers to their seqlocked shared-memory slots.

A peer's slot is written only by its owning worker (single writer per slot).
It is rewritten when a session is derived, confirmed or zeroed, when a
keypair's counter reservation runs out (once per RESERVATION_BLOCK packets),
and at most once a second when the endpoint changed. Traffic counters go straight to the
record's rx/tx words at every count (Peer.traffic), so readers never see them stale. A
replacement worker restores sessions from it; `shardwg show` and the UAPI read it.

The sessions' keys go to the peer's key slot in the workers' anonymous mapping
(shm/secrets.py), written before the record whenever the set of sessions changes,
so the named region never holds a key. `restore` pairs keys and sessions by local
index; a session whose keys it cannot find is not resumed (a fresh handshake).
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from shardwg.proto import keypair
from shardwg.proto.keypair import Keypair
from shardwg.proto.peer import Peer
from shardwg.shm.layout import Layout
from shardwg.shm.peerslot import (
    KEYPAIR_OFFSETS,
    KP_RECV_FLOOR,
    PEER_RECORD_SIZE,
    TRAFFIC_OFFSET,
    PeerRecord,
    decode_peer,
    encode_peer,
    keypair_record,
    restore_keypair,
)
from shardwg.shm.secrets import SecretArea, decode_keys, encode_keys
from shardwg.shm.seqlock import SLOT_HEADER, SeqlockSlot

_NO_KEYS: tuple[int, ...] = ()
log = logging.getLogger("shardwg.shm.publisher")


class SessionPublisher:
    def __init__(
        self,
        layout: Layout,
        buf: Any,
        slot_of: dict[bytes, int],
        worker_id: int,
        secrets: SecretArea,
    ) -> None:
        self.layout = layout
        self.buf = buf
        self.secrets = secrets
        self._keys_of: dict[int, tuple[int, ...]] = {}  # slot -> local indices in its key slot
        self.slot_of = slot_of
        self.worker_id = worker_id
        self._slots: dict[int, SeqlockSlot] = {}
        self._scratch = bytearray(PEER_RECORD_SIZE)
        self._generation: dict[bytes, int] = {}
        # The endpoint each peer's record holds (absent: its last write failed, or none yet).
        self._endpoint: dict[bytes, Any] = {}
        self._floors: dict[int, memoryview] = {}
        self.peers: dict[bytes, Peer] = {}
        self._handed: set[bytes] = set()  # given to another worker: never written again
        self._failing = False  # the last write failed (logged once until one succeeds)

    def _slot(self, index: int) -> SeqlockSlot:
        slot = self._slots.get(index)
        if slot is None:
            slot = self.layout.peer_slot(self.buf, index)
            self._slots[index] = slot
        return slot

    def _recv_floor(self, index: int, which: int) -> memoryview:
        """A one-word view on session `which`'s recv_floor in slot `index` (cached)."""
        key = index * 3 + which
        view = self._floors.get(key)
        if view is None:
            off = (
                self.layout.peers_offset
                + index * self.layout.peer_stride
                + SLOT_HEADER
                + KEYPAIR_OFFSETS[which]
                + KP_RECV_FLOOR
            )
            view = memoryview(self.buf)[off : off + 8].cast("Q")
            self._floors[key] = view
        return view

    def _traffic(self, index: int) -> memoryview:
        """The [rx, tx] words of slot `index`'s record (payload offset TRAFFIC_OFFSET)."""
        off = self.layout.peers_offset + index * self.layout.peer_stride + SLOT_HEADER
        off += TRAFFIC_OFFSET
        return memoryview(self.buf)[off : off + 16].cast("Q")

    @staticmethod
    def _reservation(kp: Keypair | None) -> int:
        """The send limit to publish for `kp`: a first publication reserves a first block."""
        if kp is None:
            return 0
        if kp.blocks is not None:  # spread: its limit is the block its ledger entry holds
            return kp.send_reserved
        if kp.on_reserve is None:
            return kp.send_counter + keypair.RESERVATION_BLOCK
        return kp.send_reserved

    def _on_reserve(self, kp: Keypair) -> bool:
        return isinstance(kp.peer, Peer) and self.publish(kp.peer)

    def publish(self, peer: Peer, owner: int | None = None) -> bool:
        """Write the peer's record (naming `owner` as its writer: a placement move's last
        write); True once it is written.

        Fails closed: the send limits and receive floors of its sessions change only
        after the write succeeded, so nothing is used on the strength of a record that a
        replacement worker would not find (keypair.reserve_send relies on this).
        """
        index = self.slot_of.get(peer.public_key)
        if index is None or peer.public_key in self._handed:
            return False
        self.peers[peer.public_key] = peer
        gen = (self._generation.get(peer.public_key, 0) + 1) & 0xFFFFFFFF
        kps = (peer.current, peer.previous, peer.next)
        limits = [self._reservation(kp) for kp in kps]
        recs = [
            None if kp is None else keypair_record(kp, limit, max(kp.replay.highest + 1, 0))
            for kp, limit in zip(kps, limits, strict=True)
        ]
        try:
            rec = PeerRecord(
                public_key=peer.public_key,
                owner=self.worker_id if owner is None else owner,
                generation=gen,
                endpoint=peer.endpoint,
                last_handshake_wall=peer.last_handshake_wall,
                rx_bytes=peer.rx_bytes,
                tx_bytes=peer.tx_bytes,
                last_timestamp=peer.last_timestamp,
                current=recs[0],
                previous=recs[1],
                next=recs[2],
            )
            rec.handed = owner is not None
            encode_peer(rec, self._scratch)
            self._publish_keys(peer, index)  # keys first: a record never names missing keys
            self._slot(index).write(self._scratch)
        except (OSError, ValueError, struct.error) as exc:
            if not self._failing:
                log.error("worker %d: peer record not written (%s); its traffic waits",
                          self.worker_id, exc)  # fmt: skip
            self._failing = True
            self._endpoint.pop(peer.public_key, None)  # publish_dirty tries again
            return False
        if self._failing:
            log.info("worker %d: peer records written again", self.worker_id)
            self._failing = False
        self._generation[peer.public_key] = gen
        for which, kp in enumerate(kps):
            if kp is not None:
                kp.on_reserve = self._on_reserve
                kp.send_reserved = limits[which]
                # Sessions move between current/previous/next: the floor follows.
                kp.recv_floor = self._recv_floor(index, which)
        if peer.traffic is None:  # from now on each count goes straight to the record
            peer.traffic = self._traffic(index)
        self._endpoint[peer.public_key] = peer.endpoint
        return True

    def _publish_keys(self, peer: Peer, index: int) -> None:
        """Write the sessions' keys to the key slot if the set of sessions changed."""
        sessions = (peer.current, peer.previous, peer.next)
        tag = tuple(kp.local_index if kp is not None else -1 for kp in sessions)
        if self._keys_of.get(index, _NO_KEYS) == tag:
            return
        keys = [
            (kp.local_index, kp.send_key, kp.recv_key) if kp is not None else None
            for kp in sessions
        ]
        self.secrets.key_slot(index).write(encode_keys(keys))
        self._keys_of[index] = tag

    def publish_dirty(self) -> None:
        """Republish peers whose endpoint moved, or whose last write failed (their counters
        need no publish: each count is stored in the record's rx/tx words at once)."""
        written = self._endpoint
        for key, peer in self.peers.items():
            if key not in written or written[key] != peer.endpoint:
                self.publish(peer)

    def forget(self, public_key: bytes) -> None:
        """The peer was removed: stop publishing it (the supervisor frees its slot)."""
        peer = self.peers.pop(public_key, None)
        if peer is not None:
            peer.traffic = None  # its slot is freed and will be reused
        self._endpoint.pop(public_key, None)
        self._generation.pop(public_key, None)

    def track(self, peer: Peer) -> None:
        """Publish a peer even before it has a session (so show/UAPI see its endpoint)."""
        self._handed.discard(peer.public_key)
        self.publish(peer)

    def release(self, peer: Peer, owner: int) -> None:
        """A placement move: publish `peer` one last time naming worker `owner` as its writer
        (handed), then never write its slot again (until we adopt it back)."""
        self.publish(peer, owner)
        self._handed.add(peer.public_key)
        self.forget(peer.public_key)

    def restore(self, peer: Peer, now: float) -> bool:
        """Resume `peer`'s sessions from its slot (replacement worker). True if any."""
        index = self.slot_of.get(peer.public_key)
        if index is None:
            return False
        try:
            rec = decode_peer(self._slot(index).read())
        except Exception:  # torn by a writer that died mid-write, or corrupt: handshake anew
            return False
        if rec is None or rec.public_key != peer.public_key:
            return False
        try:
            keys = decode_keys(self.secrets.key_slot(index).read())
        except Exception:  # torn by a writer that died mid-write: handshake anew
            keys = {}
        self._handed.discard(peer.public_key)
        self._generation[peer.public_key] = rec.generation
        peer.endpoint = rec.endpoint if rec.endpoint is not None else peer.endpoint
        peer.last_handshake_wall = rec.last_handshake_wall
        peer.rx_bytes, peer.tx_bytes = rec.rx_bytes, rec.tx_bytes
        peer.last_timestamp = rec.last_timestamp
        restored = False
        for which, name in enumerate(("current", "previous", "next")):
            krec = getattr(rec, name)
            pair = keys.get(krec.local_index) if krec is not None else None
            if krec is None or pair is None:
                continue
            kp = restore_keypair(krec, *pair)
            kp.peer = peer
            # The first send past the published limit publishes a new block.
            kp.on_reserve = self._on_reserve
            # Accepts raise the floor where this record holds it, even if the publication
            # below fails.
            kp.recv_floor = self._recv_floor(index, which)
            peer.table.restore(kp)
            setattr(peer, name, kp)
            restored = True
        if restored and peer.current is not None:
            peer.zero_deadline = peer.current.created + 3 * 180.0
            peer.arm(peer.zero_deadline)
        self.peers[peer.public_key] = peer
        self.publish(peer)
        return restored
