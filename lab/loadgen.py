"""A handshake load generator: valid WireGuard initiations from many configured peers, counting
the responses, so handshakes per second can be measured on shardwg and wireguard-go alike.

Each initiation is real: a fresh ephemeral key, a TAI64N timestamp newer than the peer's last,
made with shardwg.proto.noise.create_initiation and finished by CookieGenerator.add_macs. The
responder must know every peer (configure it with `peer_configs(peers)`).

Why it looks the way it does:
- Many peers, each sent to at most once per `gap` (default 25 ms): a responder drops a second
  initiation from one peer within 20 ms (the flood rule), which would cap one peer at 50/s.
- A closed loop with at most `window` initiations in flight (default 64): blasting fills the
  responder's handshake queue, it goes "under load" and answers with cookie replies (rate
  limited per source), which measures the DoS defence, not handshake capacity. 64 stays below
  both implementations' under-load threshold (128 queued). Cookie replies are still counted,
  and honoured (mac2) if they come.
- Several source ports: shardwg's reuseport group hashes initiations by 4-tuple, so one port
  would reach one worker only.
- Initiations are made before the timed window (a pool), so the generator's own X25519 work
  does not compete with the responder for the CPU; if the pool runs dry more are made on the
  fly (`generated_live` says how many: then the generator may have been the limit).
- Responses are matched to our sender index (type 2, receiver index) but not decrypted: the
  responder's work is what is measured.
"""

from __future__ import annotations

import os
import resource
import secrets
import select
import socket
import statistics
import struct
import time
import timeit
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shardwg.proto import crypto, tai64n
from shardwg.proto.constants import MessageType
from shardwg.proto.cookie import CookieGenerator
from shardwg.proto.messages import U32
from shardwg.proto.noise import LocalIdentity, PeerCrypto, create_initiation

CpuProbe = Callable[[], float]
_TS = struct.Struct(">QI")
_T_RESP = int(MessageType.RESPONSE)
_T_COOKIE = int(MessageType.COOKIE_REPLY)


@dataclass(frozen=True)
class LoadPeer:
    """A peer identity the generator holds; the responder is configured with `public`."""

    private: bytes
    public: bytes


def make_peers(n: int) -> list[LoadPeer]:
    out = []
    for _ in range(n):
        priv = crypto.generate_private_key(secrets.token_bytes(32))
        out.append(LoadPeer(priv, crypto.public_key(priv)))
    return out


def peer_configs(peers: list[LoadPeer]) -> list[dict[str, object]]:
    """[Peer] entries (lab.wgconf dicts) for the responder: keys only, no allowed IPs
    (handshakes need none), no endpoint (learnt from the initiation)."""
    import base64

    return [{"public_key": base64.b64encode(p.public).decode()} for p in peers]


def later(ts: bytes) -> bytes:
    """The next TAI64N label after ts, one whitening step (2**24 ns) on."""
    secs, nanos = _TS.unpack(ts)
    nanos += 1 << 24
    if nanos >= 1_000_000_000:
        secs, nanos = secs + 1, 0
    return _TS.pack(secs, nanos)


@dataclass
class _Peer:
    local: LocalIdentity
    crypto: PeerCrypto
    cookies: CookieGenerator
    sock: int  # index into the socket list
    last_ts: bytes = tai64n.ZERO
    next_ok: float = 0.0
    pool: deque[bytearray] = field(default_factory=deque)

    @classmethod
    def initiating(cls, peer: LoadPeer, responder_public: bytes, sock: int) -> _Peer:
        """`peer`'s state as an initiator towards the responder's public key."""
        local = LocalIdentity.from_private(peer.private)
        pc = PeerCrypto.build(local, responder_public, None)
        return cls(local, pc, CookieGenerator(pc.mac1_key, pc.cookie_key), sock)

    def make(self, wall: float) -> bytearray:
        """A new initiation (sender index 0, macs unset), timestamp newer than the last."""
        ts = tai64n.timestamp(wall)
        if not tai64n.is_newer(ts, self.last_ts):
            ts = later(self.last_ts)
        self.last_ts = ts
        eph = crypto.generate_private_key(secrets.token_bytes(32))
        msg, _state = create_initiation(self.local, self.crypto, 0, eph, ts)
        return msg


@dataclass
class LoadgenResult:
    seconds: float
    sent: int
    responses: int  # type 2 answers to our initiations: completed responder handshakes
    cookie_replies: int  # type 3 answers: the responder was under load
    cookies_accepted: int  # cookie replies that decrypted (mac2 was used after them)
    timeouts: int  # no answer within `answer_timeout`
    pool: int
    generated_live: int
    latency_ms_median: float
    responder_cpu_s: float  # from cpu_probe over the timed window; 0 without a probe
    generator_cpu_s: float  # this generator's own CPU over the timed window

    @property
    def handshakes_per_s(self) -> float:
        return self.responses / self.seconds if self.seconds > 0 else 0.0

    @property
    def responder_cores(self) -> float:
        return self.responder_cpu_s / self.seconds if self.seconds > 0 else 0.0

    @property
    def handshakes_per_core_s(self) -> float:
        c = self.responder_cpu_s
        return self.responses / c if c > 0 else 0.0


