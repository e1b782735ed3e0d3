"""What arrived, without trusting the gateway: interface and /proc/net/snmp counters of the
current namespace, and process memory."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence


def link_stats(ifname: str) -> dict[str, int]:
    """rx/tx packet and drop counters of an interface in the current namespace, from
    /proc/net/dev (which follows the calling task's namespace; /sys does not after setns)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == ifname:
                v = [int(x) for x in rest.split()]
                return {"rx_packets": v[1], "rx_dropped": v[3], "tx_packets": v[9],
                        "tx_dropped": v[11]}  # fmt: skip
    raise FileNotFoundError(f"no interface {ifname} in this namespace")


def snmp(proto: str = "Udp") -> dict[str, int]:
    """One protocol's counters from /proc/net/snmp of the current namespace (e.g. Udp
    RcvbufErrors, Icmp InEchos)."""
    with open("/proc/net/snmp") as f:
        lines = [ln.split() for ln in f if ln.startswith(proto + ":")]
    names, values = lines[0][1:], lines[1][1:]
    return {k: int(v) for k, v in zip(names, values, strict=True)}


def net_counters(ifnames: Sequence[str]) -> dict[str, int]:
    """Interface counters (prefixed "<ifname>.") plus Udp and Icmp snmp counters of the
    current namespace, in one snapshot."""
    out: dict[str, int] = {}
    for name in ifnames:
        for k, v in link_stats(name).items():
            out[f"{name}.{k}"] = v
    for k, v in snmp("Udp").items():
        out[f"Udp.{k}"] = v
    for k, v in snmp("Icmp").items():
        out[f"Icmp.{k}"] = v
    return out


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def rss_kib(pid: int) -> int:
    """Resident set size of pid in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pids_rss(pids: Iterable[int]) -> dict[int, int]:
    return {p: rss_kib(p) for p in pids}


def cpu_count() -> int:
    return os.cpu_count() or 1
