"""An in-memory gateway for placement tests: simulated workers on one shared buffer.

Each `SimWorker` is what engine/boot.py builds for a worker, minus sockets: a Device, a
SessionPublisher, a ShardPlacement, and real SPSC rings of a HandoffMesh over the same
bytearray layout the processes share. A `World` adds a remote WireGuard (a plain Device),
the supervisor's Placer, and the network: datagrams are steered by the receiver index's
low byte, as the reuseport program does. It records every (send key, counter) the gateway
sealed and every datagram it accepted, so tests can prove neither happens twice across
moves and crashes.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from shardwg.engine import control
from shardwg.engine.adoption import ShardPlacement
from shardwg.engine.placer import Placer
from shardwg.proto.crypto import generate_private_key, public_key
from shardwg.proto.device import Device
from shardwg.proto.peer import PeerEvent
from shardwg.shm.handoff import HandoffKind, pack_transport, unpack_transport
from shardwg.shm.layout import Layout
from shardwg.shm.placement import Mode
from shardwg.shm.publisher import SessionPublisher
from shardwg.shm.secrets import SecretArea
from tests.pairs import ipv4_packet

GW_ADDR = ("192.0.2.1", 51820)
REMOTE_ADDR = ("192.0.2.2", 51820)
SOURCE = bytes([192, 0, 2, 2]) + struct.pack(">H", 51820)


def ip_packet(src: str, dst: str, payload: bytes) -> bytearray:
    """A minimal IPv4 packet with 16 spare bytes after it for padding."""
    return bytearray(ipv4_packet(src, dst, payload) + bytes(16))


class SimWorker:
    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.index = index
        w = world
        self.device = Device(w.gw_private, os.urandom, worker_id=index)
        self.device.table.allocator.steer_spread = w.steer_spread  # as engine/boot.py
        self.publisher = SessionPublisher(w.layout, w.buf, dict(w.slot_of), index, w.secrets)
        self.mesh = w.layout.mesh(w.buf)
        self.held: list[tuple[bytes, int]] = []
        self.forwarding = True
        self.placement = ShardPlacement(self.device, self.publisher, w.layout, w.buf, index,
                                        dict(w.specs), self.push)  # fmt: skip
        self.device.forward = self.forward
        self.placement.refresh()
        self.placement.reconcile(w.now, w.wall)

    def push(self, dst: int, data: bytes | memoryview, kind: int) -> bool:
        if dst == self.index:
            self.held.append((bytes(data), kind))
            return True
        return self.mesh.ring(self.index, dst).push(data, kind)

    def forward(self, owner: int, msg: memoryview, n: int, src: Any) -> None:
        if self.forwarding:
            self.push(owner, pack_transport(msg[:n], src), HandoffKind.TRANSPORT)

    def receive(self, data: bytes) -> int:
        """One transport datagram off the wire or a ring: the result of receive_transport."""
        w = self.world
        out = memoryview(bytearray(2048))
        res = self.device.receive_transport(memoryview(data), len(data), REMOTE_ADDR, out,
                                            w.now, w.wall)  # fmt: skip
        if res > 0:
            w.accepted(data, self.index)
        self.flush_events()
        return res

    def flush_events(self) -> None:
        """What Worker._on_event does: publish the peer when its sessions change."""
        dev = self.device
        events, dev.events[:] = dev.events[:], []
        dev.outbox.clear()
        for peer, event in events:
            if event in (PeerEvent.SESSION_DERIVED, PeerEvent.HANDSHAKE_COMPLETE,
                         PeerEvent.KEYS_ZEROED):  # fmt: skip
                self.publisher.publish(peer)

    def drain(self) -> None:
        """Everything on our incoming rings, in order; then what we held, again."""
        w = self.world
        for src in range(w.workers):
            if src == self.index:
                continue
            ring = self.mesh.ring(src, self.index)
            buf = bytearray(ring.slot_size)
            while True:
                n = ring.pop_into(buf)
                if n < 0:
                    break
                self._record(ring.last_kind, bytes(buf[:n]))
        held, self.held = self.held, []
        for data, kind in held:
            self._record(kind, data)

    def _record(self, kind: int, data: bytes) -> None:
        w = self.world
        if kind == HandoffKind.RELEASE:
            self.placement.on_release(data, w.now, w.wall)
        elif kind == HandoffKind.TRANSPORT:
            msg, _addr = unpack_transport(data)
            peer = self.device.remote.get(w.remote_key)
            if peer is not None and peer.owner == self.index:
                self.held.append((data, kind))  # ours to be: wait for the record
                return
            self.forwarding = False
            try:
                self.receive(bytes(msg))
            finally:
                self.forwarding = True

    def tick(self) -> None:
        self.placement.on_tick(self.world.now, self.world.wall)

    def nudge(self) -> None:
        if self.placement.refresh():
            self.placement.reconcile(self.world.now, self.world.wall)


class World:
    def __init__(self, workers: int = 3) -> None:
        self.workers = workers
        self.steer_spread = False  # the gateway runs with receive steering (--spread on)
        self.now, self.wall = 1000.0, 1.7e9
        self.layout = Layout(workers, 8)
        self.buf = bytearray(self.layout.total_size)
        self.secrets = SecretArea(8, bytearray(SecretArea.size_for(8)))  # keys: not in the region
        self.gw_private = generate_private_key(os.urandom(32))
        remote_private = generate_private_key(os.urandom(32))
        self.remote_key = public_key(remote_private)
        self.slot_of = {self.remote_key: 0}
        self.specs = {
            self.remote_key: control.PeerSpec(public_key=self.remote_key,
                                              allowed_ips=["10.9.0.2/32"])  # fmt: skip
        }
        self.placer = Placer(Mode.COUNT, workers, self.layout, self.buf, clock=lambda: self.now,
                             wall_clock=lambda: self.wall)  # fmt: skip
        self.placer.start([self.remote_key], self.slot_of)
        self.w = [SimWorker(self, i) for i in range(workers)]
        self.remote = Device(remote_private, os.urandom, worker_id=0)
        self.rpeer = self.remote.add_peer(
            public_key(self.gw_private), allowed_ips=["10.0.0.1/32"], endpoint=GW_ADDR
        )
        self.sent: set[tuple[bytes, int]] = set()
        self.seen: set[bytes] = set()
        self.old: list[bytes] = []  # datagrams already on the wire (replays)
        self.handshakes = 0
        self.seq = 0

    # ------------------------------------------------------------------ helpers
    def owner(self) -> int:
        return self.placer.owner(self.remote_key)

    def holders(self) -> list[int]:
        return [w.index for w in self.w if self.remote_key in w.device.peers]

    def accepted(self, data: bytes, worker: int) -> None:
        assert data not in self.seen, f"worker {worker} accepted a datagram twice"
        self.seen.add(data)

    def handshake(self) -> None:
        """The remote initiates; the owner answers; one data packet confirms the session."""
        self.rpeer.send_initiation(self.now, self.wall)
        (_p, init), = self.remote.outbox
        self.remote.outbox.clear()
        owner = self.w[self.holders()[0]]
        res = owner.device.receive_handshake(init, REMOTE_ADDR, SOURCE, self.now, self.wall)
        assert res is None
        (_p, resp), = owner.device.outbox
        owner.device.outbox.clear()
        owner.flush_events()
        assert self.remote.receive_handshake(resp, GW_ADDR, SOURCE, self.now, self.wall) is None
        self.handshakes += 1
        assert self.remote_send() > 0

    def remote_datagram(self) -> bytes:
        """The remote seals a fresh packet (a plain WireGuard: counters in order)."""
        self.seq += 1
        pkt = ip_packet("10.9.0.2", "10.0.0.1", self.seq.to_bytes(8, "little"))
        out = memoryview(bytearray(2048))
        n = self.remote.send_packet(self.rpeer, memoryview(pkt), len(pkt) - 16, out,
                                    self.now, self.wall)  # fmt: skip
        assert n > 0
        return bytes(out[:n])

    def remote_send(self) -> int:
        """The remote seals a fresh packet; the network steers it by index; the result."""
        data = self.remote_datagram()
        self.old.append(data)
        return self.deliver(data)

    def deliver(self, data: bytes) -> int:
        return self.w[data[4]].receive(data)  # low byte of the receiver index

    def gateway_send(self) -> bool:
        """The current owner (if it holds the peer) seals a packet to the remote."""
        holders = self.holders()
        if not holders:
            return False
        dev = self.w[holders[0]].device
        peer = dev.peers[self.remote_key]
        kp = peer.current
        if kp is None:
            return False
        self.seq += 1
        pkt = ip_packet("10.0.0.1", "10.9.0.2", self.seq.to_bytes(8, "little"))
        out = memoryview(bytearray(2048))
        n = dev.send_packet(peer, memoryview(pkt), len(pkt) - 16, out, self.now, self.wall)
        assert n > 0
        self.w[holders[0]].flush_events()
        counter = struct.unpack_from("<Q", out, 8)[0]
        assert (kp.send_key, counter) not in self.sent, "a nonce was used twice"
        self.sent.add((kp.send_key, counter))
        res = self.remote.receive_transport(out, n, GW_ADDR, memoryview(bytearray(2048)),
                                            self.now, self.wall)  # fmt: skip
        assert res > 0, f"the remote refused our packet ({res})"
        return True

    def crash(self, i: int) -> None:
        """Worker i dies; its replacement boots from shared memory (what the slot says)."""
        self.w[i] = SimWorker(self, i)

    def settle(self, rounds: int = 4) -> None:
        for _ in range(rounds):
            for w in self.w:
                w.nudge()
                w.drain()
                w.tick()
