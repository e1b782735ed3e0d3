"""The shared cookie secret across workers, through a rotation (issue 13 item 10).

The supervisor publishes the secret in the global block and every worker's
GlobalSync copies it into its CookieChecker. A cookie one worker gives out must be
honoured by every other worker at every instant, rotations included: the kernel
hashes an initiator's retry to any worker. Driven in memory with the real
supervisor rule (`GlobalBlock.maintain`) and the real worker side
(`GlobalSync.on_tick`) over a bytearray region, on a simulated clock.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from shardwg.engine.boot import GLOBAL_SYNC_INTERVAL, GlobalSync
from shardwg.engine.global_block import GlobalBlock
from shardwg.engine.supervisor import LOOP_INTERVAL
from shardwg.proto import crypto
from shardwg.proto.constants import COOKIE_REFRESH_TIME
from shardwg.proto.cookie import ROTATE_INTERVAL, CookieChecker, CookieGenerator
from shardwg.proto.noise import LocalIdentity, PeerCrypto, create_initiation
from shardwg.shm.layout import GlobalState, Layout
from shardwg.shm.secrets import CookieSecrets, SecretArea

SRC = bytes([192, 0, 2, 7]) + (51820).to_bytes(2, "big")
TS = bytes.fromhex("400000006553f10a1d000000")
STEP = 0.05  # seconds of simulated time per step


class _Counter:
    def set(self, _index: int, _value: int) -> None:
        pass


def _worker(checker: CookieChecker) -> Any:
    intake = SimpleNamespace(checker=checker, under_load_until=0.0)
    return SimpleNamespace(
        counters=_Counter(), handshake_queue=[], device=SimpleNamespace(intake=intake)
    )


def _global_block(layout: Layout, buf: bytearray, secrets: SecretArea, now: float) -> GlobalBlock:
    block = GlobalBlock(layout, buf, secrets, GlobalState(workers=2, peer_capacity=0))
    block.write()
    first = CookieSecrets(bytes([7]) * 32, now, bytes([8]) * 32, now + ROTATE_INTERVAL)
    block.publish_cookie(first)
    return block


def test_cookie_from_one_worker_is_honoured_by_the_other_through_rotations() -> None:
    responder = LocalIdentity.from_private(crypto.generate_private_key(b"\x02" * 32))
    initiator = LocalIdentity.from_private(crypto.generate_private_key(b"\x01" * 32))
    at_i = PeerCrypto.build(initiator, responder.public, None)
    msg, _ = create_initiation(initiator, at_i, 1, crypto.generate_private_key(b"\x03" * 32), TS)
    layout = Layout(2, 0)
    buf = bytearray(layout.total_size)
    start = 1000.0
    secrets = SecretArea(0, bytearray(SecretArea.size_for(0)))
    block = _global_block(layout, buf, secrets, start)
    checkers = [CookieChecker(responder, os.urandom) for _ in range(2)]
    workers = [_worker(c) for c in checkers]
    syncs = [GlobalSync(layout, buf, secrets) for _ in range(2)]
    for w, sync in zip(workers, syncs, strict=True):  # each worker syncs as it boots
        sync.on_tick(w, start, start)
    syncs[1].next_sync = start + GLOBAL_SYNC_INTERVAL * 0.6  # then their phases differ

    refused: list[float] = []
    pending: list[tuple[int, bytes]] = []
    steps = int((3 * COOKIE_REFRESH_TIME + 5) / STEP)
    next_turn = start
    for k in range(steps):
        now = start + k * STEP
        if now >= next_turn:  # the supervisor loop turns every LOOP_INTERVAL
            block.maintain(now)
            next_turn = now + LOOP_INTERVAL
        for w, sync in zip(workers, syncs, strict=True):
            sync.on_tick(w, now, now)
        for taker, retry in pending:  # the retries of the step before arrive now
            if not checkers[taker].check_mac2(retry, SRC, now):
                refused.append(round(now - start, 2))
        pending = []
        for giver, taker in ((0, 1), (1, 0)):
            gen = CookieGenerator(at_i.mac1_key, at_i.cookie_key)
            first = bytearray(msg)
            gen.add_macs(first, now)
            assert gen.consume_reply(checkers[giver].create_reply(first, SRC, now), now)
            retry = bytearray(msg)
            gen.add_macs(retry, now)
            if not checkers[taker].check_mac2(bytes(retry), SRC, now):
                refused.append(round(now - start, 2))
            pending.append((taker, bytes(retry)))
    assert not refused, f"{len(refused)} refusals at t = {refused[:3]} .. {refused[-3:]} s"
