"""Fuzz targets: pure functions of `bytes` that must never raise.

Each target feeds attacker-shaped bytes to one entry point an outsider can reach
(datagrams, handshake messages, transport packets, cookie replies) or a local user
can reach (config files, the UAPI socket) and checks the properties security rests
on: only the documented outcomes, nothing forged accepted, no state changed by a
rejected input, honest sessions still working afterwards. Any exception escaping a
target is a finding: `FuzzFailure` for a broken property, anything else for a crash
in the code under test.

Protocol targets run against in-memory device pairs built in world.py (not tests/pairs.py,
so fuzz/ stands alone) from fixed seeds and a fixed clock, so every world, and every
message it mints, is the same in every process: the seed corpus (`make_corpus`)
holds messages that are genuine for the live worlds. Worlds are cached between
inputs and rebuilt whenever an input was accepted, so each input meets a pristine
world (rejected inputs are checked to leave peer state untouched) and a crash file
replays on its own.

Modules: world.py (worlds, fingerprints, shared checks, `mutate`), handshakes.py
(`datagram`, `mutated_handshake`), transports.py (`transport`), cookies.py (`cookie`),
local.py (`config`, `uapi`), seal.py (`seal`: the native seal kernel against its reference),
open_batch.py (`open_batch`: the native open kernel against its reference), corpus.py (the
seed corpus). The UAPI is imported
unconditionally: if it cannot be imported, neither can the targets (no silent skip).
"""

from __future__ import annotations

from collections.abc import Callable

from fuzz.targets.cookies import cookie
from fuzz.targets.corpus import CORPUS_DIR, load_corpus, make_corpus
from fuzz.targets.handshakes import datagram, mutated_handshake
from fuzz.targets.local import config, uapi
from fuzz.targets.open_batch import open_batch
from fuzz.targets.seal import seal
from fuzz.targets.transports import transport
from fuzz.targets.world import FuzzFailure, mutate, reset_worlds

TARGETS: dict[str, Callable[[bytes], None]] = {
    "datagram": datagram,
    "mutated_handshake": mutated_handshake,
    "transport": transport,
    "config": config,
    "uapi": uapi,
    "cookie": cookie,
    "seal": seal,
    "open_batch": open_batch,  # the inbound batch kernel, native against reference
}

__all__ = [
    "CORPUS_DIR",
    "TARGETS",
    "FuzzFailure",
    "config",
    "cookie",
    "datagram",
    "load_corpus",
    "make_corpus",
    "mutate",
    "mutated_handshake",
    "open_batch",
    "reset_worlds",
    "seal",
    "transport",
    "uapi",
]
