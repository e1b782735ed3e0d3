"""Classic BPF: the opcodes we use and how a program reaches the kernel.

Why one module: the reuseport steering program and the initiation socket filter are
both classic BPF handed over as a `struct sock_fprog`; they share the encoding.
"""

from __future__ import annotations

import ctypes
import socket
import struct

# Opcodes (linux/bpf_common.h).
BPF_LD, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x02, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN = 0x00, 0x20, 0x40, 0x60, 0x80
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE = 0x00, 0x10, 0x20, 0x30
BPF_SUB = 0x10
BPF_OR, BPF_LSH, BPF_RSH, BPF_MOD = 0x40, 0x60, 0x70, 0x90
BPF_JSET = 0x40
BPF_TAX = 0x00
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10

# Negative load offsets (linux/filter.h): relative to the network header, or ancillary data.
SKF_NET_OFF = -0x100000
SKF_AD_OFF = -0x1000
SKF_AD_RANDOM = 56  # + SKF_AD_OFF: a fresh random u32 per packet

Insn = tuple[int, int, int, int]  # (code, jt, jf, k); jumps are relative to the next insn
INSN = struct.Struct("=HBBI")  # struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def pack(insns: list[Insn]) -> bytes:
    """The packed `struct sock_filter` array."""
    return b"".join(INSN.pack(*insn) for insn in insns)


def attach(sock: socket.socket, option: int, insns: list[Insn]) -> None:
    """setsockopt(SOL_SOCKET, option, struct sock_fprog) for `insns`."""
    code = pack(insns)
    # The kernel copies the program during setsockopt; `buf` only has to outlive the call.
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, option, bytes(fprog))