def run_loadgen(
    target: tuple[str, int],
    responder_public: bytes,
    peers: list[LoadPeer],
    seconds: float,
    *,
    window: int = 64,
    sockets: int = 8,
    gap: float = 0.025,
    pool: int = 0,
    answer_timeout: float = 1.0,
    cpu_probe: CpuProbe | None = None,
) -> LoadgenResult:
    """Send initiations to target for `seconds` from the current namespace; count answers.

    pool: initiations made before the clock starts (spread over the peers); cpu_probe: returns
    the responder's CPU seconds so far, sampled at the start and end of the timed window."""
    if not peers:
        raise ValueError("need at least one peer")
    rng_base = secrets.randbits(32)
    socks = []
    for _ in range(max(1, sockets)):
        s = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET,
                          socket.SOCK_DGRAM)  # fmt: skip
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        s.bind(("::" if ":" in target[0] else "0.0.0.0", 0))
        s.setblocking(False)
        socks.append(s)
    try:
        state = [_Peer.initiating(p, responder_public, i % len(socks))
                 for i, p in enumerate(peers)]  # fmt: skip
        wall = time.time()
        for k in range(pool):
            st = state[k % len(state)]
            st.pool.append(st.make(wall))
        return _blast(target, state, socks, seconds, window, gap, pool, answer_timeout,
                      cpu_probe, rng_base)  # fmt: skip
    finally:
        for s in socks:
            s.close()


def _blast(
    target: tuple[str, int],
    state: list[_Peer],
    socks: list[socket.socket],
    seconds: float,
    window: int,
    gap: float,
    pool: int,
    answer_timeout: float,
    cpu_probe: CpuProbe | None,
    rng_base: int,
) -> LoadgenResult:
    inflight: dict[int, tuple[_Peer, float]] = {}
    latencies: list[float] = []
    sent = responses = cookie_replies = accepted = timeouts = live = 0
    seq = 0
    rr = 0
    n = len(state)
    fds = {s.fileno(): s for s in socks}
    cpu0 = cpu_probe() if cpu_probe else 0.0
    own0 = _own_cpu()
    t0 = time.monotonic()
    deadline = t0 + seconds
    next_expiry = t0 + 0.05
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        # fill the window from peers whose flood gap has passed (round robin)
        scanned = 0
        while len(inflight) < window and scanned < n:
            st = state[rr]
            rr = (rr + 1) % n
            scanned += 1
            if st.next_ok > now:
                continue
            if st.pool:
                msg = st.pool.popleft()
            else:
                msg = st.make(time.time())
                live += 1
                now = time.monotonic()
            seq += 1
            idx = (rng_base + seq) & 0xFFFFFFFF
            U32.pack_into(msg, 4, idx)
            st.cookies.add_macs(msg, now)
            try:
                socks[st.sock].sendto(msg, target)
            except BlockingIOError:
                st.pool.appendleft(msg)
                break
            sent += 1
            inflight[idx] = (st, now)
            st.next_ok = now + gap
            scanned = 0
        ready = select.select(list(fds), [], [], 0.002)[0]
        now = time.monotonic()
        for fd in ready:
            s = fds[fd]
            for _ in range(256):
                try:
                    data = s.recv(256)
                except BlockingIOError:
                    break
                if len(data) < 12:
                    continue
                mtype = data[0]
                if mtype == _T_RESP:
                    hit = inflight.pop(U32.unpack_from(data, 8)[0], None)
                    if hit is not None and now < deadline:
                        responses += 1
                        latencies.append(now - hit[1])
                elif mtype == _T_COOKIE:
                    hit = inflight.pop(U32.unpack_from(data, 4)[0], None)
                    if hit is not None:
                        cookie_replies += 1
                        if hit[0].cookies.consume_reply(data, now):
                            accepted += 1
        if now >= next_expiry:
            old = [i for i, (_st, t) in inflight.items() if now - t > answer_timeout]
            for i in old:
                del inflight[i]
            timeouts += len(old)
            next_expiry = now + 0.05
    elapsed = time.monotonic() - t0
    cpu = (cpu_probe() - cpu0) if cpu_probe else 0.0
    own = _own_cpu() - own0
    return LoadgenResult(
        seconds=elapsed, sent=sent, responses=responses, cookie_replies=cookie_replies,
        cookies_accepted=accepted, timeouts=timeouts, pool=pool, generated_live=live,
        latency_ms_median=statistics.median(latencies) * 1000 if latencies else 0.0,
        responder_cpu_s=cpu, generator_cpu_s=own,
    )  # fmt: skip


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def x25519_cost_us(number: int = 2000) -> dict[str, float]:
    """Microseconds per X25519 operation with the bindings shardwg uses (timeit, best of 5),
    and per complete initiation as this generator makes it."""
    priv = crypto.generate_private_key(os.urandom(32))
    pub = crypto.public_key(crypto.generate_private_key(os.urandom(32)))
    st = _Peer.initiating(make_peers(1)[0], pub, 0)

    def best(fn: Callable[[], object], n: int) -> float:
        return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6

    return {
        "dh_us": best(lambda: crypto.dh(priv, pub), number),
        "base_us": best(lambda: crypto.public_key(priv), number),
        "initiation_us": best(lambda: st.make(time.time()), max(1, number // 4)),
    }
