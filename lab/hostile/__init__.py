"""Hostile traffic for hardening tests: malformed, mutated, replayed and spoofed WireGuard
datagrams, sent fast, plus the packet counters that tell what arrived.

Everything here runs inside a namespace (through `Namespace.call`) and touches only the
addresses it is given. Senders are bounded in count and in time. Speed comes from
`sendmmsg(2)` over payloads laid out once in one ctypes buffer: a million datagrams is about
a thousand system calls and no per-datagram Python work.

Pieces (one module each; all re-exported here, so `from lab import hostile as H` and
`H.blast(...)` work as before):
    payloads.py   pure functions of a seeded `random.Random`: garbage, wrong sizes, bad
                  mac1, unknown indices, mutations of captured datagrams, valid-mac1
                  initiations (built with shardwg.proto; the code under test is the
                  receiver only)
    send.py       `blast`: sendmmsg over UDP sockets (several source ports, so the
                  gateway's reuseport hash spreads them over workers), optionally paced;
                  `spoof_blast`: the same over a raw IP_HDRINCL socket, source addresses
                  drawn from a prefix the caller routes back to this namespace
    sniff.py      `Sniffer`: an AF_PACKET socket with a classic BPF filter that counts
                  (PACKET_STATISTICS) or captures matching UDP datagrams on one interface
    cookies.py    `CookieClient`: a single real source that answers cookie replies
                  (valid mac2), and the flood it runs in
    counters.py   interface and /proc/net/snmp counters of the current namespace
"""

from lab.hostile.cookies import CookieClient, FloodReport, flood_with_cookie_client
from lab.hostile.counters import (
    cpu_count,
    diff,
    link_stats,
    net_counters,
    pids_rss,
    rss_kib,
    snmp,
)
from lab.hostile.payloads import (
    bad_mac1_initiations,
    bad_mac1_responses,
    mutate_transports,
    random_garbage,
    receiver_index,
    transport_counter,
    unknown_index_cookie_replies,
    unknown_index_transports,
    valid_mac1_initiations,
    wrong_sizes,
)
from lab.hostile.send import BlastResult, MessageVector, blast, spoof_blast, spoofed_packets
from lab.hostile.sniff import Sniffer, capture_messages, capture_transports

__all__ = [
    "BlastResult",
    "CookieClient",
    "FloodReport",
    "MessageVector",
    "Sniffer",
    "bad_mac1_initiations",
    "bad_mac1_responses",
    "blast",
    "capture_messages",
    "capture_transports",
    "cpu_count",
    "diff",
    "flood_with_cookie_client",
    "link_stats",
    "mutate_transports",
    "net_counters",
    "pids_rss",
    "random_garbage",
    "receiver_index",
    "rss_kib",
    "snmp",
    "spoof_blast",
    "spoofed_packets",
    "transport_counter",
    "unknown_index_cookie_replies",
    "unknown_index_transports",
    "valid_mac1_initiations",
    "wrong_sizes",
]
