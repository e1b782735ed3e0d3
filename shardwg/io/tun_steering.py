"""TUN queue steering: our own few eBPF instructions, run by the TUN per packet, that send an
unspread peer's packets to its owner's queue and give each new flow of a spread peer the next
queue in turn.

Why: without a steering program a multiqueue TUN sends a flow's packets to the queue that
last wrote that flow's packets (its automatic flow steering). For a peer one worker owns
that is nearly what we want: the owner writes the flow's inbound packets, so its outbound
ones come back to the owner's queue. But the kernel learns a flow only from a packet written
for it, and keeps at most 4,096: a one-way flow, a flow's first packets and any flow beyond
the table go to a queue by hash, and every worker but the owner hands them over (12 of 32
one-way UDP flows on 2 workers, measured; tests/test_spread_netns.py). For a spread peer it
is a trap: flows that began while the session was still sequential (the owner alone) had
their inbound packets written by the owner, so their outbound packets stay on the owner's
queue for good, and between two shardwg ends each side then keeps the other on one worker
(measured: A's worker shares 1.0 / 0.0 sending with 4 streams). So with 2 workers or more
the supervisor attaches this program (TUNSETSTEERINGEBPF, any queue's fd: it is the
device's) for the gateway's life.

Where a packet goes: the program first looks its destination up in an LPM trie of every
peer's allowed IPs (longest match, as cryptokey routing does; `tun_routes` in
engine/placement.py, `TunSteering.set_routes`). An unspread peer's prefix holds its owner's
queue, and its packets go straight there (queue q is worker q's: the supervisor holds every
queue for the gateway's life). A `Spread = packets` peer's prefix (one big flow worth
spreading, reordered though it gets) makes each packet take the next value of a counter,
so one flow's packets take the queues in turn. A spread peer's prefix, or no match, sends
the packet on to the flow turns. IPv4 is kept as ::ffff:a.b.c.d, and `V4_GUARD` keeps an
IPv6 prefix like ::/0 from catching it.

Flow turns: a hash of the flow alone leaves queues idle by chance (4 flows on 2 queues all
land on one 1 time in 8; 16 flows on 16 queues use about 10 of them), so the program hands
out queues in turn. It keys an LRU hash map by the flow's hash; a flow it has not seen takes
the next value of a second counter (an atomic fetch-and-add in an array map) and keeps it
while it lives; the TUN uses `(u16) value % queues`. Any run of new flows is thus spread
evenly over the queues, whatever their ports. A sender worker's counter blocks are opened by
the same worker index at a shardwg receiver (receive steering), so each direction of a flow
stays on one worker end to end; the two directions of one flow may use different indexes
(each end counts its own flows), which costs nothing: neither direction is reordered.

The key (`flow_key`): IPv4 or IPv6 source xor destination address words, xor (source port
xor destination port) for TCP and UDP that are not fragments (IPv6: no extension headers),
folded and multiplied by 2^32 / golden ratio (BPF_PROG_TYPE_SOCKET_FILTER, loaded with
bpf(2); the TUN calls it with skb->data at the IP header). `FlowQueues` is the same in
Python (tests compare the two). A kernel without the maps or the atomic (before 5.12) gets
the stateless program instead, only while a peer is spread, which returns the key's top 16
bits (`flow_hash`): flows then take queues by hash; otherwise the kernel's flow table steers.
A kernel that refuses both (no bpf(2), no CAP_BPF) is logged once; the automatic steering
then stays.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import platform
import struct
from collections.abc import Mapping
from types import MappingProxyType

log = logging.getLogger("shardwg.io.tun_steering")

TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1
FLOWS = 65536  # flows remembered (LRU); a forgotten flow that comes back takes a new turn
ROUTES = 1 << 18  # trie entries at most (every peer's allowed IPs); not preallocated
FLOW_TURNS = -1  # a route whose flows take the queues in turn (a spread peer's)
PACKET_TURNS = -2  # a route whose packets take them one by one (`Spread = packets`)
# (a route >= 0 is a queue: an unspread peer's owner)
V4_GUARD = "::ffff:0.0.0.0/96"  # where the trie keeps IPv4; an entry of its own (flow turns)
# stops a shorter IPv6 prefix (::/0) from matching IPv4 packets
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "i686": 357, "armv7l": 386,
            "ppc64le": 361, "s390x": 351}  # fmt: skip
GOLDEN = 0x9E3779B1

# eBPF opcodes (<linux/bpf.h>)
_LD, _LDX, _ST, _STX, _ALU, _JMP, _ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
_W, _H, _B, _DW = 0x00, 0x08, 0x10, 0x18
_IMM, _ABS, _IND, _MEM, _ATOMIC = 0x00, 0x20, 0x40, 0x60, 0xC0
_CALL = 0x80
_FETCH_ADD = 0x01  # BPF_ADD | BPF_FETCH
_PSEUDO_MAP_FD = 1
_MAP_LOOKUP, _MAP_UPDATE = 1, 2  # helper numbers
_K, _X = 0x00, 0x08
_ADD, _MUL, _AND, _LSH, _RSH, _XOR, _MOV, _END = 0x00, 0x20, 0x50, 0x60, 0x70, 0xA0, 0xB0, 0xD0
_TO_BE = 0x08
_JA, _JEQ, _JNE, _EXIT = 0x00, 0x10, 0x50, 0x90
_INSN = struct.Struct("<BBhi")

_Insn = tuple[int, int, int, int | str, int]  # code, dst, src, offset or label, imm


def _asm(items: list[_Insn | str]) -> bytes:
    """Instructions and labels (strings) -> bytecode; a jump's offset may name a label."""
    at: dict[str, int] = {}
    insns: list[_Insn] = []
    for it in items:
        if isinstance(it, str):
            at[it] = len(insns)
        else:
            insns.append(it)
    out = bytearray()
    for i, (code, dst, src, off, imm) in enumerate(insns):
        rel = at[off] - i - 1 if isinstance(off, str) else off
        out += _INSN.pack(code, dst | src << 4, rel, imm)
    return bytes(out)


