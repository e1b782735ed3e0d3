"""A socket filter that sheds cookie-less initiations in the kernel while under load.

Why: see proto/admission.py. A flood datagram dropped by a socket filter costs the
kernel well under a microsecond in softirq and never takes receive-buffer room from
the honest peers' transport datagrams; one read by Python costs ~6 us.

Kernel semantics (SO_ATTACH_FILTER on a UDP socket, run by `sk_filter_trim_cap` in
`udp_queue_rcv_one_skb`): the program sees the datagram from the first byte of the
UDP header, so the WireGuard message starts at offset 8 and the length includes the
8-byte header (tests/test_initiation_filter.py checks both on a live socket). A
return of 0 drops the datagram and counts it in the socket's drop counter, which
SO_MEMINFO reads back. Classic BPF has no maps, so the share is baked into the
program as a threshold on the kernel's per-packet random number; a new share means
a new program (setsockopt replaces the old one atomically). The filter belongs to
the socket, not the process: a replacement worker inherits whatever its predecessor
attached, so a worker clears it when it starts.

The program passes everything except a type-1 message of exactly the initiation's
size whose mac2 is all zero; of those it passes the ones from known peer endpoints
(source address and port; the IP header is reached through SKF_NET_OFF) and a random
1 in 2**shift of the rest.

Merged receives: a worker's socket has UDP_GRO on, so the kernel may hand it a burst
of datagrams from one source as one skb (GRO on the receiving device merges equal
sized datagrams of a flow, up to 64; a sender's UDP_SEGMENT buffer, up to 128, can
cross a veth unsplit), and a filter runs once per skb. Such an skb's length is not
an initiation's, so a merged flood of cookie-less initiations passed whole
(tests/test_initiation_gro.py). Its datagrams sit back to back after one UDP
header, all of one size S but the last, which may be shorter. The only honest skb
longer than an initiation starts with a transport message (type 4; a handshake
message never comes in bursts), and an honest transport datagram is never 148 bytes
(32 + a multiple of 16, or 32 + MTU). So an skb longer than an initiation is a
candidate, shed like a cookie-less initiation, if it does not start with a transport
message, or if its last 148 bytes start with an initiation's type word (a 148-byte
last datagram; an honest skb matches by chance with odds 2**-32). What is left, a
burst of S = 148 datagrams behind a transport-typed first one, reaches the worker,
which drops any receive of merged 148-byte datagrams whole, in one step
(engine/inbound.py). Scanning every 148-byte place in the kernel would need ~800
instructions, more option memory than older kernels allow a socket (20 KiB); turning
UDP_GRO off under load would cost the honest traffic its batching exactly then.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence

from shardwg.io import cbpf
from shardwg.io.cbpf import (
    BPF_ABS,
    BPF_ALU,
    BPF_H,
    BPF_IND,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_LEN,
    BPF_MEM,
    BPF_MISC,
    BPF_RET,
    BPF_ST,
    BPF_SUB,
    BPF_TAX,
    BPF_W,
    SKF_AD_OFF,
    SKF_AD_RANDOM,
    SKF_NET_OFF,
    Insn,
)
from shardwg.proto.admission import MAX_SHIFT
from shardwg.proto.constants import INITIATION_SIZE, MessageType

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_MEMINFO = 55
SK_MEMINFO_VARS = 9  # the u32 array SO_MEMINFO fills (include/uapi/linux/sock_diag.h)
SK_MEMINFO_DROPS = 8
UDP_HEADER = 8
RANDOM_U32 = (SKF_AD_OFF + SKF_AD_RANDOM) & 0xFFFFFFFF  # a fresh random u32 per packet
PASS = 0xFFFFFFFF  # "keep up to this many bytes": all of it
DROP = 0
MAC2_OFFSET = UDP_HEADER + INITIATION_SIZE - 16
SRC_V4 = SKF_NET_OFF + 12
SRC_V6 = SKF_NET_OFF + 8
MAX_ENDPOINTS = 256  # known sources per program: 256 x 11 instructions fit the 4096 limit
INITIATION_WORD = int(MessageType.INITIATION) << 24  # type || 3 reserved zero bytes
TRANSPORT_WORD = int(MessageType.TRANSPORT) << 24
_MEMINFO = struct.Struct(f"={SK_MEMINFO_VARS}I")


def _pass_unless(cond_jeq_k: int) -> list[Insn]:
    """`if A != k: return PASS` (classic BPF jumps are 8-bit, so every PASS is local)."""
    return [(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, cond_jeq_k), (BPF_RET | BPF_K, 0, 0, PASS)]


def _endpoint_check(endpoint: bytes) -> list[Insn]:
    """`if source == endpoint: return PASS`; the source port was stored in M[0]."""
    ip, port = endpoint[:-2], int.from_bytes(endpoint[-2:], "big")
    words = [int.from_bytes(ip[i : i + 4], "big") for i in range(0, len(ip), 4)]
    net = SRC_V4 if len(ip) == 4 else SRC_V6
    body: list[Insn] = []
    for i, word in enumerate(words):
        body.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, (net + 4 * i) & 0xFFFFFFFF))
        body.append((BPF_JMP | BPF_JEQ | BPF_K, 0, 0, word))  # jf patched below
    insns = [(BPF_LD | BPF_MEM, 0, 0, 0), (BPF_JMP | BPF_JEQ | BPF_K, 0, 0, port), *body]
    insns.append((BPF_RET | BPF_K, 0, 0, PASS))
    # every failed comparison jumps past the final PASS
    last = len(insns) - 1
    return [
        (code, jt, last - i, k) if code == BPF_JMP | BPF_JEQ | BPF_K else (code, jt, jf, k)
        for i, (code, jt, jf, k) in enumerate(insns)
    ]


def program(shift: int, endpoints: Sequence[bytes] = ()) -> list[Insn]:
    """The instructions as (code, jt, jf, k); jumps are relative to the next instruction.

    `endpoints` (packed source addresses, ip || port, all of one family) are known peers:
    their cookie-less initiations always pass, so a peer we know gets its cookie reply at
    its first try however large the flood. At most MAX_ENDPOINTS are used.
    """
    if not 1 <= shift <= MAX_SHIFT:
        raise ValueError(f"shift must be 1..{MAX_SHIFT}, got {shift}")
    merged = _merged_check()
    single: list[Insn] = [(BPF_LD | BPF_W | BPF_ABS, 0, 0, UDP_HEADER)]  # A = type || reserved
    single += _pass_unless(INITIATION_WORD)
    for word in range(4):  # any non-zero mac2 word: pass (a retry answering our cookie)
        single.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, MAC2_OFFSET + 4 * word))
        single += _pass_unless(0)
    single.append((BPF_JMP | BPF_JA, 0, 0, len(merged)))  # a candidate: past the merged check
    insns: list[Insn] = [
        (BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),  # A = UDP length
        (BPF_JMP | BPF_JEQ | BPF_K, 1, 0, UDP_HEADER + INITIATION_SIZE),
        (BPF_JMP | BPF_JA, 0, 0, len(single)),  # not one initiation's length
        *single,
        *merged,
    ]
    if endpoints:
        insns.append((BPF_LD | BPF_H | BPF_ABS, 0, 0, 0))  # A = UDP source port
        insns.append((BPF_ST, 0, 0, 0))  # M[0] = A
        for endpoint in list(endpoints)[:MAX_ENDPOINTS]:
            if len(endpoint) not in (6, 18):
                raise ValueError(f"endpoint must be ip || port (6 or 18 bytes), got {endpoint!r}")
            insns += _endpoint_check(endpoint)
    insns += [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, RANDOM_U32),  # A = random u32
        (BPF_JMP | BPF_JGE | BPF_K, 0, 1, 1 << (32 - shift)),  # A < 2**32 >> shift passes
        (BPF_RET | BPF_K, 0, 0, DROP),
        (BPF_RET | BPF_K, 0, 0, PASS),
    ]
    return insns


def _merged_check() -> list[Insn]:
    """For an skb longer than one initiation (A holds its length): PASS if it starts with a
    transport message and does not end with a 148-byte initiation; fall through past the
    end (a candidate) otherwise. Shorter ones PASS."""
    return [
        (BPF_JMP | BPF_JGE | BPF_K, 1, 0, UDP_HEADER + INITIATION_SIZE),
        (BPF_RET | BPF_K, 0, 0, PASS),  # shorter than an initiation: not one
        (BPF_ALU | BPF_SUB | BPF_K, 0, 0, INITIATION_SIZE),
        (BPF_MISC | BPF_TAX, 0, 0, 0),  # X = where a 148-byte last datagram would start
        (BPF_LD | BPF_W | BPF_IND, 0, 0, 0),
        (BPF_JMP | BPF_JEQ | BPF_K, 3, 0, INITIATION_WORD),  # a candidate
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, UDP_HEADER),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 1, TRANSPORT_WORD),  # not transport: a candidate
        (BPF_RET | BPF_K, 0, 0, PASS),
    ]


def endpoints_for(sock: socket.socket, endpoints: Sequence[bytes]) -> list[bytes]:
    """The endpoints of the socket's family (ip || port: 6 bytes for IPv4, 18 for IPv6)."""
    size = 6 if sock.family == socket.AF_INET else 18
    return [e for e in endpoints if len(e) == size]


