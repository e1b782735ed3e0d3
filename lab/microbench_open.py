"""Syscall-free microbenchmark of the inbound kernel: packets per CPU-second of `open_batch`.

Batches of 64 transport datagrams (one per receive, as a sender without GSO produces them)
carrying 1420-byte TCP segments of one flow, opened end to end: index lookup, replay,
ChaCha20-Poly1305, inner checks, checksum, coalescing into TUN writes (not written).
The datagrams are sealed before the clock starts; each repetition restores the session
state so the same counters are fresh again. The working set is a few batches (512 KiB by
default), cache-resident as in the gateway, where `recvmmsg` has just written each batch into
the one receive buffer the worker reuses (the seal benchmark likewise reuses its batch);
`--batches 200` (25 MiB) measures memory bandwidth instead: ~15-30 % fewer packets/s here.

    python -m lab.microbench_open [--batches 4] [--reps 5] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from typing import Any

from lab.ping import checksum
from shardwg.datapath import select
from shardwg.datapath.openstate import OpenState, batch_arrays
from shardwg.proto import crypto
from shardwg.proto.device import Device
from shardwg.proto.keypair import Keypair

PACKET = 1420
BATCH = 64
STRIDE = 2048


def _ipv4_tcp(seq: int, payload: bytes) -> bytes:
    """10.200.0.1:40000 -> 10.201.0.9:5201, ACK, valid checksums."""
    src, dst = bytes([10, 200, 0, 1]), bytes([10, 201, 0, 9])
    th = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1000, 5 << 4, 0x10, 512, 0, 0)
    total = 20 + len(th) + len(payload)
    c = checksum(src + dst + struct.pack("!BBH", 0, 6, len(th) + len(payload)) + th + payload)
    th = th[:16] + struct.pack("!H", c) + th[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + th + payload


class Bench:
    """One device with one session, and pre-sealed batches for it."""

    def __init__(self, impl: select.Impl, batches: int) -> None:
        self.impl = impl
        key = crypto.generate_private_key(bytes(range(32)))
        peer_key = crypto.public_key(crypto.generate_private_key(bytes(range(1, 33))))
        self.device = Device(key, lambda n: bytes(n), worker_id=0)
        peer = self.device.add_peer(peer_key, allowed_ips=["10.200.0.0/16"])
        send_key, recv_key = bytes(range(32)), bytes(range(32, 64))
        kp = Keypair(send_key, recv_key, 0x1234_5600, 0xABCD, False, time.monotonic())
        kp.peer = peer
        peer.current = kp
        self.device.table.restore(kp)
        self.state = OpenState(impl.new_keys())
        self.state.sync(self.device)
        self.initial = bytes(self.state.sessions)
        aead = crypto.AEAD(recv_key)
        payload = bytes(i & 0xFF for i in range(PACKET - 40))
        self.data: list[bytearray] = []
        counter = 0
        for _ in range(batches):
            buf = bytearray(STRIDE * BATCH)
            for i in range(BATCH):
                pkt = _ipv4_tcp(1 + counter * len(payload), payload)
                pkt += bytes(-len(pkt) % 16)
                nonce = bytes(4) + counter.to_bytes(8, "little")
                dg = struct.pack("<IIQ", 4, kp.local_index, counter) + aead.encrypt(
                    nonce, pkt, None
                )
                buf[i * STRIDE : i * STRIDE + len(dg)] = dg
                counter += 1
            self.data.append(buf)
        self.dg_len = len(dg)
        self.arrays = batch_arrays(STRIDE * BATCH)

    def run_once(self) -> float:
        """Packets per CPU-second of this thread over every pre-sealed batch, from a restored
        state (CPU time, not wall time: on a shared machine other processes' share of the
        core would otherwise count against us)."""
        st, a = self.state, self.arrays
        st.sessions[:] = self.initial
        lengths, segs = [self.dg_len] * BATCH, [self.dg_len] * BATCH
        fn, now = self.impl.open_batch, time.monotonic()
        t0 = time.thread_time()
        for buf in self.data:
            fn(st.keys, st.sessions, st.index, st.allowed, buf, STRIDE, lengths, segs, BATCH,
               a["dec"], a["out"], a["spans"], a["touched"], a["handshakes"], a["counters"],
               now, False, False)  # fmt: skip
        elapsed = time.thread_time() - t0
        drops = memoryview(a["counters"]).cast("Q")
        assert sum(drops[4:]) == 0, "the benchmark's packets must all be accepted"
        return len(self.data) * BATCH / elapsed


HOT_BATCHES = 4  # 4 x 64 x 2 KiB: the size of a worker's receive buffer, in L2 here


def rate_for(bench: Bench, seconds: float) -> float:
    """Packets per CPU-second over repeated passes for about `seconds` of CPU time."""
    packets, cpu = 0, 0.0
    for _ in range(1 << 20):  # bounded
        rate = bench.run_once()
        n = len(bench.data) * BATCH
        packets += n
        cpu += n / rate
        if cpu >= seconds:
            break
    return packets / cpu


def open_packets_per_second(impl: str, batches: int = HOT_BATCHES, reps: int = 5,
                            seconds: float = 0.3) -> dict[str, Any]:  # fmt: skip
    """Median packets/s of open for impl 'native' or 'python' (and every repetition)."""
    chosen = select.choose("1") if impl == "native" else select.python_impl()
    bench = Bench(chosen, batches)
    samples = [rate_for(bench, seconds) for _ in range(reps)]
    return {"impl": select.describe(chosen), "packets_per_second": statistics.median(samples),
            "samples": samples, "packet_bytes": PACKET, "batch": BATCH}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=HOT_BATCHES)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3, help="CPU seconds per repetition")
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    for impl in ("native", "python", "native", "python"):  # alternating
        r = open_packets_per_second(impl, args.batches, args.reps, args.seconds)
        results.setdefault(impl, []).extend(r["samples"])
        print(f"{impl:7s} {r['packets_per_second']:>12,.0f} packets/s  ({r['impl']})")
    nat = statistics.median(results["native"])
    py = statistics.median(results["python"])
    print(f"open, {PACKET}-byte packets, batches of {BATCH}: native {nat:,.0f}/s, "
          f"python {py:,.0f}/s, ratio {nat / py:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