def _alu64(op: int, dst: int, imm: int) -> _Insn:
    return (_ALU64 | op | _K, dst, 0, 0, imm)


def _alu64x(op: int, dst: int, src: int) -> _Insn:
    return (_ALU64 | op | _X, dst, src, 0, 0)


def _ld(size: int, offset: int) -> _Insn:
    """r0 = the packet's bytes at `offset` (network order); a short packet exits with 0."""
    return (_LD | _ABS | size, 0, 0, 0, offset)


def _jump(op: int, reg: int, imm: int, label: str) -> _Insn:
    return (_JMP | op | _K, reg, 0, label, imm)


def _key_insns(prologue: bool = True) -> list[_Insn | str]:
    """Instructions leaving the flow's 32-bit key in r0 (r6 = skb, r7 = hash, r8 = IPv4
    header length); `flow_key` in Python. `prologue`: set r6 from r1 (False: already set)."""
    exit_: _Insn = (_JMP | _EXIT, 0, 0, 0, 0)
    items: list[_Insn | str] = [_alu64x(_MOV, 6, 1)] if prologue else []
    items += [
        _ld(_B, 0),
        _alu64x(_MOV, 8, 0),
        _alu64(_RSH, 0, 4),
        _jump(_JEQ, 0, 4, "v4"),
        _jump(_JEQ, 0, 6, "v6"),
        _alu64(_MOV, 0, 0),  # neither: queue 0
        exit_,
        "v4",
        _ld(_W, 12),
        _alu64x(_MOV, 7, 0),
        _ld(_W, 16),
        _alu64x(_XOR, 7, 0),
        _ld(_H, 6),
        _alu64(_AND, 0, 0x3FFF),  # more fragments, or an offset: no ports in every piece
        _jump(_JNE, 0, 0, "mix"),
        _ld(_B, 9),
        _jump(_JEQ, 0, 6, "ports4"),
        _jump(_JNE, 0, 17, "mix"),
        "ports4",
        _alu64(_AND, 8, 0x0F),
        _alu64(_LSH, 8, 2),
        (_LD | _IND | _W, 0, 8, 0, 0),  # r0 = source port << 16 | destination port
        (_JMP | _JA, 0, 0, "ports", 0),
        "v6",
        _ld(_W, 8),
        _alu64x(_MOV, 7, 0),
    ]
    for off in range(12, 40, 4):
        items += [_ld(_W, off), _alu64x(_XOR, 7, 0)]
    items += [
        _ld(_B, 6),
        _jump(_JEQ, 0, 6, "ports6"),
        _jump(_JNE, 0, 17, "mix"),
        "ports6",
        _ld(_W, 40),
        "ports",
        _alu64x(_MOV, 1, 0),
        _alu64(_RSH, 1, 16),
        _alu64x(_XOR, 0, 1),
        _alu64(_AND, 0, 0xFFFF),
        _alu64x(_XOR, 7, 0),
        "mix",
        _alu64x(_MOV, 0, 7),
        _alu64x(_MOV, 1, 0),
        _alu64(_RSH, 1, 16),
        _alu64x(_XOR, 0, 1),
        (_ALU | _MUL | _K, 0, 0, 0, GOLDEN - (1 << 32)),  # 32-bit multiply (imm is signed)
    ]
    return items


