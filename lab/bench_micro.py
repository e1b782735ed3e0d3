"""The syscall-free microbenchmark: how many packets one core opens and seals per second.

No sockets, no TUN, no namespaces: two in-memory protocol devices hold a real session (a full
Noise handshake between them), then the timed loops push 1420-byte IP packets (the tunnel MTU)
through the data path in batches of 64:

- seal: inner packet -> padding, nonce, ChaCha20-Poly1305 -> transport message (end A);
- open: transport message -> index lookup, replay window, decrypt, inner header and allowed-IPs
  checks -> inner packet (end B), each message fresh (never a replay).

Paths: "python" is the per-packet pure-Python path the workers ran before the batch kernel
(Device.send_packet and Device.receive_transport; one call per packet, so a "batch" is a loop of
64 calls); "native" and "python-batch" are shardwg.datapath's batch kernel (C) and its
pure-Python reference, timed by the kernels' own microbenchmarks (seal:
shardwg.datapath.microbench, open: lab.microbench_open). "aead" is the floor under any
per-packet Python path: the bare `cryptography` encrypt_into of the same packet, no protocol
work. Time is the thread's CPU time (one core, not disturbed by other work sharing the
machine): packets / CPU seconds.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from typing import Any

from lab import microbench_open
from shardwg.datapath import microbench, select
from shardwg.proto import crypto
from shardwg.proto.constants import MAX_DATAGRAM
from shardwg.proto.device import Device
from shardwg.proto.messages import MessageType, classify
from shardwg.proto.peer import Peer

Kernel = Callable[[bool], float]

PACKET = 1420
BATCH = 64
SRC, DST = "10.0.0.1", "10.0.0.2"
ADDR_A, ADDR_B = ("192.0.2.1", 51820), ("192.0.2.2", 51820)
NOW, WALL = 1000.0, 1_700_000_000.0


def ipv4_packet(size: int = PACKET, src: str = SRC, dst: str = DST) -> bytearray:
    """An IPv4/UDP packet of `size` bytes (checksums left zero: the path does not verify them
    on this route)."""
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000, 64, 17, 0,
                      bytes(int(x) for x in src.split(".")),
                      bytes(int(x) for x in dst.split(".")))  # fmt: skip
    udp = struct.pack(">HHHH", 40000, 5201, size - 20, 0)
    body = random.Random(size).randbytes(size - len(hdr) - len(udp))
    return bytearray(hdr + udp + body)


class Session:
    """Two devices after a real handshake: A (10.0.0.1) seals for B, B opens what A sealed."""

    def __init__(self, seed: int = 7) -> None:
        rng = random.Random(seed)
        key_a = crypto.generate_private_key(rng.randbytes(32))
        key_b = crypto.generate_private_key(rng.randbytes(32))
        self.a = Device(key_a, rng.randbytes, worker_id=0)
        self.b = Device(key_b, rng.randbytes, worker_id=1)
        self.peer_b: Peer = self.a.add_peer(crypto.public_key(key_b), allowed_ips=[f"{DST}/32"],
                                            endpoint=ADDR_B)  # fmt: skip
        self.b.add_peer(crypto.public_key(key_a), allowed_ips=[f"{SRC}/32"], endpoint=None)
        self.peer_b.send_initiation(NOW, WALL)
        self._pump()
        if self.peer_b.current is None:
            raise RuntimeError("microbenchmark: the in-memory handshake did not complete")

    def _pump(self) -> None:
        for _ in range(4):  # initiation, response: two hops suffice
            for frm, to, src in ((self.a, self.b, ADDR_A), (self.b, self.a, ADDR_B)):
                queued, frm.outbox[:] = list(frm.outbox), []
                for _peer, data in queued:
                    if classify(data) != MessageType.TRANSPORT:
                        packed = bytes(int(x) for x in src[0].split("."))
                        packed += src[1].to_bytes(2, "big")
                        to.receive_handshake(data, src, packed, NOW, WALL)

    def seal_batches(self, batches: int, size: int = PACKET) -> list[bytearray]:
        """Seal batches x BATCH packets with A; return the transport messages (untimed use)."""
        plain = bytearray(MAX_DATAGRAM)
        pkt = ipv4_packet(size)
        plain[:size] = pkt
        view, out = memoryview(plain), bytearray(MAX_DATAGRAM)
        msgs = []
        for _ in range(batches * BATCH):
            n = self.a.send_packet(self.peer_b, view, size, memoryview(out), NOW, WALL)
            if n <= 0:
                raise RuntimeError(f"microbenchmark: seal returned {n}")
            msgs.append(bytearray(out[:n]))
        return msgs


def python_seal(session: Session, batches: int, size: int = PACKET) -> float:
    """CPU seconds to seal batches x BATCH packets through Device.send_packet."""
    plain = bytearray(MAX_DATAGRAM)
    plain[:size] = ipv4_packet(size)
    view = memoryview(plain)
    outs = [memoryview(bytearray(MAX_DATAGRAM)) for _ in range(BATCH)]
    send, peer = session.a.send_packet, session.peer_b
    t0 = time.thread_time()
    for _ in range(batches):
        for out in outs:
            if send(peer, view, size, out, NOW, WALL) <= 0:
                raise RuntimeError("microbenchmark: seal failed")
    return time.thread_time() - t0


def python_open(session: Session, batches: int, size: int = PACKET) -> float:
    """CPU seconds to open batches x BATCH fresh messages through Device.receive_transport."""
    msgs = [memoryview(m) for m in session.seal_batches(batches, size)]
    outs = [memoryview(bytearray(MAX_DATAGRAM)) for _ in range(BATCH)]
    receive = session.b.receive_transport
    t0 = time.thread_time()
    i = 0
    for _ in range(batches):
        for out in outs:
            m = msgs[i]
            i += 1
            if receive(m, len(m), ADDR_A, out, NOW, WALL) != size:
                raise RuntimeError("microbenchmark: open failed")
    return time.thread_time() - t0


def aead_seal(batches: int, size: int = PACKET) -> float:
    """CPU seconds for the bare AEAD over the same packets: the floor of a per-packet path."""
    aead = crypto.AEAD(bytes(range(32)))
    plain = memoryview(ipv4_packet(size))
    out = memoryview(bytearray(size + 16))
    nonce = bytearray(12)
    t0 = time.thread_time()
    for i in range(batches * BATCH):
        struct.pack_into("<Q", nonce, 4, i)
        aead.encrypt_into(nonce, plain, None, out)
    return time.thread_time() - t0


# The batch kernels' own microbenchmarks:
# - seal: shardwg.datapath.microbench.bench_seal(native, super_packet, seconds) -> packets per
#   CPU-second of the process; "seal" is 64 single packets per batch, "seal_tso" two
#   32-segment TSO super-packets per batch (what a TUN with TSO hands the worker);
# - open: lab.microbench_open.rate_for(Bench(impl, batches), seconds) -> packets per
#   CPU-second of the thread; 64 datagrams per batch carrying 1420-byte TCP segments of one
#   flow, opened and coalesced, over a cache-resident working set like seal's.
SEAL_OPS = {"seal": False, "seal_tso": True}


def kernel_functions(
    seconds: float = 0.3, open_batches: int = microbench_open.HOT_BATCHES
) -> dict[str, Kernel]:
    """op -> f(native) -> packets per CPU-second, for the batch kernels' microbenchmarks
    (f(True) needs the extension: native_built())."""
    found: dict[str, Kernel] = {}
    for op, tso in SEAL_OPS.items():

        def seal_rate(native: bool, tso: bool = tso) -> float:
            return float(microbench.bench_seal(native, tso, seconds))

        found[op] = seal_rate

    def open_rate(native: bool) -> float:
        impl = select.choose("1") if native else select.python_impl()
        bench = microbench_open.Bench(impl, open_batches)
        return microbench_open.rate_for(bench, seconds)  # raises on any drop

    found["open"] = open_rate
    return found


def native_built() -> bool:
    return select.native_module() is not None


def run_once(batches: int) -> dict[str, dict[str, float]]:
    """One repetition of every path: {path: {"open_pps": .., "seal_pps": ..}}, paths
    alternating within it; a fresh session each time (counters start at zero).

    Paths: "native" and "python-batch" (the batch kernel and its pure-Python reference, through
    kernel_functions), "python" (the per-packet Device path the
    workers run without the kernel), "aead" (the bare AEAD call)."""
    n = batches * BATCH
    out: dict[str, dict[str, float]] = {}
    kernel = kernel_functions()
    native = native_built()
    python = Session()
    out["python"] = {"seal_pps": n / max(python_seal(python, batches), 1e-9)}
    for op, fn in kernel.items():
        if native:
            out.setdefault("native", {})[f"{op}_pps"] = fn(True)
        out.setdefault("python-batch", {})[f"{op}_pps"] = fn(False)
    out["python"]["open_pps"] = n / max(python_open(python, batches), 1e-9)
    out["aead"] = {"seal_pps": n / max(aead_seal(batches), 1e-9)}
    return out


def describe() -> dict[str, Any]:
    return {"packet_bytes": PACKET, "batch": BATCH, "native_built": native_built(),
            "kernel_ops": sorted(kernel_functions())}  # fmt: skip
