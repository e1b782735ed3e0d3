"""What one worker turn may do, and how often a worker's periodic work runs.

Each bound keeps one kind of work from starving the others: data is read in
batches, handshakes get a per-turn budget and a bounded backlog, timers and
publication run on intervals.
"""

from __future__ import annotations

BATCH = 64  # packets read from one source per turn (and decrypted per coalesced TUN write)
MAX_RECVS = 64  # receive calls per socket per turn (GRO: each may hold many datagrams)
RECV_SLOTS = 16  # receives per recvmmsg call (16 x 64 KiB of preallocated buffers)
HANDSHAKE_BUDGET = 16  # handshake messages processed per turn...
HANDSHAKE_BUDGET_BUSY = 4  # ...or this many when the turn also carried transport data
HANDSHAKE_QUEUE_MAX = 4096  # bounded backlog; beyond it handshake messages are dropped
PRIORITY_QUEUE_MAX = 64
TICK_INTERVAL = 0.05  # timer resolution
PUBLISH_INTERVAL = 1.0  # endpoints republished at most this often (traffic: at every count)
PLAIN_HEADROOM = 64  # spare bytes after a packet for padding
# Of the cookie-reply budget, what the kernel's random share of cookie-less initiations may
# use (admitted: between half and all of it). The rest is headroom for known peers, whose
# initiations always pass. A quarter, not a half: each admitted datagram costs a wake-up, a
# read and a cookie reply (~80 us of a worker all told), and at 40k/s a half cost the
# honest peer ~10 % more of its throughput in tests/test_flood.py.
ADMIT_BUDGET_SHARE = 0.25
ENDPOINT_REFRESH = 1.0  # seconds between re-reads of known peer endpoints while filtering