def program() -> bytes:
    """The stateless program: a flow's queue is the top 16 bits of its key (`flow_hash`)."""
    return _asm(_key_insns() + [(_ALU | _RSH | _K, 0, 0, 0, 16), (_JMP | _EXIT, 0, 0, 0, 0)])


def _map_fd(reg: int, fd: int) -> list[_Insn | str]:
    """reg = the map behind `fd` (a 16-byte wide load; the loader resolves the fd)."""
    return [(_LD | _DW | _IMM, reg, _PSEUDO_MAP_FD, 0, fd), (0, 0, 0, 0, 0)]


def _fetch_add(turn_fd: int, index: int) -> list[_Insn | str]:
    """r9 = the next value of counter `index` in `turn_fd` (an atomic fetch-and-add)."""
    label = f"count{index}"
    return [
        (_ST | _MEM | _W, 10, 0, -8, index),  # stack[-8] = the counter's index
        *_map_fd(1, turn_fd),
        _alu64x(_MOV, 2, 10),
        _alu64(_ADD, 2, -8),
        (_JMP | _CALL, 0, 0, 0, _MAP_LOOKUP),
        _jump(_JNE, 0, 0, label),
        (_JMP | _EXIT, 0, 0, 0, 0),  # unreachable (the array's indices exist), but the
        label,  # verifier wants the check
        _alu64(_MOV, 9, 1),
        (_STX | _ATOMIC | _W, 0, 9, 0, _FETCH_ADD),  # r9 = counter++, atomically
    ]


def _route_insns(routes_fd: int, turn_fd: int) -> list[_Insn | str]:
    """The destination's longest match in `routes_fd` (LPM trie over IPv6 addresses, IPv4 as
    ::ffff:a.b.c.d) decides: value 1, the next value of counter 1 (packet turns); 2 + q,
    queue q; 0 or no match, on to "flows" (`_trie_value`)."""
    be32: _Insn = (_ALU | _END | _TO_BE, 0, 0, 0, 32)  # _ld gives host order; the key wants
    items: list[_Insn | str] = [  # network order
        _alu64x(_MOV, 6, 1),
        _ld(_B, 0),
        _alu64(_RSH, 0, 4),
        _jump(_JEQ, 0, 4, "pk4"),
        _jump(_JEQ, 0, 6, "pk6"),
        (_JMP | _JA, 0, 0, "flows", 0),
        "pk4",
        (_ST | _MEM | _W, 10, 0, -40, 128),  # the key: prefix length, then the address
        (_ST | _MEM | _W, 10, 0, -36, 0),
        (_ST | _MEM | _W, 10, 0, -32, 0),
        (_ST | _MEM | _W, 10, 0, -28, -0x10000),  # bytes 00 00 ff ff
        _ld(_W, 16),
        be32,
        (_STX | _MEM | _W, 10, 0, -24, 0),
        (_JMP | _JA, 0, 0, "lookup", 0),
        "pk6",
        (_ST | _MEM | _W, 10, 0, -40, 128),
    ]
    for i, off in enumerate(range(24, 40, 4)):
        items += [_ld(_W, off), be32, (_STX | _MEM | _W, 10, 0, -36 + 4 * i, 0)]
    items += [
        "lookup",
        *_map_fd(1, routes_fd),
        _alu64x(_MOV, 2, 10),
        _alu64(_ADD, 2, -40),
        (_JMP | _CALL, 0, 0, 0, _MAP_LOOKUP),
        _jump(_JEQ, 0, 0, "flows"),
        (_LDX | _MEM | _W, 1, 0, 0, 0),  # the route (u32)
        _jump(_JEQ, 1, 0, "flows"),
        _jump(_JEQ, 1, 1, "packet"),
        _alu64x(_MOV, 0, 1),
        _alu64(_ADD, 0, -2),  # an owner's queue
        (_JMP | _EXIT, 0, 0, 0, 0),
        "packet",
        *_fetch_add(turn_fd, 1),
        _alu64x(_MOV, 0, 9),
        (_JMP | _EXIT, 0, 0, 0, 0),
        "flows",
    ]
    return items


