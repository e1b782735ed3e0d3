"""The gateway-wide state the supervisor alone writes and every worker follows.

Two places: `GlobalState` in the named region (workers, port, the published peer-slot
high-water mark, the under-load deadline; `shardwg show` reads it) and the cookie secrets
in the secret area (never in the named region). Workers re-read both a few times a
second (engine/boot.py GlobalSync).

Once a supervisor turn `maintain` rotates the shared cookie secret (each successor is
published ROTATE_INTERVAL ahead of its switch, so every worker switches at the same
instant and a cookie one worker gave out is honoured by all) and keeps the shared
under-load flag up while any worker's handshake backlog or initiation flood says so.
"""

from __future__ import annotations

import os
from typing import Any

from shardwg.proto.admission import UNDER_LOAD_OFFERED_RATE
from shardwg.proto.constants import UNDER_LOAD_AFTER_TIME
from shardwg.proto.cookie import ROTATE_INTERVAL
from shardwg.proto.intake import UNDER_LOAD_BACKLOG
from shardwg.shm import counters as C
from shardwg.shm.layout import GlobalState, Layout, encode_global
from shardwg.shm.secrets import CookieSecrets, SecretArea, encode_cookie


class GlobalBlock:
    def __init__(self, layout: Layout, buf: Any, secrets: SecretArea, state: GlobalState):
        self.layout = layout
        self.buf = buf
        self.secrets = secrets
        self.state = state
        self.cookie: CookieSecrets | None = None

    def start(self, now: float) -> None:
        """A fresh cookie secret and its successor, then the state (before any fork)."""
        self.publish_cookie(
            CookieSecrets(os.urandom(32), now, os.urandom(32), now + ROTATE_INTERVAL)
        )
        self.write()

    def write(self) -> None:
        self.layout.global_slot(self.buf).write(encode_global(self.state))

    def publish_cookie(self, cookie: CookieSecrets) -> None:
        self.cookie = cookie
        self.secrets.cookie_slot().write(encode_cookie(cookie))

    def set_peer_slots(self, high_water: int) -> None:
        """Publish how many slots from 0 readers must scan (live changes move it); at
        least 1, as 0 means "not published" (readers then scan the whole table)."""
        high_water = max(1, high_water)
        if self.state.peer_slots != high_water:
            self.state.peer_slots = high_water
            self.write()

    def set_listen_port(self, port: int) -> None:
        self.state.listen_port = port
        self.write()

    def maintain(self, now: float) -> None:
        """Once a supervisor turn: rotate the cookie secret, raise the under-load flag."""
        c = self.cookie
        if c is not None and now >= c.next_born:
            # Workers switched to `next` at next_born by themselves; publish its successor.
            switch = max(c.next_born, now) + ROTATE_INTERVAL
            self.publish_cookie(CookieSecrets(c.next, c.next_born, os.urandom(32), switch))
        stats = C.read_all(self.buf, self.layout.counters_offset, self.layout.workers)
        if any(
            s.handshake_backlog >= UNDER_LOAD_BACKLOG
            or (s.initiation_shift > 0 and s.initiations_offered >= UNDER_LOAD_OFFERED_RATE)
            for s in stats
        ):
            g = self.state
            if g.under_load_until < now + UNDER_LOAD_AFTER_TIME / 2:
                g.under_load_until = now + UNDER_LOAD_AFTER_TIME
                self.write()
