"""Classic BPF for SO_ATTACH_REUSEPORT_CBPF: steer each datagram to its owner's socket.

Why: a session's receiver index carries the owning worker's id in its low byte
(proto/index.py). If the kernel delivers a datagram straight to the owner's
socket, no worker ever hands transport packets to another.

Kernel semantics (net/core/sock_reuseport.c, `run_bpf_filter` and
`reuseport_select_sock`): for UDP the program sees the packet from the first byte
of the UDP payload; its return value indexes the group's socket array, which is
in join (bind) order. A value >= the number of sockets, or a failed run, falls
back to `reuseport_select_sock_by_hash` (the usual 4-tuple hash, so one endpoint
keeps landing on one socket). The program is per group: attaching it to any
member steers the whole group.

The program:
- length < 32 (no valid WireGuard message is shorter) -> hash. Needed, not
  cosmetic: a classic BPF load past the end aborts the program with return 0,
  which would send every runt datagram to socket 0.
- the first word must be exactly type || 0 0 0 (reserved bytes zero); type 4
  (transport) or 3 (cookie reply): worker id = byte at offset 4; type 2
  (response): byte at offset 8. Type 1 (initiation, carries no index of ours) or
  anything else -> hash: any worker can check mac1 and hand off.
- worker id >= N -> hash, not id % N. We never allocate such ids, so the datagram
  is forged or stale (say, after a restart with fewer workers) and every worker
  drops it as UNKNOWN_INDEX; hashing spreads that junk over all workers instead
  of piling it onto one, and the check keeps the program correct even if the
  group holds extra sockets.

Spread peers (proto/spread.py, `program(workers, spread=True)`): a transport message
whose receiver index has bit 8 set (SPREAD_INDEX_BIT, the low bit of payload byte 5) is a
spread peer's, and goes to worker (counter >> 10) mod N, the counter's bits 10..33 read
from payload bytes 9..12 (little-endian): the block of SPREAD_BLOCK = 1024 counters it
belongs to, modulo N, as proto.spread.receiver_worker says for counters below 2^34 (a
session never gets near; beyond, the choice is still a function of the datagram, so one
counter always reaches one worker). With spread on, the workers allocate every index
with that bit set exactly for spread peers (proto/index.py).

Slots move when a socket closes: the kernel moves the last socket of the array
into the closed one's slot (observed in tests/test_steering.py: with sockets
0..3, closing #1 sends id 1 to old #3, and id 3, now >= num_socks, to the hash).
So the supervisor creates the N sockets in order and keeps them all open for its
lifetime; a worker's death then leaves its socket, and slot, in place, and its
datagrams queue in the receive buffer for the replacement. The sockets must not
be connect()ed: the hash fallback skips connected members.
"""

from __future__ import annotations

import socket
from typing import Any

from shardwg.io import cbpf
from shardwg.io.cbpf import (
    BPF_A,
    BPF_ABS,
    BPF_ALU,
    BPF_B,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JMP,
    BPF_JSET,
    BPF_K,
    BPF_LD,
    BPF_LEN,
    BPF_LSH,
    BPF_MISC,
    BPF_MOD,
    BPF_OR,
    BPF_RET,
    BPF_RSH,
    BPF_TAX,
    BPF_W,
    BPF_X,
    Insn,
)
from shardwg.proto.constants import (
    RESPONSE_OFFSET_RECEIVER,
    TRANSPORT_MIN_SIZE,
    TRANSPORT_OFFSET_RECEIVER,
    MessageType,
)
from shardwg.proto.index import MAX_WORKERS, SPREAD_INDEX_BIT
from shardwg.proto.spread import SPREAD_SHIFT

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
FALLBACK = 0xFFFFFFFF  # always >= num_socks: "let the kernel hash it"


def _header_word(t: MessageType) -> int:
    """The first 4 payload bytes (type, 0, 0, 0) as classic BPF's big-endian word load sees them."""
    return int(t) << 24


