"""A non-owner's read-only view of a spread peer: the session it seals with, from shm.

Why: when a peer is spread (proto/spread.py), every worker that reads the peer's packets
from its TUN queue seals them itself instead of handing them to the owner. The owner alone
runs handshakes and timers and publishes each session (record in the peer's slot, keys in
the secret area); a follower re-reads them only when the slot's sequence moved (a session
or endpoint change, or the owner's per-block counter publish), once per batch, and draws
its own counter blocks under the current session. It never writes the slot.

Receive (a spread peer's datagrams steered here by counter): it opens every session the
owner's peer holds, each with its own replay window and its floor in one of its receive
cells of the ledger: the previous one (datagrams still in flight after a rekey), the
current one and the next one (the remote switched already; its first datagrams may land
here, and our floor above 0 tells the owner to confirm it: engine/adoption.py). A session's
window starts at our cell's floor. Not at the owner's: that is the highest counter of the
owner's block class, and ours below it may still be on their way. A worker that owned the
peer before a move wrote its floors into its cells when it gave the peer away.
"""

from __future__ import annotations

from typing import Any

from shardwg.proto.constants import REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_TIMEOUT
from shardwg.proto.index import SPREAD_INDEX_BIT
from shardwg.proto.keypair import Keypair
from shardwg.proto.spread import SpreadBlocks
from shardwg.shm.peerslot import decode_peer, floor_window
from shardwg.shm.secrets import SecretArea, decode_keys
from shardwg.shm.seqlock import SeqlockSlot
from shardwg.shm.spread import PeerLedger


class SpreadFollower:
    """Worker `worker`'s copy of one spread peer's current session and endpoint."""

    __slots__ = ("slot", "keys", "blocks", "ledger", "worker", "public_key", "seen", "kp",
                 "receiving", "sealing", "endpoint", "peer", "on_change", "rekey_asked")

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
        # Called with (removed, added) sessions when the opened ones change (Device.followed).
        self.on_change: Any = None
        self.seen = -1  # the slot sequence last read
        self.kp: Keypair | None = None  # the current session, once spread: we seal with it
        self.receiving: dict[int, Keypair] = {}  # local index -> a session we open
        self.rekey_asked = -REKEY_TIMEOUT  # when we last handed the owner a packet to rekey
        self.sealing = True  # False: the peer is no longer spread, we only open what is
        # still steered here (its sessions with the steering bit) until none is left
        self.endpoint: tuple[Any, ...] | None = None

    def refresh(self) -> Keypair | None:
        """Re-read the slot if its sequence moved; the session to seal with (or None)."""
        seq = self.slot.sequence()
        if seq != self.seen and not seq & 1:
            before = dict(self.receiving)
            self._reload(seq)
            after = self.receiving
            removed = [kp for i, kp in before.items() if after.get(i) is not kp]
            added = [kp for i, kp in after.items() if before.get(i) is not kp]
            if (removed or added) and self.on_change is not None:
                self.on_change(removed, added)
        return self.kp

    def session(self) -> Keypair | None:
        """Once per batch: the session to seal with, or None (hand the packet to the owner:
        no session yet, not spread yet, or the slot unreadable right now). The sealer keeps
        up with the other workers' counters before each run (engine/outbound.py)."""
        kp = self.refresh()
        return kp if self.sealing else None

    def rekey_due(self, now: float) -> bool:
        """Whether to hand the owner one packet of this batch so that its send starts a rekey
        (at most once per REKEY_TIMEOUT). The owner runs the timers, but the rule "an
        initiator rekeys when it sends on a session older than REKEY_AFTER_TIME" only sees
        its own sends: a peer whose flows all hash to other workers was never rekeyed, and
        its session expired under load (REJECT_AFTER_TIME), stalling every flow."""
        kp = self.kp
        if kp is None or not self.sealing or not kp.is_initiator:
            return False
        if now - kp.created < REKEY_AFTER_TIME and kp.send_counter < REKEY_AFTER_MESSAGES:
            return False
        if now - self.rekey_asked < REKEY_TIMEOUT:
            return False
        self.rekey_asked = now
        return True

    def steered(self) -> bool:
        """Whether a session we open carries the steering bit (datagrams reach us)."""
        return any(index & SPREAD_INDEX_BIT for index in self.receiving)

    def _reload(self, seq: int) -> None:
        try:
            rec = decode_peer(self.slot.read(max_retries=100))
        except Exception:  # torn by a dying owner or mid-write: try again next batch
            return
        self.seen = seq
        if rec is None or rec.public_key != self.public_key:
            self._drop(set())
            self.kp = None
            return
        self.endpoint = rec.endpoint
        sessions = [s for s in (rec.previous, rec.current, rec.next) if s is not None]
        keep = {s.local_index for s in sessions}
        self._drop(keep)  # first: their receive cells may be taken below
        keys: dict[int, tuple[bytes, bytes]] = {}
        if any(s.local_index not in self.receiving for s in sessions):
            try:
                keys = decode_keys(self.keys.read(max_retries=100))
            except Exception:
                keys = {}
        for s in sessions:
            if s.local_index in self.receiving:
                continue
            pair = keys.get(s.local_index)
            if pair is None:
                self.seen = -1  # the keys come before the record; retry next batch
                continue
            kp = Keypair(pair[0], pair[1], s.local_index, s.remote_index, s.is_initiator,
                         s.created)  # fmt: skip
            kp.recv_floor = self.ledger.claim(self.worker, s.local_index, keep)
            kp.replay = floor_window(int(kp.recv_floor[0]))
            kp.peer = self.peer
            self.receiving[s.local_index] = kp
        cur = self.receiving.get(rec.current.local_index) if rec.current is not None else None
        if cur is None:
            self.kp = None
        elif cur is not self.kp:
            if cur.blocks is not None or self.blocks.follow(cur):
                self.kp = cur
            else:
                self.kp = None
                self.seen = -1  # the owner has not spread this session yet

    def _drop(self, keep: set[int]) -> None:
        """Stop opening the sessions the owner no longer holds (their cells are free)."""
        for index in [i for i in self.receiving if i not in keep]:
            self.receiving.pop(index).recv_floor = None
