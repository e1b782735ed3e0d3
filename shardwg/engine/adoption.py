"""A worker's side of placement: follow the supervisor's table, give peers away, adopt them.

The table (shm/placement.py) says who should own each peer; the `owner` field of the
peer's own slot record says who writes that record now. One rule, applied at boot,
when the table's generation moves, and when a RELEASE arrives, keeps one writer per
slot through moves and crashes:
  - the table names us and the record is ours, free, or handed to us: adopt it (the
    replacement-worker path: sessions resume from the slot, no handshake);
  - the table names us and another worker still writes the record: wait for it (its
    packets meanwhile are held here, bounded, and replayed on adoption);
  - the table names another worker and we own the peer, or the record is ours (we are
    the replacement of a worker that died before handing it over): publish the slot one
    last time naming the new owner (`handed`), send the exact send counters so none is
    skipped or reused, turn the peer into a remote one, and push RELEASE to the owner;
  - otherwise route the peer's packets to the table's owner.
Datagrams that still carry one of our old receiver indices keep arriving here (steering
reads the index's low byte) until the next handshake: `Device.moved` passes them to the
new owner as TRANSPORT handoffs, and it finds the session by that index (restored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shardwg.engine import control
from shardwg.proto import ownership
from shardwg.proto.constants import REJECT_AFTER_TIME
from shardwg.proto.device import Device
from shardwg.proto.index import SPREAD_INDEX_BIT
from shardwg.proto.peer import Peer
from shardwg.proto.spread import SpreadBlocks
from shardwg.shm import counters as C
from shardwg.shm.follower import SpreadFollower
from shardwg.shm.handoff import HandoffKind
from shardwg.shm.layout import Layout
from shardwg.shm.peerslot import PEER_RECORD_SIZE, decode_peer, encode_peer, floor_window
from shardwg.shm.placement import BOTH_WAYS, SpreadWhy, decode_table
from shardwg.shm.publisher import SessionPublisher
from shardwg.shm.spread import PeerLedger

log = logging.getLogger("shardwg.engine.worker")
UNREADABLE_CLAIM = 3  # checks a torn record must stay torn before we claim it afresh


class ShardPlacement:
    def __init__(
        self,
        device: Device,
        publisher: SessionPublisher,
        layout: Layout,
        buf: Any,
        worker_id: int,
        specs: dict[bytes, control.PeerSpec],
        push: Callable[[int, bytes | memoryview, int], bool],
        counters: list[int] | None = None,
    ) -> None:
        self.device = device
        self.publisher = publisher
        self.layout = layout
        self.buf = buf
        self.me = worker_id
        self.specs = specs  # every peer of the gateway, as configured (own and remote)
        self.push = push  # (dst, payload, kind) onto our ring towards dst; False when full
        self.v = counters
        self.slot = layout.placement_slot(buf)
        self.generation = -1
        self._seen = -1  # the table slot's sequence word when we last read it
        self.table: list[int] = []
        self.incoming: dict[bytes, int] = {}  # peers the table gives us, record not yet ours
        self.releases: list[tuple[int, bytes]] = []  # RELEASE pushes that found a full ring
        self.moved_until: dict[int, float] = {}
        self.view: dict[bytes, int] = {}  # the table's owner of each peer as last applied
        self.spread: set[int] = set()  # peer slots the table spreads over every worker
        self.spread_why: dict[int, SpreadWhy] = {}  # of those, why (the table's top byte)
        self.own_spread: dict[bytes, SpreadBlocks] = {}  # spread peers we own
        # Peers we own whose sessions may carry the steering bit (spread, or spread before
        # and not rekeyed since): their ledgers, to confirm a next session a follower opened.
        self.steered_own: dict[bytes, PeerLedger] = {}
        self.receive_only: set[bytes] = set()  # followed for receiving only (no longer spread)
        # A replacement's first pass also follows peers its predecessor opened (ledger
        # cells); boot clears it for a first start, where every cell is empty (reading
        # them would fault in the ledger's pages of every peer).
        self.resume_followers = True
        self.released_steered: set[bytes] = set()  # given away with steered sessions

    # ------------------------------------------------------------------ reading
    def refresh(self) -> bool:
        """Re-read the table if its generation moved; True if it did. Called every tick:
        an unchanged sequence word means an unchanged table, so nothing is copied (a table
        sized for 65,536 peers costs ~13 ms to copy and decode)."""
        seq = self.slot.sequence()
        if seq == self._seen and not seq & 1:
            return False
        try:
            t = decode_table(self.slot.read(max_retries=1000))
        except Exception:  # torn by nothing (one writer) or foreign: keep what we have
            return False
        self._seen = seq
        if t is None or t.generation == self.generation:
            return False
        self.generation = t.generation
        self.table = t.owners
        self.spread = t.spread
        self.spread_why = t.spread_why
        return True

    def owner_of(self, key: bytes) -> int:
        """The table's owner of a peer, -1 when it is not placed (yet). A region whose
        table was never written (no supervisor placed anything) falls back to the hash."""
        if self.generation < 0:
            return ownership.owner_of(key, self.layout.workers)
        index = self.publisher.slot_of.get(key)
        if index is None or not 0 <= index < len(self.table):
            return -1
        return self.table[index]

    def _record(self, key: bytes) -> tuple[bool, Any]:
        """(readable, record or None when the slot is free / holds another peer)."""
        index = self.publisher.slot_of.get(key)
        if index is None:
            return True, None
        try:
            rec = decode_peer(self.layout.peer_slot(self.buf, index).read(max_retries=1000))
        except Exception:
            return False, None
        return True, (rec if rec is not None and rec.public_key == key else None)

    # ------------------------------------------------------------------ the rule
    def reconcile(
        self, now: float, wall: float, keys: list[bytes] | None = None, strict: bool = False
    ) -> None:
        """Apply the rule to `keys`, or to every peer whose table owner changed. A peer
        the device refuses (a bad prefix) is dropped and logged, or raises if `strict`
        (at boot: the configuration cannot work)."""
        if keys is None:
            keys = [k for k in self.specs if self.view.get(k) != self.owner_of(k)]
        for key in keys:
            if key not in self.specs:
                continue
            try:
                self._one(key, now, wall)
            except ValueError as exc:  # a peer this worker cannot hold: never retried
                if strict:
                    raise
                log.error("worker %d: peer %s… refused: %s", self.me, key[:4].hex(), exc)
                self.specs.pop(key, None)
                self.incoming.pop(key, None)
                self.device.remove_peer(key)
                continue
            self.view[key] = self.owner_of(key)
        self._apply_spread()
        self._count()

    def _apply_spread(self) -> None:
        """Give each spread peer a follower (not ours) or counter blocks (ours); take them
        away from peers no longer spread. Each session stays spread once begun (its
        counters then come from blocks only), so nothing is reused when spreading stops.
        A peer no longer spread whose sessions still carry the steering bit keeps its
        followers for receiving only: the remote's datagrams are steered by counter until
        a new session, and the owner's window never saw the other workers' counters."""
        dev = self.device
        workers = self.layout.workers
        area = self.layout.spread_area(self.buf)
        for key in self.specs:
            index = self.publisher.slot_of.get(key)
            on = index is not None and index in self.spread
            remote = dev.remote.get(key)
            if remote is not None:
                fol = remote.follower
                # Also a peer no longer spread that our predecessor (a crash) still opened
                # sessions of: they may still be steered here.
                # And a peer we just gave away whose sessions are still steered: our block
                # class keeps coming here, and only our window may open it.
                if fol is None and index is not None and (
                    on or key in self.released_steered
                    or (self.resume_followers and self._steering()
                        and area.peer(index).opened_by(self.me))
                ):  # fmt: skip
                    slot = self.layout.peer_slot(self.buf, index)
                    fol = SpreadFollower(
                        slot, self.publisher.secrets, index, key, area.peer(index), self.me,
                        workers,
                    )
                    fol.peer = remote
                    fol.on_change = self._followed_changed
                    remote.follower = fol
                if fol is not None:
                    fol.sealing = on
                    fol.refresh()
                    if on:
                        self.receive_only.discard(key)
                    elif self._steering() and fol.steered():
                        self.receive_only.add(key)
                    else:
                        remote.follower = None
                        self.receive_only.discard(key)
            peer = dev.peers.get(key)
            if peer is not None and on and index is not None:
                # Its next sessions' indices say so, and the other end's datagrams are then
                # steered by counter: right for a sender that spreads by the same blocks (a
                # shardwg told so: policy, override), a reordering for one that counts in
                # sequence. Measured traffic says nothing about the sender: those peers
                # spread our sealing only, the owner still opens all they send.
                peer.spread = self.spread_why.get(index) in BOTH_WAYS
                if key not in self.own_spread:
                    self.own_spread[key] = SpreadBlocks(self.me, workers, area.peer(index))
                self.steered_own[key] = area.peer(index)
            else:
                if peer is not None:
                    peer.spread = False
                if peer is not None and index is not None and self._steering() and _steered(peer):
                    self.steered_own[key] = area.peer(index)
                else:
                    self.steered_own.pop(key, None)
                self.own_spread.pop(key, None)
        self.resume_followers = False
        self.released_steered.clear()
        self._sync_followed()

    def _steering(self) -> bool:
        """Whether the gateway steers by the index's spread bit at all (--spread on or a
        peer's Spread = on: engine/boot.py); without it the bit is just part of an index."""
        return bool(self.device.table.allocator.steer_spread)

    def _sync_followed(self) -> None:
        """Only the sessions of peers we follow now are opened here."""
        dev = self.device
        followed = {}
        live = False
        for r in dev.remote.values():
            if r.follower is not None:
                live = True
                followed.update(r.follower.receiving)
        if followed != dev.followed:  # (Keypair compares by identity) a change: the kernel's
            dev.followed = followed  # state is rebuilt on the next batch, allowed IPs too,
            dev.followed_generation += 1  # which is not free at 10,000 peers
        dev.refresh_followed = self._refresh_followed if live else None

    def _followed_changed(self, removed: list[Any], added: list[Any]) -> None:
        dev = self.device
        for kp in removed:
            index = kp.local_index
            if dev.followed.get(index) is kp:
                del dev.followed[index]
        for kp in added:
            dev.followed[kp.local_index] = kp
        dev.followed_generation += 1

    def _refresh_followed(self) -> None:
        """An unknown spread index arrived: a followed peer may have a new session."""
        for remote in self.device.remote.values():
            if remote.follower is not None:
                remote.follower.refresh()

    def spread_sessions(self) -> None:
        """Owner, every tick: spread each spread peer's current session once it is published
        (its base fences off the sequential counters used before)."""
        for key, blocks in self.own_spread.items():
            peer = self.device.peers.get(key)
            kp = peer.current if peer is not None else None
            if kp is not None and kp.blocks is None and kp.on_reserve is not None:
                blocks.begin(kp)

    def steered_tick(self, now: float, wall: float) -> None:
        """Every tick, for peers whose sessions carry the steering bit:
        - ours: confirm a `next` session another worker opened a datagram of (the remote
          switched to it; its first counters are steered to worker 0, whoever owns it):
          we seal with it from now on, as if we had received it ourselves;
        - followed for receiving only (no longer spread): drop the follower once none of
          the owner's sessions is steered any more."""
        for key, ledger in list(self.steered_own.items()):
            peer = self.device.peers.get(key)
            if peer is None:
                del self.steered_own[key]
                continue
            nxt = peer.next
            if (nxt is not None and nxt.local_index & SPREAD_INDEX_BIT
                    and ledger.received(nxt.local_index, self.me)):  # fmt: skip
                peer.confirm(nxt, now, wall)
            if key not in self.own_spread and not (self._steering() and _steered(peer)):
                del self.steered_own[key]
        if self.receive_only:
            dropped = False
            for key in list(self.receive_only):
                remote = self.device.remote.get(key)
                fol = remote.follower if remote is not None else None
                if fol is None or fol.sealing:
                    self.receive_only.discard(key)
                    continue
                fol.refresh()
                if not (self._steering() and fol.steered()):
                    remote.follower = None  # type: ignore[union-attr]
                    self.receive_only.discard(key)
                    dropped = True
            if dropped:
                self._sync_followed()

    def forget(self, key: bytes) -> None:
        """The peer was removed from the configuration."""
        self.specs.pop(key, None)
        self.view.pop(key, None)
        self.incoming.pop(key, None)

    def _one(self, key: bytes, now: float, wall: float) -> None:
        dev = self.device
        want = self.owner_of(key)
        if want < 0:
            return
        if want == self.me:
            if key in dev.peers:
                self.incoming.pop(key, None)
                return
            readable, rec = self._record(key)
            if readable and (rec is None or rec.owner == self.me):
                self._adopt(key, rec is not None, now, wall)
            elif not readable and self.incoming.get(key, 0) >= UNREADABLE_CLAIM:
                self._adopt(key, False, now, wall)  # its writer died mid-write: start afresh
            else:
                self.incoming[key] = self.incoming.get(key, 0) + (0 if readable else 1)
                self._route(key, self.me)  # hold its packets here until the record is ours
            return
        self.incoming.pop(key, None)
        if key in dev.peers:
            self._release(dev.peers[key], want, now)
            return
        self._route(key, want)
        readable, rec = self._record(key)
        if readable and rec is not None and rec.owner == self.me:
            self._hand_record(key, rec, want, now)  # our predecessor died before handing it
        elif readable and rec is not None:
            self._forward_old(key, rec, now)

    def _route(self, key: bytes, owner: int) -> None:
        dev = self.device
        remote = dev.remote.get(key)
        if remote is not None:
            remote.owner = owner
        else:
            dev.add_remote_peer(key, list(self.specs[key].allowed_ips), owner)

    def _adopt(self, key: bytes, restore: bool, now: float, wall: float) -> None:
        spec = self.specs[key]
        dev = self.device
        dev.remove_peer(key)  # the remote stand-in
        peer = dev.add_peer(
            key,
            preshared_key=spec.preshared_key,
            allowed_ips=list(spec.allowed_ips),
            endpoint=spec.endpoint_tuple(),
            persistent_keepalive=spec.persistent_keepalive,
        )
        if not (restore and self.publisher.restore(peer, now)):
            self.publisher.track(peer)
        else:
            self._resume_spread(peer)
        self.incoming.pop(key, None)
        for kp in (peer.current, peer.previous, peer.next):
            if kp is not None:
                dev.moved.pop(kp.local_index, None)

    def _resume_spread(self, peer: Peer) -> None:
        """Sessions restored from the slot (a crash, or a move to us) that were spread:
        - send: each goes on through our counter blocks at once, before our first tick;
          its restored counter (the base, or the old owner's exact one) would run on
          sequentially into another worker's block;
        - receive: a peer we opened as a follower before (its datagrams steered here by
          counter) rejects what we accepted then too (our ledger cells; the slot's floor
          is only the previous owner's), and the slot keeps that from now on."""
        ledger = self._ledger_of(peer.public_key)
        if ledger is None:
            return
        blocks = SpreadBlocks(self.me, self.layout.workers, ledger)
        for kp in (peer.current, peer.previous, peer.next):
            if kp is None:
                continue
            if kp.blocks is None:
                blocks.follow(kp)  # False (nothing to do) for a session never spread
            if kp.recv_floor is not None:
                mine = ledger.recv_floor(self.me, kp.local_index)
                if mine > kp.recv_floor[0]:
                    kp.recv_floor[0] = mine
                    kp.replay = floor_window(mine)

    def _ledger_of(self, key: bytes) -> PeerLedger | None:
        """The spread ledger of a peer's slot (None: no slot)."""
        index = self.publisher.slot_of.get(key)
        return None if index is None else self.layout.spread_area(self.buf).peer(index)

    def _keep_floors(self, peer: Peer) -> None:
        """We give `peer` away and may follow it next (spread, its datagrams steered here by
        counter): our receive cells take its sessions' floors (what we accepted as owner,
        the slot's), so our windows as a follower reject those counters too."""
        ledger = self._ledger_of(peer.public_key)
        if ledger is None:
            return
        sessions = [kp for kp in (peer.current, peer.previous, peer.next) if kp is not None]
        keep = {kp.local_index for kp in sessions}
        for kp in sessions:
            if kp.recv_floor is not None:
                cell = ledger.claim(self.me, kp.local_index, keep)
                if cell[0] < kp.recv_floor[0]:
                    cell[0] = kp.recv_floor[0]

    def _release(self, peer: Peer, to: int, now: float) -> None:
        """Give `peer` to worker `to`: last publication, then routed there."""
        for kp in (peer.current, peer.previous, peer.next):
            if kp is not None:
                kp.send_reserved = kp.send_counter  # exact: the new owner goes on from here
        self._keep_floors(peer)
        if self._steering() and _steered(peer):
            self.released_steered.add(peer.public_key)
        staged = list(peer.staged)
        key = peer.public_key
        self.publisher.release(peer, to)
        self.device.release_peer(key, to, list(self.specs[key].allowed_ips))
        for index in [i for i, r in self.device.moved.items() if r.public_key == key]:
            self.moved_until[index] = now + REJECT_AFTER_TIME
        self._send_release(to, key)
        for pkt in staged:
            self.push(to, pkt, HandoffKind.TUN_PACKET)
        log.info("worker %d: peer %s… handed to worker %d", self.me, key[:4].hex(), to)

    def _forward_old(self, key: bytes, rec: Any, now: float) -> None:
        """Sessions in another worker's record under indices of ours (a predecessor gave
        them away): datagrams carrying them still come here, so pass them on."""
        remote = self.device.remote[key]
        for kp in (rec.current, rec.previous, rec.next):
            if kp is not None and kp.local_index & 0xFF == self.me:
                if kp.local_index not in self.device.sessions:
                    self.device.moved[kp.local_index] = remote
                    self.device.table.allocator.reserve(kp.local_index)
                    self.moved_until[kp.local_index] = kp.created + REJECT_AFTER_TIME

    def _hand_record(self, key: bytes, rec: Any, to: int, now: float) -> None:
        """Hand over a record a dead predecessor of ours still names as writer."""
        index = self.publisher.slot_of[key]
        rec.owner, rec.handed = to, True
        self._forward_old(key, rec, now)
        out = bytearray(PEER_RECORD_SIZE)
        encode_peer(rec, out)
        self.layout.peer_slot(self.buf, index).write(out)
        self._send_release(to, key)

    def _send_release(self, to: int, key: bytes) -> None:
        if not self.push(to, key, HandoffKind.RELEASE):
            self.releases.append((to, key))  # the owner also polls; retried each tick

    # ------------------------------------------------------------------ events
    def on_release(self, key: bytes, now: float, wall: float) -> None:
        """A RELEASE from our ring: the record should now be ours."""
        self.refresh()
        self.reconcile(now, wall, [key])

    def on_tick(self, now: float, wall: float) -> None:
        if self.own_spread:
            self.spread_sessions()
        if self.steered_own or self.receive_only:
            self.steered_tick(now, wall)
        if self.refresh():
            self.reconcile(now, wall)
        elif self.incoming:
            self.reconcile(now, wall, list(self.incoming))
        if self.releases:
            pending, self.releases = self.releases, []
            for to, key in pending:
                self._send_release(to, key)
        if self.moved_until or self.device.moved:
            dev = self.device
            dev.forget_moved(
                lambda i, r: dev.remote.get(r.public_key) is r and self.moved_until.get(i, 0) > now
            )
            self.moved_until = {i: t for i, t in self.moved_until.items() if i in dev.moved}

    def _count(self) -> None:
        if self.v is not None:
            self.v[C.PEERS_OWNED] = len(self.device.peers)


def _steered(peer: Peer) -> bool:
    """Whether any of the peer's sessions carries the steering bit (its datagrams are
    steered by counter over the workers)."""
    return any(kp is not None and kp.local_index & SPREAD_INDEX_BIT
               for kp in (peer.current, peer.previous, peer.next))  # fmt: skip
