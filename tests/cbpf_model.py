"""A classic BPF interpreter for the subset our programs use, to check them against a
reference predicate on many generated packets without a kernel (the live-socket tests check
that the kernel agrees on the cases that matter)."""

from __future__ import annotations

from shardwg.io.cbpf import (
    BPF_A,
    BPF_ABS,
    BPF_ALU,
    BPF_B,
    BPF_H,
    BPF_IMM,
    BPF_IND,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JMP,
    BPF_JSET,
    BPF_LD,
    BPF_LEN,
    BPF_LSH,
    BPF_MEM,
    BPF_MISC,
    BPF_MOD,
    BPF_OR,
    BPF_RET,
    BPF_RSH,
    BPF_ST,
    BPF_SUB,
    BPF_TAX,
    BPF_W,
    BPF_X,
    SKF_AD_OFF,
    SKF_AD_RANDOM,
    SKF_NET_OFF,
    Insn,
)


class Aborted(Exception):
    """A load past the end: the kernel returns 0 (drop) for the whole program."""


def run(prog: list[Insn], net: bytes, transport: bytes, random_u32: int = 0) -> int:
    """Run `prog` on a packet whose IP header is `net` and whose data (what offset 0 loads)
    is `transport` (a UDP socket filter: the UDP header, then the payload)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    steps = 0
    while True:
        steps += 1
        assert steps <= len(prog), "a loop: classic BPF only jumps forward"
        code, jt, jf, k = prog[pc]
        cls = code & 0x07
        if cls == BPF_LD:
            mode, size = code & 0xE0, code & 0x18
            if mode == BPF_LEN:
                a = len(transport)
            elif mode == BPF_MEM:
                a = mem[k]
            elif mode == BPF_IMM:
                a = k
            else:
                assert mode in (BPF_ABS, BPF_IND), hex(code)
                off = k - (1 << 32) if k & 0x80000000 else k
                if mode == BPF_IND:
                    off += x
                width = {BPF_W: 4, BPF_H: 2, BPF_B: 1}[size]
                if off == SKF_AD_OFF + SKF_AD_RANDOM:
                    a = random_u32
                else:
                    data, base = (net, off - SKF_NET_OFF) if off < 0 else (transport, off)
                    if base < 0 or base + width > len(data):
                        raise Aborted
                    a = int.from_bytes(data[base : base + width], "big")
        elif cls == BPF_ST:
            mem[k] = a
        elif cls == BPF_ALU:
            op, operand = code & 0xF0, x if code & BPF_X else k
            if op == BPF_SUB:
                a = (a - operand) & 0xFFFFFFFF
            elif op == BPF_OR:
                a = a | operand
            elif op == BPF_LSH:
                a = (a << operand) & 0xFFFFFFFF
            elif op == BPF_RSH:
                a = a >> operand
            elif op == BPF_MOD:
                assert operand, "mod by zero"
                a = a % operand
            else:
                raise AssertionError(f"alu {code:#x} not modelled")
        elif cls == BPF_MISC:
            assert code == BPF_MISC | BPF_TAX, hex(code)
            x = a
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
            else:
                operand = x if code & BPF_X else k
                assert op in (BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JSET), hex(code)
                taken = {BPF_JEQ: a == operand, BPF_JGE: a >= operand, BPF_JGT: a > operand,
                         BPF_JSET: bool(a & operand)}[op]  # fmt: skip
                pc += jt if taken else jf
        elif cls == BPF_RET:
            return a if code & 0x18 == BPF_A else k
        else:
            raise AssertionError(f"opcode {code:#x} not modelled")
        pc += 1