def turn_program(flows_fd: int, turn_fd: int, routes_fd: int = -1) -> bytes:
    """The program that hands out queues in turn (see the module): key -> the flow's turn in
    `flows_fd` (LRU hash, u32 -> u32), else the next value of counter 0 in `turn_fd` (array
    of two u32), remembered for the flow. With `routes_fd` (LPM trie), the destination's
    route comes first: an owner's queue, or each packet its own turn (counter 1)."""
    exit_: _Insn = (_JMP | _EXIT, 0, 0, 0, 0)
    items: list[_Insn | str] = []
    if routes_fd >= 0:
        items += _route_insns(routes_fd, turn_fd)
    items += _key_insns(prologue=routes_fd < 0) + [
        (_STX | _MEM | _W, 10, 0, -4, 0),  # stack[-4] = key
        *_map_fd(1, flows_fd),
        _alu64x(_MOV, 2, 10),
        _alu64(_ADD, 2, -4),
        (_JMP | _CALL, 0, 0, 0, _MAP_LOOKUP),
        _jump(_JEQ, 0, 0, "new"),
        (_LDX | _MEM | _W, 0, 0, 0, 0),  # a known flow: its turn
        exit_,
        "new",
        *_fetch_add(turn_fd, 0),
        (_STX | _MEM | _W, 10, 9, -12, 0),  # stack[-12] = the flow's turn
        *_map_fd(1, flows_fd),
        _alu64x(_MOV, 2, 10),
        _alu64(_ADD, 2, -4),
        _alu64x(_MOV, 3, 10),
        _alu64(_ADD, 3, -12),
        _alu64(_MOV, 4, 0),  # BPF_ANY
        (_JMP | _CALL, 0, 0, 0, _MAP_UPDATE),
        _alu64x(_MOV, 0, 9),
        exit_,
    ]
    return _asm(items)


def flow_key(packet: bytes) -> int:
    """The flow's 32-bit key as the program computes it from `packet` (an IP packet)."""
    if not packet:
        return 0
    version = packet[0] >> 4
    h = 0
    ports = None
    if version == 4 and len(packet) >= 20:
        h = int.from_bytes(packet[12:16], "big") ^ int.from_bytes(packet[16:20], "big")
        if not int.from_bytes(packet[6:8], "big") & 0x3FFF and packet[9] in (6, 17):
            at = (packet[0] & 0x0F) * 4
            ports = packet[at : at + 4] if len(packet) >= at + 4 else b""
    elif version == 6 and len(packet) >= 40:
        for off in range(8, 40, 4):
            h ^= int.from_bytes(packet[off : off + 4], "big")
        if packet[6] in (6, 17):
            ports = packet[40:44] if len(packet) >= 44 else b""
    else:
        return 0
    if ports is not None:
        if len(ports) < 4:
            return 0  # the kernel's packet load failed: the program returned 0
        p = int.from_bytes(ports, "big")
        h ^= (p ^ p >> 16) & 0xFFFF
    h ^= h >> 16
    return h * GOLDEN & 0xFFFFFFFF


def flow_hash(packet: bytes) -> int:
    """What the stateless program returns for `packet`: the key's top 16 bits."""
    return flow_key(packet) >> 16


def _unkeyed(packet: bytes) -> bool:
    """Packets the program returns 0 for before it looks at any map: not IPv4 or IPv6, or
    too short for one of its loads (the kernel then ends the program with 0)."""
    if not packet or packet[0] >> 4 not in (4, 6):
        return True
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            return True
        if int.from_bytes(packet[6:8], "big") & 0x3FFF or packet[9] not in (6, 17):
            return False
        return len(packet) < (packet[0] & 0x0F) * 4 + 4
    if len(packet) < 40:
        return True
    return packet[6] in (6, 17) and len(packet) < 44


