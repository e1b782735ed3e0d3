"""A real source among the spoofed ones: `CookieClient` answers cookie replies (its
initiations then carry a valid mac2); `flood_with_cookie_client` runs it during a spoofed
flood and counts the cookie replies the gateway sends back."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lab.hostile.send import BlastResult, spoof_blast
from lab.hostile.sniff import Sniffer
from shardwg.proto import noise
from shardwg.proto.constants import (
    COOKIE_REPLY_SIZE,
    MessageType,
)
from shardwg.proto.cookie import CookieGenerator
from shardwg.proto.tai64n import timestamp


@dataclass
class FloodReport:
    """A spoofed flood with the cookie replies seen coming back, and a real source that
    answers its cookies."""

    flood: BlastResult
    cookie_replies: int
    cookie_replies_dropped_by_sniffer: int
    client_cookies: int = 0
    client_sent_with_mac2: int = 0
    client_seconds: float = 0.0


class CookieClient:
    """One real source (fixed address and port) sending valid-mac1 initiations from an unknown
    key; when a cookie reply comes it stores the cookie, so later initiations carry a valid
    mac2 and pass to the per-source rate limiter."""

    def __init__(self, dst: str, port: int, gateway_public: bytes, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.local = noise.LocalIdentity.from_private(bytes(rng.randbytes(32)))
        self.peer = noise.PeerCrypto.build(self.local, gateway_public, None)
        self.gen = CookieGenerator(self.peer.mac1_key, self.peer.cookie_key)
        msg, _st = noise.create_initiation(
            self.local, self.peer, rng.getrandbits(32), bytes(rng.randbytes(32)),
            timestamp(time.time()),
        )  # fmt: skip
        self.msg = msg
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((dst, port))
        self.sock.setblocking(False)
        self.cookies = 0
        self.sent_with_mac2 = 0

    def _drain(self, now: float) -> None:
        for _ in range(1000):
            try:
                data = self.sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if len(data) == COOKIE_REPLY_SIZE and data[0] == 3:
                if self.gen.consume_reply(data, now):
                    self.cookies += 1
                    self.gen.add_macs(self.msg, now)

    def run(self, seconds: float, rate: float) -> None:
        """Send at `rate` per second for `seconds`: initiations without mac2 until a cookie
        arrives, with a valid mac2 after."""
        t0 = time.monotonic()
        self.gen.add_macs(self.msg, 0.0)
        sent = 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            self._drain(now)
            has = self.gen.has_fresh_cookie(now)
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                self.sock.send(self.msg)
                sent += 1
                if has:
                    self.sent_with_mac2 += 1
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        self._drain(time.monotonic())

    def close(self) -> None:
        self.sock.close()


def flood_with_cookie_client(
    sniff_ifname: str,
    dst: str,
    port: int,
    packets: Sequence[bytes],
    count: int,
    rate: float,
    max_seconds: float,
    gateway_public: bytes,
    client_rate: float = 200.0,
    client_delay: float = 1.0,
) -> FloodReport:
    """Spoofed flood of prebuilt packets, counting type-3 replies from `port` seen on
    `sniff_ifname`; meanwhile a CookieClient from this namespace's own address answers
    cookies and keeps sending (from `client_delay` s until the flood ends)."""
    sn = Sniffer(sniff_ifname, port, src_port=True, first_word=int(MessageType.COOKIE_REPLY) << 24,
                 size=COOKIE_REPLY_SIZE)  # fmt: skip
    client = CookieClient(dst, port, gateway_public)
    stop = threading.Event()

    def client_run() -> None:
        if stop.wait(client_delay):
            return
        t0 = time.monotonic()
        client.run(max(0.5, flood_seconds - client_delay - 0.5), client_rate)
        report.client_seconds = time.monotonic() - t0

    flood_seconds = min(max_seconds, count / rate if rate else max_seconds)
    report = FloodReport(BlastResult(), 0, 0)
    th = threading.Thread(target=client_run, daemon=True)
    th.start()
    try:
        report.flood = spoof_blast(dst, packets, count, rate=rate, max_seconds=max_seconds)
    finally:
        stop.set()
        th.join(timeout=max_seconds + 5)
        time.sleep(0.3)  # the last replies in flight
        got, dropped = sn.stats()
        sn.close()
        client.close()
    report.cookie_replies = got
    report.cookie_replies_dropped_by_sniffer = dropped
    report.client_cookies = client.cookies
    report.client_sent_with_mac2 = client.sent_with_mac2
    return report