def set_shift(sock: socket.socket, shift: int, endpoints: Sequence[bytes] = ()) -> None:
    """Admit 1 / 2**shift of cookie-less initiations on `sock`, all of them from `endpoints`
    of the socket's family; shift 0 removes the filter."""
    _set(sock, shift, endpoints_for(sock, endpoints))


def _set(sock: socket.socket, shift: int, mine: list[bytes]) -> None:
    if shift == 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError as e:
            if e.errno != errno.ENOENT:  # none attached: already admitting everything
                raise
        return
    cbpf.attach(sock, SO_ATTACH_FILTER, program(shift, mine))


def set_shift_fitting(sock: socket.socket, shift: int, endpoints: Sequence[bytes] = ()) -> int:
    """set_shift, with as many of `endpoints` (in order) as the kernel takes: a filter is
    charged to the socket's option memory (net.core.optmem_max, 20 KiB on older kernels, per
    network namespace), which a few dozen IPv6 endpoints can exceed. Halves the list on
    ENOMEM down to none. Returns how many endpoints made it in."""
    mine = endpoints_for(sock, endpoints)[:MAX_ENDPOINTS]
    while True:
        try:
            _set(sock, shift, mine)
            return len(mine)
        except OSError as e:
            if e.errno != errno.ENOMEM or not mine:
                raise
            mine = mine[: len(mine) // 2]


def kernel_drops(sock: socket.socket) -> int:
    """The socket's drop counter: receive buffer overflows plus filter drops (0 if unknown)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return 0
    if len(raw) < _MEMINFO.size:
        return 0
    return int(_MEMINFO.unpack(raw)[SK_MEMINFO_DROPS])