def _destination(packet: bytes) -> bytes | None:
    """The destination address as the packet program loads it (IPv4 as ::ffff:a.b.c.d), or
    None where it goes straight on to the flow program (neither IPv4 nor IPv6, or short)."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return bytes(10) + b"\xff\xff" + packet[16:20]
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return packet[24:40]
    return None


def trie_entries(routes: Mapping[str, int]) -> dict[str, int]:
    """What the trie holds for `routes` (prefix -> queue, FLOW_TURNS or PACKET_TURNS): those,
    and `V4_GUARD` as FLOW_TURNS unless `routes` names it or is empty."""
    if not routes:
        return {}
    return {V4_GUARD: FLOW_TURNS, **routes}


def _trie_net(prefix: str) -> tuple[int, int]:
    """`prefix` as the trie keys it: (prefix length, 128-bit address), IPv4 in ::ffff:0:0/96."""
    key = _trie_key(prefix)
    return struct.unpack_from("<I", key)[0], int.from_bytes(key[4:], "big")


class FlowQueues:
    """What the turn program returns, in Python: the destination's longest match in
    `routes` (as `TunSteering.set_routes` takes them) decides first: a queue is returned
    as it is, PACKET_TURNS takes the next of the packet turns, flow or no flow; otherwise
    a flow seen before keeps its turn and a new one takes the next (the TUN then uses the
    value modulo its queues)."""

    def __init__(self, routes: Mapping[str, int] = MappingProxyType({})) -> None:
        self.turns: dict[int, int] = {}
        self.next = 0
        entries = [(*_trie_net(p), r) for p, r in trie_entries(routes).items()]
        self.routes = sorted(entries, reverse=True)  # longest prefix first
        self.packet_next = 0

    def _route(self, packet: bytes) -> int:
        dst = _destination(packet)
        if dst is None:
            return FLOW_TURNS
        addr = int.from_bytes(dst, "big")
        for length, net, route in self.routes:
            if addr >> (128 - length) == net >> (128 - length):
                return route
        return FLOW_TURNS

    def __call__(self, packet: bytes) -> int:
        route = self._route(packet)
        if route == PACKET_TURNS:
            own = self.packet_next
            self.packet_next = (own + 1) & 0xFFFFFFFF
            return own
        if route >= 0:
            return route
        if _unkeyed(packet):
            return 0
        key = flow_key(packet)
        turn = self.turns.get(key)
        if turn is None:
            turn = self.turns[key] = self.next
            self.next = (self.next + 1) & 0xFFFFFFFF
        return turn


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _load(code: bytes) -> int:
    """Load `code` as a socket filter; its fd (close-on-exec), or OSError with the verifier's
    words."""
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"MIT")
    log_buf = ctypes.create_string_buffer(4096)

    def attr(level: int) -> ctypes.Array[ctypes.c_char]:
        return ctypes.create_string_buffer(struct.pack(
            "<IIQQIIQII16s", BPF_PROG_TYPE_SOCKET_FILTER, len(code) // 8,
            ctypes.addressof(insns), ctypes.addressof(lic), level,
            len(log_buf) if level else 0, ctypes.addressof(log_buf) if level else 0, 0, 0,
            b"shardwg_tunq",
        ), 128)  # fmt: skip

    try:
        return _bpf(BPF_PROG_LOAD, attr(0))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES):
            raise
        first = exc
    try:  # once more with the verifier's log, to say why
        return _bpf(BPF_PROG_LOAD, attr(1))
    except OSError:
        why = log_buf.value.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise OSError(first.errno, f"the verifier refused it: {why[0]}") from None


def _map(kind: int, entries: int, key_size: int = 4, flags: int = 0) -> int:
    """A map with `key_size`-byte keys and u32 values (its fd, close-on-exec)."""
    attr = ctypes.create_string_buffer(struct.pack(
        "<IIIIIII16s", kind, key_size, 4, entries, flags, 0, 0, b"shardwg_tunq"), 128)  # fmt: skip
    return _bpf(BPF_MAP_CREATE, attr)


def load() -> int:
    """The stateless program (flows take queues by hash); its fd."""
    return _load(program())


def route_trie() -> int:
    """An empty LPM trie for the turn program's routes (`trie_add`); its fd."""
    return _map(BPF_MAP_TYPE_LPM_TRIE, ROUTES, 20, BPF_F_NO_PREALLOC)


