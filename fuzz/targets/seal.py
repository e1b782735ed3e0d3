"""Fuzz target for the native seal kernel: `shardwg.datapath._native.seal_run` on any bytes.

What the TUN hands the seal kernel is local, but a super-packet's contents come from any
process that can send through the tunnel, and its vnet header from the kernel's view of
them: so every field is treated as hostile. One input = a few packets and the call's knobs
(seal or plain, vnet header or not, MTU, run limits, counter near the reservation). The
target drives the native kernel and the pure-Python reference exactly as the worker does
(resume, publish a new block on LIMIT) and requires: no crash (build with
SHARDWG_NATIVE_SANITIZE=1 to turn memory errors into aborts), identical results and bytes
after every call, no counter at or past the limit, and counters that never repeat.

Without the extension the target still holds the reference to the last two properties.
Under the sanitizers (a build in a scratch copy of the tree): `scripts/native_sanitize`,
with FUZZ_SECONDS=60 for a timed campaign.
"""

from __future__ import annotations

import struct
from typing import Any

from fuzz.targets.world import FuzzFailure
from shardwg.datapath import seal_ref, select

KEY = bytes(range(7, 39))
MTUS = (0, 1, 576, 1280, 1420, 1500, 9000, 65535)
COUNTS = (1, 2, 3, 64)
BYTES = (0, 60, 1500, 20000, 65535 - 48)
OUTS = (0, 64, 2000, 1 << 17)
COUNTERS = (0, 1, (1 << 64) - (1 << 13) - 70, (1 << 63))
MAX_CALLS = 20_000  # >= 2 per segment: one LIMIT and one seal at worst
NATIVE = select.native_module()  # None: not built


def decode(data: bytes) -> tuple[list[bytes], dict[str, Any]]:
    """Knobs from the first 8 bytes, then packets as (2-byte little-endian length, bytes)."""
    head = data[:8].ljust(8, b"\0")
    knobs = {
        "seal": not head[0] & 1,
        "vnet": not head[0] & 2,
        "mtu": MTUS[head[1] % len(MTUS)],
        "max_count": COUNTS[head[2] % len(COUNTS)],
        "max_bytes": BYTES[head[3] % len(BYTES)],
        "gap": head[4] % 80,
        "counter": COUNTERS[head[5] % len(COUNTERS)] + head[7],
        "out": OUTS[head[6] % len(OUTS)],
        "block": 1 + head[7] % 40,
    }
    raws, rest = [], data[8:]
    while rest and len(raws) < 6:
        n = int.from_bytes(rest[:2].ljust(2, b"\0"), "little")
        raws.append(rest[2 : 2 + n])
        rest = rest[2 + n :]
    return raws, knobs


def encode(raws: list[bytes], head: bytes = bytes(8)) -> bytes:
    return head + b"".join(len(r).to_bytes(2, "little") + r for r in raws)


def _drive(mod: Any, raws: list[bytes], k: dict[str, Any]) -> list[tuple[Any, bytes]]:
    sealer = mod.Sealer(KEY) if k["seal"] else None
    bufs = [memoryview(bytearray(r)) for r in raws]
    sizes = [len(r) for r in raws]
    out = bytearray(k["out"])
    counter, limit = k["counter"], k["counter"] + k["gap"]
    pos = seg = 0
    calls: list[tuple[Any, bytes]] = []
    for _ in range(MAX_CALLS):
        if pos >= len(bufs):
            return calls
        start_limit = limit
        res = mod.seal_run(sealer, bufs, sizes, pos, seg, len(bufs), k["vnet"], k["mtu"], 0x0102,
                           counter, limit, out, k["max_count"], k["max_bytes"])  # fmt: skip
        status, pos, seg, counter, count, size, used = res
        data = bytes(out[:used])
        if k["seal"]:
            for off in range(0, used, size or 1):
                c = struct.unpack_from("<Q", data, off + 8)[0]
                if c >= start_limit:
                    raise FuzzFailure(f"sealed counter {c} at or past the limit {start_limit}")
        calls.append((res, data))
        if status == seal_ref.LIMIT:
            limit = counter + k["block"]
    raise FuzzFailure("seal_run made no progress")


def seal(data: bytes, native: Any = None) -> None:
    """The target: never crash, agree with the reference, never touch a counter twice."""
    if native is None:
        native = NATIVE
    raws, knobs = decode(data)
    try:
        ref = _drive(seal_ref, raws, knobs)
    except ValueError:
        ref = None
    if native is not None:
        try:
            got = _drive(native, raws, knobs)
        except ValueError:
            got = None
        if got != ref:
            raise FuzzFailure(f"native and reference differ on {data.hex()}")
    if ref and knobs["seal"]:
        counters = [struct.unpack_from("<Q", d, off + 8)[0] for (r, d) in ref
                    for off in range(0, len(d), r[5] or 1)]  # fmt: skip
        if len(set(counters)) != len(counters):
            raise FuzzFailure("a counter was used twice")


# --------------------------------------------------------------------------- seeds
def _tcp(v6: bool, payload: int, mss: int, flags: int = 0x18, opts: bytes = b"") -> bytes:
    th = struct.pack("!HHIIBBHHH", 1, 2, 0xFFFFFF00, 9, (5 + len(opts) // 4) << 4, flags, 9, 0,
                     0) + opts  # fmt: skip
    body = th + bytes(i & 0xFF for i in range(payload))
    if v6:
        ip = struct.pack("!IHBB", 0x60000000, len(body), 6, 64) + bytes(range(32))
        gso, cs = 4, 40
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 7, 0x4000, 64, 6, 0,
                         b"\x0a\0\0\1", b"\x0a\0\0\2")  # fmt: skip
        gso, cs = 1, 20
    return struct.pack("<BBHHHH", 1, gso, cs + len(th), mss, cs, 16) + ip + body


def _udp(payload: int, size: int) -> bytes:
    body = struct.pack("!HHHH", 1, 2, 8 + payload, 0) + bytes(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 7, 0, 64, 17, 0,
                     b"\x0a\0\0\1", b"\x0a\0\0\2")  # fmt: skip
    return struct.pack("<BBHHHH", 1, 5, 28, size, 20, 6) + ip + body


def seeds() -> dict[str, bytes]:
    """Named seed inputs (fuzz/corpus/seal)."""
    good = [_tcp(False, 5000, 1380), _tcp(True, 3000, 1000, 0x99, bytes(12)), _udp(2000, 700),
            bytes(10) + _udp(100, 0)[10:]]  # fmt: skip
    return {
        "good_sealed": encode(good),
        "good_near_limit": encode(good, bytes([0, 4, 1, 2, 3, 2, 3, 5])),
        "good_plain_tiny_mtu": encode(good, bytes([1, 1, 2, 1, 0, 0, 1, 0])),
        "no_vnet_header": encode([g[10:] for g in good], b"\2"),
        "mss_1_and_runts": encode([_tcp(False, 600, 1), b"", b"\0" * 30],
                                  bytes([0, 3, 3, 4, 70, 1, 3, 1])),
    }  # fmt: skip
