"""A non-owner's read-only view of a spread peer: the session it seals with, from shm.

Why: when a peer is spread (proto/spread.py), every worker that reads the peer's packets
from its TUN queue seals them itself instead of handing them to the owner. The owner alone
runs handshakes and timers and publishes each session (record in the peer's slot, keys in
the secret area); a follower re-reads them only when the slot's sequence moved (a session
or endpoint change, or the owner's per-block counter publish), once per batch, and draws
its own counter blocks under the current session. It never writes the slot.
"""

from __future__ import annotations

from typing import Any

from shardwg.proto.keypair import Keypair
from shardwg.proto.spread import SpreadBlocks
from shardwg.shm.peerslot import decode_peer, floor_window
from shardwg.shm.secrets import SecretArea, decode_keys
from shardwg.shm.seqlock import SeqlockSlot
from shardwg.shm.spread import PeerLedger


class SpreadFollower:
    """Worker `worker`'s copy of one spread peer's current session and endpoint."""

    __slots__ = ("slot", "keys", "blocks", "ledger", "worker", "public_key", "seen", "kp",
                 "endpoint", "peer", "on_change")

    def __init__(
        self,
        slot: SeqlockSlot,
        secrets: SecretArea,
        slot_index: int,
        public_key: bytes,
        ledger: PeerLedger,
        worker: int,
        workers: int,
    ) -> None:
        self.slot = slot
        self.keys = secrets.key_slot(slot_index)
        self.blocks = SpreadBlocks(worker, workers, ledger)
        self.ledger = ledger
        self.worker = worker
        self.public_key = public_key
        self.peer: Any = None  # the RemotePeer the inner source must route to
        # Called with (old, new) sessions when the followed one changes (Device.followed).
        self.on_change: Any = None
        self.seen = -1  # the slot sequence last read
        self.kp: Keypair | None = None
        self.endpoint: tuple[Any, ...] | None = None

    def refresh(self) -> Keypair | None:
        """Re-read the slot if its sequence moved; the followed session (or None)."""
        seq = self.slot.sequence()
        if seq != self.seen and not seq & 1:
            old = self.kp
            self._reload(seq)
            if self.kp is not old:
                if old is not None:
                    old.recv_floor = None  # its cell now holds the new session's floor
                if self.on_change is not None:
                    self.on_change(old, self.kp)
        return self.kp

    def session(self) -> Keypair | None:
        """Once per batch: the session to seal with, or None (hand the packet to the owner:
        no session yet, not spread yet, or the slot unreadable right now). The sealer keeps
        up with the other workers' counters before each run (engine/outbound.py)."""
        return self.refresh()

    def _reload(self, seq: int) -> None:
        try:
            rec = decode_peer(self.slot.read(max_retries=100))
        except Exception:  # torn by a dying owner or mid-write: try again next batch
            return
        self.seen = seq
        if rec is None or rec.public_key != self.public_key or rec.current is None:
            self.kp = None
            return
        self.endpoint = rec.endpoint
        cur = rec.current
        kp = self.kp
        if kp is not None and kp.local_index == cur.local_index:
            return
        try:
            pair = decode_keys(self.keys.read(max_retries=100)).get(cur.local_index)
        except Exception:
            pair = None
        if pair is None:
            self.kp = None
            self.seen = -1  # the keys come before the record; retry next batch
            return
        kp = Keypair(pair[0], pair[1], cur.local_index, cur.remote_index, cur.is_initiator,
                     cur.created)  # fmt: skip
        if not self.blocks.follow(kp):
            self.kp = None
            self.seen = -1  # the owner has not spread this session yet
            return
        # Receive: a replacement of ours rejects what we accepted (floor in our cell).
        kp.replay = floor_window(self.ledger.recv_floor(self.worker, cur.local_index))
        kp.recv_floor = self.ledger.claim(self.worker, cur.local_index)
        kp.peer = self.peer
        self.kp = kp
