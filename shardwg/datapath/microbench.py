"""Syscall-free microbenchmark of the batch kernels, one core: packets per second.

`python -m shardwg.datapath.microbench` prints seal (and open, where present) for the native
kernel and the pure-Python reference side by side, alternating the two, median of repeats;
rates are per CPU-second of the benchmarking process, so a busy machine lengthens the run
rather than lowering the figure.
Seal: 1420-byte IP packets in batches of 64, either as TSO super-packets (two of 32 segments:
64 x 1380 bytes of data would exceed the 64 KiB an IP packet can carry) or as 64 single
packets; each batch is sealed into GSO runs with seal_run exactly as the worker does (no sends).
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

from shardwg.datapath import seal_ref
from shardwg.datapath.select import native_module
from shardwg.io.vnet import GSO_TCPV4, VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET

BATCH = 64
PACKET = 1420  # IP packet (= MTU), so each sealed datagram is 1452 bytes
MAX_GSO_BYTES = 65535 - 8 - 40


def _tcp_ip(payload: int, ident: int = 1) -> bytearray:
    """An IPv4/TCP packet with `payload` bytes of data (checksums need not be valid here)."""
    total = 40 + payload
    pkt = bytearray(total)
    struct.pack_into("!BBHHHBBH4s4s", pkt, 0, 0x45, 0, total, ident, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    struct.pack_into("!HHIIBBHHH", pkt, 20, 40000, 5201, 7, 1, 5 << 4, 0x18, 512, 0, 0)
    for i in range(40, total):
        pkt[i] = i & 0xFF
    return pkt


def seal_inputs(super_packet: bool) -> tuple[list[memoryview], list[int]]:
    """One batch of 64 segments: two 32-segment TSO super-packets, or 64 plain packets (all
    with vnet headers, as a TUN queue reads them)."""
    mss = PACKET - 40
    if super_packet:
        hdr = VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16)
        raw = hdr + _tcp_ip(mss * BATCH // 2)
        return [memoryview(bytearray(raw)) for _ in range(2)], [len(raw)] * 2
    raw = bytes(10) + _tcp_ip(mss)
    return [memoryview(bytearray(raw + bytes(64))) for _ in range(BATCH)], [len(raw)] * BATCH


def bench_seal(native: bool, super_packet: bool = True, seconds: float = 0.5) -> float:
    """Packets sealed per second by one core (seal_run calls only, as the worker makes them)."""
    mod: Any = native_module() if native else seal_ref
    if mod is None:
        return 0.0
    sealer = mod.Sealer(bytes(range(32)))
    run: Callable[..., Any] = mod.seal_run
    bufs, sizes = seal_inputs(super_packet)
    out = bytearray(1 << 17)
    end = len(bufs)
    counter = 0
    packets = 0
    # Rates are per CPU-second of this process (the box is shared: wall time would count
    # other processes' turns); the run stops after `seconds` of wall time.
    c0 = time.process_time()
    deadline = time.perf_counter() + seconds
    while True:
        pos = seg = 0
        while pos < end:
            _st, pos, seg, counter, count, _size, _used = run(
                sealer, bufs, sizes, pos, seg, end, True, PACKET, 1, counter, 1 << 63, out,
                64, MAX_GSO_BYTES,
            )  # fmt: skip
            packets += count
        if time.perf_counter() >= deadline:
            return packets / max(time.process_time() - c0, 1e-9)


def median_rates(fn: Callable[[bool], float], repeats: int) -> tuple[float, float]:
    """(native, python) medians, the two configurations alternating."""
    nat: list[float] = []
    py: list[float] = []
    for _ in range(repeats):
        nat.append(fn(True))
        py.append(fn(False))
    return statistics.median(nat), statistics.median(py)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args(argv)
    cases = (("seal, 2 x 32-segment super-packets", True), ("seal, 64 single packets", False))
    for label, sp in cases:

        def one(native: bool, sp: bool = sp) -> float:
            return bench_seal(native, sp, args.seconds)

        nat, py = median_rates(one, args.repeats)
        print(f"{label:40s} native {nat / 1e3:8.0f}k/s   python {py / 1e3:8.1f}k/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