def _trie_value(route: int) -> int:
    """A route as the program reads it: 0 flow turns, 1 packet turns, 2 + q queue q."""
    if route == FLOW_TURNS:
        return 0
    if route == PACKET_TURNS:
        return 1
    if not 0 <= route < 0xFFFF:
        raise ValueError(f"not a TUN queue: {route}")
    return route + 2


def _trie_key(prefix: str) -> bytes:
    """struct bpf_lpm_trie_key for `prefix`: its length, then 16 address bytes."""
    net = ipaddress.ip_network(prefix, strict=False)
    addr = net.network_address.packed
    if net.version == 4:
        return struct.pack("<I", 96 + net.prefixlen) + bytes(10) + b"\xff\xff" + addr
    return struct.pack("<I", net.prefixlen) + addr


def _elem(cmd: int, fd: int, key: bytes, value: bytes | None) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value or b"", max(1, len(value or b"")))
    at_value = ctypes.addressof(v) if value else 0
    attr = ctypes.create_string_buffer(
        struct.pack("<IIQQQ", fd, 0, ctypes.addressof(k), at_value, 0), 128
    )
    _bpf(cmd, attr)


def trie_add(fd: int, prefix: str, route: int = PACKET_TURNS) -> None:
    """Packets to `prefix` (longest match) take `route`: a queue, FLOW_TURNS or PACKET_TURNS;
    adds or changes the entry (OSError: e.g. ENOSPC when full)."""
    _elem(BPF_MAP_UPDATE_ELEM, fd, _trie_key(prefix), struct.pack("<I", _trie_value(route)))


def trie_remove(fd: int, prefix: str) -> None:
    """`prefix` leaves the trie: the next shorter match decides (ENOENT if it was not there)."""
    _elem(BPF_MAP_DELETE_ELEM, fd, _trie_key(prefix), None)


def load_turns(routes_fd: int = -1) -> int:
    """The turn program with fresh flow maps (flows take queues in turn), and with
    `routes_fd` (`route_trie`) the routes first; its fd. The program holds the maps, so
    they go when the last reference to it does."""
    flows = _map(BPF_MAP_TYPE_LRU_HASH, FLOWS)
    try:
        turn = _map(BPF_MAP_TYPE_ARRAY, 2)
        try:
            return _load(turn_program(flows, turn, routes_fd))
        finally:
            os.close(turn)
    finally:
        os.close(flows)


def run_once(prog_fd: int, packet: bytes) -> int:
    """The program's return value for `packet` (BPF_PROG_TEST_RUN; an Ethernet header is
    put in front, as the kernel strips one before the program sees the IP header)."""
    eth = b"\x02" * 12 + (b"\x86\xdd" if packet[:1] and packet[0] >> 4 == 6 else b"\x08\x00")
    frame = ctypes.create_string_buffer(eth + packet, len(eth) + len(packet))
    attr = ctypes.create_string_buffer(struct.pack(
        "<IIIIQQII", prog_fd, 0, len(frame), 0, ctypes.addressof(frame), 0, 1, 0,
    ), 80)  # fmt: skip
    _bpf(BPF_PROG_TEST_RUN, attr)
    return int(struct.unpack_from("<I", attr.raw, 4)[0])


def load_routed() -> tuple[int, int]:
    """The turn program over a fresh, empty route trie: (its fd, the trie's fd); OSError
    where the kernel refuses either."""
    trie = route_trie()
    try:
        return load_turns(trie), trie
    except OSError:
        os.close(trie)
        raise


def attach(tun_fd: int, prog_fd: int) -> None:
    """The TUN (any of its queue fds) steers by the program; -1 detaches it."""
    fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog_fd))


