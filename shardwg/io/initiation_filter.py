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
size whose mac2 is all zero; of those it passes a random 1 in 2**shift.
"""

from __future__ import annotations

import errno
import socket
import struct

from shardwg.io import cbpf
from shardwg.io.cbpf import (
    BPF_ABS,
    BPF_JEQ,
    BPF_JGE,
    BPF_JMP,
    BPF_K,
    BPF_LD,
    BPF_LEN,
    BPF_RET,
    BPF_W,
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
SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_RANDOM: a fresh u32 per packet
PASS = 0xFFFFFFFF  # "keep up to this many bytes": all of it
DROP = 0
MAC2_OFFSET = UDP_HEADER + INITIATION_SIZE - 16
_MEMINFO = struct.Struct(f"={SK_MEMINFO_VARS}I")


def program(shift: int) -> list[Insn]:
    """The instructions as (code, jt, jf, k); jumps are relative to the next instruction."""
    if not 1 <= shift <= MAX_SHIFT:
        raise ValueError(f"shift must be 1..{MAX_SHIFT}, got {shift}")
    keep = 15  # instruction number of the PASS return
    insns = [
        (BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),  # 0: A = UDP length
        (BPF_JMP | BPF_JEQ | BPF_K, 0, keep - 2, UDP_HEADER + INITIATION_SIZE),  # 1
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, UDP_HEADER),  # 2: A = type || reserved
        (BPF_JMP | BPF_JEQ | BPF_K, 0, keep - 4, int(MessageType.INITIATION) << 24),  # 3
    ]
    for word in range(4):  # 4..11: any non-zero mac2 word -> pass
        insns.append((BPF_LD | BPF_W | BPF_ABS, 0, 0, MAC2_OFFSET + 4 * word))
        here = len(insns)
        insns.append((BPF_JMP | BPF_JEQ | BPF_K, 0, keep - here - 1, 0))
    insns += [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, SKF_AD_RANDOM),  # 12: A = random u32
        (BPF_JMP | BPF_JGE | BPF_K, 0, 1, 1 << (32 - shift)),  # 13: A < 2**32 >> shift passes
        (BPF_RET | BPF_K, 0, 0, DROP),  # 14
        (BPF_RET | BPF_K, 0, 0, PASS),  # 15 (keep)
    ]
    assert len(insns) == keep + 1
    return insns


def set_shift(sock: socket.socket, shift: int) -> None:
    """Admit 1 / 2**shift of cookie-less initiations on `sock`; shift 0 removes the filter."""
    if shift == 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError as e:
            if e.errno != errno.ENOENT:  # none attached: already admitting everything
                raise
        return
    cbpf.attach(sock, SO_ATTACH_FILTER, program(shift))


def kernel_drops(sock: socket.socket) -> int:
    """The socket's drop counter: receive buffer overflows plus filter drops (0 if unknown)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return 0
    if len(raw) < _MEMINFO.size:
        return 0
    return int(_MEMINFO.unpack(raw)[SK_MEMINFO_DROPS])