def program(workers: int, spread: bool = False) -> list[Insn]:
    """The instructions as (code, jt, jf, k); jumps are relative to the next instruction.
    With `spread`, a transport message of a spread peer takes the counter branch (module
    docstring)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1..{MAX_WORKERS}, got {workers}")
    ld_b = BPF_LD | BPF_B | BPF_ABS
    spread_check: list[tuple[Any, ...]] = []
    spread_branch: list[tuple[Any, ...]] = []
    if spread:
        spread_check = [
            ("label", "transport"),
            (ld_b, 0, 0, TRANSPORT_OFFSET_RECEIVER + 1),  # A = index bits 8..15
            (BPF_JMP | BPF_JSET | BPF_K, "spread", 0, SPREAD_INDEX_BIT >> 8),
        ]
        spread_branch = [("label", "spread"), (ld_b, 0, 0, 12)]  # A = counter byte 4
        for byte in (11, 10, 9):  # A = (counter >> 8) mod 2^32, one byte at a time
            spread_branch += [
                (BPF_ALU | BPF_LSH | BPF_K, 0, 0, 8),
                (BPF_MISC | BPF_TAX, 0, 0, 0),
                (ld_b, 0, 0, byte),
                (BPF_ALU | BPF_OR | BPF_X, 0, 0, 0),
            ]
        spread_branch += [
            (BPF_ALU | BPF_RSH | BPF_K, 0, 0, SPREAD_SHIFT - 8),
            (BPF_ALU | BPF_MOD | BPF_K, 0, 0, workers),
            (BPF_RET | BPF_A, 0, 0, 0),
        ]
    transport = "transport" if spread else "off4"
    return _assemble([
        (BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),  # A = payload length
        (BPF_JMP | BPF_JGE | BPF_K, 0, "fb", TRANSPORT_MIN_SIZE),
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),  # A = type || reserved
        (BPF_JMP | BPF_JEQ | BPF_K, transport, 0, _header_word(MessageType.TRANSPORT)),
        (BPF_JMP | BPF_JEQ | BPF_K, "off4", 0, _header_word(MessageType.COOKIE_REPLY)),
        (BPF_JMP | BPF_JEQ | BPF_K, "off8", "fb", _header_word(MessageType.RESPONSE)),
        *spread_check,
        ("label", "off4"),
        (ld_b, 0, 0, TRANSPORT_OFFSET_RECEIVER),
        (BPF_JMP | BPF_JA, 0, 0, "check"),
        ("label", "off8"),
        (ld_b, 0, 0, RESPONSE_OFFSET_RECEIVER),
        ("label", "check"),
        (BPF_JMP | BPF_JGE | BPF_K, "fb", 0, workers),
        (BPF_RET | BPF_A, 0, 0, 0),  # socket #worker id
        ("label", "fb"),
        (BPF_RET | BPF_K, 0, 0, FALLBACK),
        *spread_branch,
    ])  # fmt: skip


def _assemble(lines: list[tuple[Any, ...]]) -> list[Insn]:
    """Resolve labels: each line is ("label", name) or (code, jt, jf, k) where jt, jf
    (conditional jumps) or k (BPF_JA) may be a label name."""
    at: dict[str, int] = {}
    n = 0
    for line in lines:
        if line[0] == "label":
            at[line[1]] = n
        else:
            n += 1
    out: list[Insn] = []
    for line in lines:
        if line[0] == "label":
            continue
        code, jt, jf, k = line
        here = len(out) + 1
        if code == BPF_JMP | BPF_JA and isinstance(k, str):
            k = at[k] - here
        jt = at[jt] - here if isinstance(jt, str) else jt
        jf = at[jf] - here if isinstance(jf, str) else jf
        out.append((code, jt, jf, k))
    return out


def build_program(workers: int, spread: bool = False) -> bytes:
    """The packed `struct sock_filter` array for a group of `workers` sockets."""
    return cbpf.pack(program(workers, spread))


def attach(sock: socket.socket, workers: int, spread: bool = False) -> None:
    """Attach the steering program to the reuseport group `sock` (bound, SO_REUSEPORT) is in."""
    cbpf.attach(sock, SO_ATTACH_REUSEPORT_CBPF, program(workers, spread))


def detach(sock: socket.socket) -> None:
    """Remove the group's program (back to plain hashing)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