class TunSteering:
    """The turn program steers whenever the kernel loads it: the routes of `set_routes`
    first (an unspread peer's owner, packet turns), then flows in turn; where the kernel
    refuses it, flows go by hash while any peer is spread and by the kernel's flow table
    otherwise (see the module)."""

    def __init__(self, tun_fd: int) -> None:
        self.tun_fd = tun_fd
        self.on = False
        self.kind = ""  # "turns" or "hash" while attached
        self.refused = ""  # why the kernel refused both (then we stay on automatic steering)
        self.turns_refused = ""  # why it refused the turn program (then routes are off)
        self.routes: dict[str, int] = {}  # prefix -> queue, FLOW_TURNS or PACKET_TURNS
        self.in_trie: dict[str, int] = {}  # the entries the attached program's trie has
        self._trie = -1  # the attached turn program's LPM trie
        self._told = False  # a prefix the trie could not take was logged

    def _attach(self, spread: bool) -> str:
        """Attach the turn program, or where the kernel refuses it and `spread`, the
        stateless one; its kind (OSError when neither is attached)."""
        try:
            fd, trie = load_routed()
            kind = "turns"
        except OSError as exc:
            if not self.turns_refused:
                self.turns_refused = str(exc)
                need = ": it needs CAP_BPF" if exc.errno == errno.EPERM else ""
                log.warning("TUN steering: the turn program was refused (%s%s); while a "
                            "peer is spread flows take queues by hash (Spread = packets "
                            "keeps each flow whole), otherwise the kernel's flow table steers",
                            exc, need)  # fmt: skip
            if not spread:
                raise
            fd, kind, trie = load(), "hash", -1
        try:
            attach(self.tun_fd, fd)  # the TUN keeps its own reference
        except OSError:
            if trie >= 0:
                os.close(trie)
            raise
        finally:
            os.close(fd)
        self._trie, self.in_trie = trie, {}
        return kind

    def _drop_trie(self) -> None:
        if self._trie >= 0:
            os.close(self._trie)
        self._trie, self.in_trie = -1, {}

    def set(self, spread: bool) -> bool:
        """Steer as the module says, `spread` saying whether any peer is: by the turn
        program whenever the kernel loads it (its routes send an unspread peer's packets to
        the owner's queue from a flow's first packet, where the kernel's own flow table
        learns a flow's queue only from a packet written for it, so a one-way flow or one
        beyond its 4,096 entries went by hash); where it is refused, by the stateless one
        while `spread` and by the kernel's flow table otherwise. True while a program
        steers."""
        want = spread or not self.turns_refused
        if want == self.on or (want and self.refused):
            return self.on
        try:
            if want:
                self.kind = self._attach(spread)
            else:
                attach(self.tun_fd, -1)
                self.kind = ""
                self._drop_trie()
        except OSError as exc:
            if want and spread:
                self.refused = str(exc)
                log.warning("TUN steering unavailable (%s): a spread peer's flows stay on "
                            "the TUN queue that wrote them first", exc)  # fmt: skip
            elif not want:
                log.warning("TUN steering: detaching failed (%s)", exc)
            return self.on
        self.on = want
        log.info("TUN queues steered by %s", {"turns": "routes, then flows in turn",
                 "hash": "flow hash (a peer is spread)"}.get(self.kind,
                 "the kernel's flow table"))  # fmt: skip
        self._sync()
        return self.on

    def set_routes(self, routes: Mapping[str, int]) -> None:
        """Packets to each prefix of `routes` (longest match) go to its queue (an unspread
        peer's owner), take the flow turns (a spread peer) or take the queues one by one
        (PACKET_TURNS: `Spread = packets`), from now on while the turn program is attached,
        and from its next attach."""
        new = dict(routes)
        packets = {p for p, r in new.items() if r == PACKET_TURNS}
        if packets != {p for p, r in self.routes.items() if r == PACKET_TURNS}:
            # said when it changes, not at every move or peer added (a hub has thousands)
            log.info("TUN steering: packets to %d prefixes take the queues one by one "
                     "(Spread = packets)%s", len(packets),
                     "" if self.kind == "turns" or not packets else
                     ", once the turn program is attached")  # fmt: skip
        self.routes = new
        self._sync()

    def _sync(self) -> None:
        """The attached trie holds exactly `trie_entries(routes)` (as far as it has room)."""
        if self._trie < 0:
            return
        want = trie_entries(self.routes)
        for prefix in sorted(self.in_trie.keys() - want.keys()):
            try:
                trie_remove(self._trie, prefix)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("TUN steering: %s stays in the route trie (%s)", prefix, exc)
                    continue
            del self.in_trie[prefix]
        for prefix, route in sorted(want.items()):
            if self.in_trie.get(prefix) == route:
                continue
            try:
                trie_add(self._trie, prefix, route)
            except OSError as exc:
                if not self._told:
                    log.warning("TUN steering: the route trie did not take %s (%s); packets "
                                "to it follow its next shorter match", prefix, exc)  # fmt: skip
                    self._told = True
                continue
            self.in_trie[prefix] = route
