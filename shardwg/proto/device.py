"""The sans-IO device: one worker's peers, index table, routing table and handshake intake.

It turns datagrams and IP packets into IP packets and datagrams. The worker
calls `send_packet` per packet with preallocated buffers (it returns a size or
`-1 - DropReason`, never raises) and `receive_handshake` for the rare handshake
messages; it opens transport datagrams in batches (shardwg/datapath), over the
same sessions and replay windows. `receive_transport` is the single-packet open
of the sans-IO model (in-memory pairs, fuzzers). Whatever peers want sent
gathers in `outbox` as (peer, datagram) pairs, events in `events`.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from shardwg.proto import noise
from shardwg.proto.allowedips import AllowedIPs
from shardwg.proto.constants import (
    DEFAULT_MTU,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    DropReason,
    MessageType,
)
from shardwg.proto.index import SPREAD_INDEX_BIT, IndexAllocator
from shardwg.proto.indextable import IndexTable
from shardwg.proto.intake import HandshakeIntake
from shardwg.proto.keypair import Keypair, open_into, seal_into
from shardwg.proto.ownership import RemotePeer
from shardwg.proto.peer import INF, Peer, PeerEvent

RandomBytes = Callable[[int], bytes]
_U32 = struct.Struct("<I")
_SPREAD_BYTE_BIT = SPREAD_INDEX_BIT >> 8  # the spread bit in the index's second byte
_BE32 = struct.Struct(">I")
_BE16 = struct.Struct(">H")
_V6ADDR = struct.Struct(">QQ")

_UNKNOWN_INDEX = -1 - DropReason.UNKNOWN_INDEX
_KEY_EXPIRED = -1 - DropReason.KEY_EXPIRED
_BAD_INNER = -1 - DropReason.BAD_INNER_PACKET
_NOT_ALLOWED = -1 - DropReason.SOURCE_NOT_ALLOWED
_NO_ROUTE = -1 - DropReason.NO_ROUTE
_NO_ENDPOINT = -1 - DropReason.NO_ENDPOINT


class ForeignInitiation(NamedTuple):
    """An initiation from a peer another worker owns: pass the datagram to worker `owner`.

    (Unrelated to `shm.handoff`, which is the ring that carries it there.)"""

    owner: int


class _Foreign(Exception):
    def __init__(self, owner: int) -> None:
        self.owner = owner


class Device:
    """Protocol state of the peers one worker owns (or all peers, with one worker)."""

    def __init__(
        self,
        private_key: bytes,
        random_bytes: RandomBytes,
        *,
        worker_id: int = 0,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        self.random_bytes = random_bytes
        self.mtu = mtu
        self.local = noise.LocalIdentity.from_private(private_key)
        self.table = IndexTable(
            IndexAllocator(worker_id, lambda: int.from_bytes(random_bytes(3), "little"))
        )
        self.sessions: dict[int, Keypair] = self.table.sessions
        self.peers: dict[bytes, Peer] = {}
        self.remote: dict[bytes, RemotePeer] = {}
        self.allowed: AllowedIPs[Peer | RemotePeer] = AllowedIPs()
        self.intake = HandshakeIntake(self.local, random_bytes)
        self.outbox: list[tuple[Peer, bytes]] = []
        self.events: list[tuple[Peer, PeerEvent]] = []
        self.timers: list[tuple[float, int, Peer]] = []  # wake-ups: see proto/peer.py
        self._next_gc = 0.0
        # Sessions of ours that a placement move gave to another worker: our index -> that
        # peer (its `owner` follows later moves). Datagrams still carrying such an index are
        # steered here until the next handshake; `forward(owner, msg, n, src)` passes them on.
        self.moved: dict[int, RemotePeer] = {}
        # Spread peers we do not own (shm/follower.py): their current sessions by local
        # index, each with this worker's own replay window over the counters steered here;
        # `refresh_followed` re-reads the owners' slots when an unknown spread index arrives.
        self.followed: dict[int, Keypair] = {}
        self.followed_generation = 0  # bumped on every change of `followed` (datapath sync)
        self.refresh_followed: Callable[[], None] | None = None
        self.forward: Callable[[int, memoryview, int, Any], None] | None = None

    # ------------------------------------------------------------------ configuration
    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: list[str] | None = None,
        endpoint: Any = None,
        persistent_keepalive: int = 0,
    ) -> Peer:
        if public_key in self.peers:
            raise ValueError("peer already present")
        prefixes = _networks(allowed_ips or ())  # a bad prefix refuses the whole peer
        crypto = noise.PeerCrypto.build(self.local, public_key, preshared_key)
        peer = Peer(
            self.local,
            crypto,
            self.table,
            self.random_bytes,
            endpoint=endpoint,
            persistent_keepalive=persistent_keepalive,
            mtu=self.mtu,
            outbox=self.outbox,
            events=self.events,
            timers=self.timers,
        )
        self.peers[public_key] = peer
        for net in prefixes:
            self.allowed.insert(net, peer)
        return peer

    def add_remote_peer(self, public_key: bytes, allowed_ips: list[str], owner: int) -> RemotePeer:
        """A peer another worker owns: routed here only to be handed over."""
        if public_key in self.peers or public_key in self.remote:
            raise ValueError("peer already present")
        prefixes = _networks(allowed_ips)
        remote = RemotePeer(public_key, owner)
        self.remote[public_key] = remote
        for net in prefixes:
            self.allowed.insert(net, remote)
        return remote

    def remove_peer(self, public_key: bytes) -> None:
        remote = self.remote.pop(public_key, None)
        if remote is not None:
            self.allowed.remove_value(remote)
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        self.allowed.remove_value(peer)
        peer.zero_keys()
        peer.staged.clear()

    def release_peer(self, public_key: bytes, owner: int, allowed_ips: list[str]) -> RemotePeer:
        """A placement move: `peer` now belongs to worker `owner`. Its sessions leave our
        index table (their indices stay reserved, remembered in `moved`), it becomes a
        remote peer routed to `owner`. The caller published its slot first."""
        prefixes = _networks(allowed_ips)  # parsed before anything changes
        peer = self.peers.pop(public_key)
        self.allowed.remove_value(peer)
        remote = RemotePeer(public_key, owner)
        for kp in (peer.current, peer.previous, peer.next):
            if kp is not None:
                self.table.detach(kp.local_index)
                self.moved[kp.local_index] = remote
        if peer.handshake is not None:
            self.table.release(peer.handshake.local_index)
            peer.handshake = None
        peer.current = peer.previous = peer.next = None
        peer.staged.clear()
        self.outbox[:] = [(p, d) for p, d in self.outbox if p is not peer]
        self.events[:] = [(p, e) for p, e in self.events if p is not peer]
        self.remote[public_key] = remote
        for net in prefixes:
            self.allowed.insert(net, remote)
        return remote

    def forget_moved(self, keep: Callable[[int, RemotePeer], bool]) -> None:
        """Drop forwarding entries `keep` rejects (their indices become free again)."""
        for index, remote in list(self.moved.items()):
            if not keep(index, remote):
                del self.moved[index]
                if index not in self.table.sessions:
                    self.table.allocator.release(index)

    def set_allowed_ips(self, peer: Peer | RemotePeer, allowed_ips: list[str]) -> None:
        """Replace a peer's prefixes (a prefix another peer held moves to this one); a bad
        prefix leaves the old ones in place."""
        prefixes = _networks(allowed_ips)
        self.allowed.remove_value(peer)
        for net in prefixes:
            self.allowed.insert(net, peer)

    def set_preshared_key(self, peer: Peer, preshared_key: bytes | None) -> None:
        """A new PSK applies from the next handshake; current sessions keep their keys."""
        if (preshared_key or bytes(32)) != peer.crypto.preshared:
            peer.crypto = noise.PeerCrypto.build(self.local, peer.public_key, preshared_key)

    def _find_crypto(self, static: bytes) -> noise.PeerCrypto | None:
        peer = self.peers.get(static)
        if peer is not None:
            return peer.crypto
        remote = self.remote.get(static)
        if remote is not None:
            raise _Foreign(remote.owner)  # stop before the peer-specific work
        return None

    # ------------------------------------------------------------------ hot path
    def receive_transport(
        self, msg: memoryview, n: int, src: Any, out: memoryview, now: float, wall: float
    ) -> int:
        """Decrypt a transport datagram into `out`; return the inner packet length to
        write to the TUN, 0 for a keepalive, or `-1 - DropReason`."""
        index = _U32.unpack_from(msg, 4)[0]
        kp = self.sessions.get(index)
        if kp is None:
            if msg[5] & _SPREAD_BYTE_BIT and self.table.allocator.steer_spread:
                # steered by its counter: only our own window may open it, never hand it
                # to the owner (its window never saw our block class)
                return self._receive_followed(index, msg, n, out, now)
            moved = self.moved.get(index) if self.moved else None
            if moved is None or self.forward is None:
                return _UNKNOWN_INDEX
            self.forward(moved.owner, msg, n, src)  # an old index of a peer that moved
            return 0
        if now - kp.created >= REJECT_AFTER_TIME:
            return _KEY_EXPIRED
        plen = open_into(kp, msg, n, out)
        if plen < 0:
            return plen
        peer: Peer = kp.peer
        if kp is not peer.current and kp is peer.next:
            peer.confirm(kp, now, wall)
        if src != peer.endpoint:
            peer.endpoint = src  # roaming: the latest authenticated source wins
        if plen == 0:
            peer.received(now, n, False)
            return 0
        total = self._inner_length(peer, out, plen)
        if total < 0:
            return total
        peer.received(now, n, True)
        if kp.is_initiator and now - kp.created >= REKEY_ON_RECEIVE_AGE:
            peer.keep_key_fresh_receiving(kp, now, wall)
        return total

    def _receive_followed(
        self, index: int, msg: memoryview, n: int, out: memoryview, now: float
    ) -> int:
        """A spread peer's datagram steered here by its counter (we do not own the peer):
        open it with the followed session and our own window, check the inner source. No
        timers or endpoint updates: the owner runs those."""
        kp = self.followed.get(index)
        if kp is None and self.refresh_followed is not None:
            self.refresh_followed()  # a new session of a followed peer: reload its slot
            kp = self.followed.get(index)
        if kp is None:
            return _UNKNOWN_INDEX
        if now - kp.created >= REJECT_AFTER_TIME:
            return _KEY_EXPIRED
        plen = open_into(kp, msg, n, out)
        if plen <= 0:
            return plen
        return self._inner_length(kp.peer, out, plen)

    def _inner_length(self, peer: Peer, out: memoryview, plen: int) -> int:
        """The decrypted packet's IP total length if its source is one of `peer`'s allowed
        IPs (cryptokey routing, inbound), else `-1 - DropReason`."""
        version = out[0] >> 4
        if version == 4:
            if plen < 20:
                return _BAD_INNER
            total = _BE16.unpack_from(out, 2)[0]
            if total < 20 or total > plen:
                return _BAD_INNER
            owner = self.allowed.lookup_v4(_BE32.unpack_from(out, 12)[0])
        elif version == 6:
            if plen < 40:
                return _BAD_INNER
            total = 40 + _BE16.unpack_from(out, 4)[0]
            if total > plen:
                return _BAD_INNER
            hi, lo = _V6ADDR.unpack_from(out, 8)
            owner = self.allowed.lookup_v6((hi << 64) | lo)
        else:
            return _BAD_INNER
        if owner is not peer:
            return _NOT_ALLOWED
        return total

    def route(self, pkt: memoryview, n: int) -> Peer | RemotePeer | None:
        """Cryptokey routing: the peer whose allowed IPs hold the packet's destination."""
        if n < 20:
            return None
        version = pkt[0] >> 4
        if version == 4:
            return self.allowed.lookup_v4(_BE32.unpack_from(pkt, 16)[0])
        if version == 6 and n >= 40:
            hi, lo = _V6ADDR.unpack_from(pkt, 24)
            return self.allowed.lookup_v6((hi << 64) | lo)
        return None

    def send_packet(
        self, peer: Peer, pkt: memoryview, n: int, out: memoryview, now: float, wall: float
    ) -> int:
        """Seal an IP packet for `peer` into `out`; return the datagram size, 0 if it was
        staged waiting for a handshake, or `-1 - DropReason`. `pkt` needs 15 spare bytes
        after `n` for padding."""
        kp = peer.current
        if (
            kp is None
            or now - kp.created >= REJECT_AFTER_TIME
            or kp.send_counter >= REJECT_AFTER_MESSAGES
        ):
            if peer.endpoint is None:
                return _NO_ENDPOINT
            peer.stage(bytes(pkt[:n]), now, wall)
            return 0
        if peer.endpoint is None:
            return _NO_ENDPOINT
        size = seal_into(kp, pkt, n, self.mtu, out)
        if size < 0:
            return size
        peer.sent_data(now, size)
        if kp.is_initiator and now - kp.created >= REKEY_AFTER_TIME:
            peer.keep_key_fresh_sending(kp, now, wall)
        return size

    # ------------------------------------------------------------------ handshakes
    def receive_handshake(
        self, msg: bytes, src: Any, source: bytes, now: float, wall: float, screened: bool = False
    ) -> DropReason | bytes | ForeignInitiation | None:
        """Process an initiation, response or cookie reply (already classified by size).

        Returns None when handled, a DropReason, a cookie reply (bytes) to send to
        `src`, or a ForeignInitiation when another worker owns the initiating peer.
        `source` is the packed source address for cookies and rate limits; `screened` skips the
        mac/cookie checks for a message another worker already screened.
        """
        mtype = msg[0]
        if mtype == MessageType.COOKIE_REPLY:
            index = _U32.unpack_from(msg, 4)[0]
            peer = self.table.pending.get(index)
            if peer is None:
                kp = self.sessions.get(index)
                peer = kp.peer if kp is not None else None
            if peer is None:
                return DropReason.UNKNOWN_INDEX
            result: DropReason | None = peer.receive_cookie_reply(msg, now)
            return result
        if not screened:
            verdict = self.intake.screen(msg, source, now)
            if verdict is not None:
                return verdict
        if mtype == MessageType.INITIATION:
            try:
                received = noise.consume_initiation(self.local, msg, self._find_crypto)
            except noise.HandshakeError as exc:
                return exc.reason
            except _Foreign as foreign:
                return ForeignInitiation(foreign.owner)
            peer = self.peers.get(received.peer.remote_static)
            if peer is None:
                return DropReason.UNKNOWN_PEER
            result = peer.receive_initiation(received, now, wall)
            if result is None:
                peer.endpoint = src
            return result
        # response
        index = _U32.unpack_from(msg, 8)[0]
        peer = self.table.pending.get(index)
        if peer is None or peer.handshake is None or peer.handshake.local_index != index:
            return DropReason.UNKNOWN_INDEX
        result = peer.receive_response(msg, now, wall)
        if result is None:
            peer.endpoint = src
        return result

    def tick(self, now: float, wall: float) -> None:
        if now >= self._next_gc:
            # Forget idle rate-limiter sources (as wireguard-go does every second), or a
            # full table would refuse every new source for good.
            self.intake.limiter.gc(now)
            self._next_gc = now + 1.0
        # Only the peers whose wake-up is due: the cost is per due timer, not per peer.
        timers = self.timers
        peers = self.peers
        while timers and timers[0][0] <= now:
            at, _id, peer = heapq.heappop(timers)
            if at != peer.timer_at or peers.get(peer.public_key) is not peer:
                continue  # superseded by an earlier wake-up, or the peer was removed
            peer.timer_at = INF
            if now >= peer.next_deadline():
                peer.tick(now, wall)
            nxt = peer.next_deadline()
            if nxt != INF:
                peer.arm(nxt)

    def next_wakeup(self) -> float:
        """When `tick` next has something to do (INF: nothing armed)."""
        return self.timers[0][0] if self.timers else INF


def _networks(prefixes: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Parse every prefix before any is applied: ValueError leaves the device untouched."""
    return [ipaddress.ip_network(prefix, strict=False) for prefix in prefixes]
