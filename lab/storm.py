"""A handshake storm: every peer of a fleet initiating at once, as after a gateway restart.

Unlike lab/loadgen.py (a closed loop that measures handshakes per second), each peer here
behaves like a WireGuard peer would: one initiation at time zero, then a retransmission after
REKEY_TIMEOUT plus up to 1/3 s of jitter while unanswered (a cookie reply only stores the
cookie, the next retransmission carries mac2), as wireguard-go's timers do. Every peer sends
from its own source address, as a real fleet does (the responder's per-source rate limit
then applies per peer, not to the whole storm). The result says when each peer got its
response: "all served" is the last of them.
"""

from __future__ import annotations

import random
import resource
import select
import socket
import time
from dataclasses import dataclass

from lab.loadgen import LoadPeer, _Peer
from shardwg.proto.constants import REKEY_TIMEOUT, MessageType
from shardwg.proto.messages import U32

_T_RESP = int(MessageType.RESPONSE)
_T_COOKIE = int(MessageType.COOKIE_REPLY)
JITTER = 1 / 3  # wireguard-go's RekeyTimeoutJitterMaxMs


@dataclass
class StormResult:
    peers: int
    served: int
    all_served_s: float | None  # None: not every peer was served before the deadline
    median_s: float | None
    initiations: int
    cookie_replies: int
    retransmissions: int


def storm(
    target: tuple[str, int],
    responder_public: bytes,
    peers: list[LoadPeer],
    sources: list[str],
    deadline: float = 30.0,
) -> StormResult:
    """Run in the generator's namespace: peer i sends from sources[i % len(sources)]."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, len(peers) + 64)), hard))
    socks: list[socket.socket] = []
    ep = select.epoll()
    try:
        state: list[_Peer] = []
        for i, p in enumerate(peers):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((sources[i % len(sources)], 0))
            s.setblocking(False)
            socks.append(s)
            ep.register(s.fileno(), select.EPOLLIN)
            state.append(_Peer.initiating(p, responder_public, i))
        by_fd = {s.fileno(): i for i, s in enumerate(socks)}
        wall = time.time()
        first = [st.make(wall) for st in state]  # made before the clock starts
        return _run(target, state, socks, ep, by_fd, first, deadline)
    finally:
        ep.close()
        for s in socks:
            s.close()


def _run(
    target: tuple[str, int],
    state: list[_Peer],
    socks: list[socket.socket],
    ep: select.epoll,
    by_fd: dict[int, int],
    first: list[bytearray],
    deadline: float,
) -> StormResult:
    n = len(state)
    served: list[float | None] = [None] * n
    index_of: list[int] = [0] * n  # our sender index of each peer's latest initiation
    retry_at = [0.0] * n
    sent = cookies = retries = 0
    rng = random.Random(1)
    seq = 0
    t0 = time.monotonic()

    def send(i: int, msg: bytearray, now: float) -> None:
        nonlocal seq, sent
        seq += 1
        index_of[i] = seq
        U32.pack_into(msg, 4, seq)
        state[i].cookies.add_macs(msg, now)
        try:
            socks[i].sendto(msg, target)
        except OSError:
            pass  # a full socket buffer: the retransmission timer covers it, as in WireGuard
        sent += 1
        retry_at[i] = now + REKEY_TIMEOUT + rng.random() * JITTER

    for i in range(n):
        send(i, first[i], time.monotonic())
    left = n
    while left:
        now = time.monotonic()
        if now - t0 >= deadline:
            break
        for fd, _ev in ep.poll(0.01):
            i = by_fd[fd]
            while True:
                try:
                    data = socks[i].recv(256)
                except BlockingIOError:
                    break
                if len(data) < 12:
                    continue
                if data[0] == _T_RESP and U32.unpack_from(data, 8)[0] == index_of[i]:
                    if served[i] is None:
                        served[i] = time.monotonic() - t0
                        left -= 1
                elif data[0] == _T_COOKIE and U32.unpack_from(data, 4)[0] == index_of[i]:
                    cookies += 1
                    state[i].cookies.consume_reply(data, time.monotonic())
        now = time.monotonic()
        for i in range(n):
            if served[i] is None and now >= retry_at[i]:
                retries += 1
                send(i, state[i].make(time.time()), now)
    done = sorted(t for t in served if t is not None)
    return StormResult(
        peers=n, served=len(done), all_served_s=done[-1] if len(done) == n else None,
        median_s=done[len(done) // 2] if done else None, initiations=sent,
        cookie_replies=cookies, retransmissions=retries,
    )  # fmt: skip
