"""`shardwg check`: what this machine gives the data path, and why a figure could be low.

`probes.probe` gathers the raw facts (creating nothing that outlives it); `assess` turns them
into report lines, each missing piece with what it costs and its fix; `render` prints them.
Its output leads the README's troubleshooting section.
"""

from __future__ import annotations

import re

import msgspec

from shardwg.observe.probes import Probes, probe
from shardwg.shm import ordering


class Item(msgspec.Struct):
    name: str
    value: str
    ok: bool
    warning: str = ""  # what it costs
    fix: str = ""


# -- assessment -----------------------------------------------------------------------------


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def assess(p: Probes) -> list[Item]:
    """Report lines; an Item with ok=False carries what it costs and the fix."""
    items: list[Item] = []
    kv = kernel_version(p.kernel)
    old = kv < (5, 0)
    items.append(
        Item(
            "kernel",
            p.kernel,
            not old,
            *(
                (
                    "UDP GRO needs Linux 5.0+, UDP GSO 4.18+: fewer datagrams per system call",
                    "run a newer kernel (Debian 12 has 6.1)",
                )
                if old
                else ("", "")
            ),
        )
    )
    if not p.root:
        items.append(
            Item(
                "privileges",
                "not root",
                False,
                "TUN, namespace and socket probes need CAP_NET_ADMIN; results are partial",
                "run shardwg check as root (as shardwg run is)",
            )
        )
    if p.tun and _denied(p.tun):
        items.append(Item("TUN device", f"no access ({p.tun})", False, NEED_NET_ADMIN, GRANT))
    elif p.tun:
        items.append(
            Item(
                "TUN device",
                f"missing ({p.tun})",
                False,
                "no gateway can start without /dev/net/tun",
                "modprobe tun; in a container: --device /dev/net/tun",
            )
        )
    else:
        items.append(Item("TUN device", "ok", True))
    if p.multiqueue and not p.tun and _denied(p.multiqueue):
        items.append(Item("multiqueue TUN", f"not allowed ({p.multiqueue})", False,
                          NEED_NET_ADMIN, GRANT))  # fmt: skip
    elif p.multiqueue and not p.tun:
        items.append(
            Item(
                "multiqueue TUN",
                f"missing ({p.multiqueue})",
                False,
                "shardwg gives every worker its own TUN queue (IFF_MULTI_QUEUE with "
                "IFF_VNET_HDR); without it the gateway cannot start",
                "a kernel with CONFIG_TUN (Linux 3.8+)",
            )
        )
    elif not p.tun:
        items.append(Item("multiqueue TUN", "ok (IFF_MULTI_QUEUE, IFF_VNET_HDR)", True))
    if not p.tun and not p.multiqueue:
        offloads = f"TSO {'ok' if p.tun_tso else 'no'}, USO {'ok' if p.tun_uso else 'no'}"
        if not p.tun_tso:
            items.append(
                Item(
                    "TUN offloads",
                    offloads,
                    False,
                    "--tun-offload unavailable: every plaintext packet is one TUN read",
                    "Linux 4.x+ TUN with TUNSETOFFLOAD",
                )
            )
        elif not p.tun_uso:
            items.append(
                Item(
                    "TUN offloads",
                    offloads,
                    False,
                    "--tun-offload batches TCP only: UDP inside the tunnel (QUIC) "
                    "is read one packet at a time",
                    "Linux 6.2+ (TUN_F_USO4/6)",
                )
            )
        else:
            items.append(Item("TUN offloads", f"{offloads} (--tun-offload)", True))
    items.append(
        _feature(
            "UDP GSO",
            p.udp_gso,
            "one sendmsg per sealed datagram",
            "Linux 4.18+ (UDP_SEGMENT); on a real NIC also tx checksum offload "
            "(ethtool -K DEV tx on)",
        )
    )
    items.append(
        _feature(
            "UDP GRO",
            None if p.udp_gro else "not supported",
            "one recvmsg per received datagram",
            "Linux 5.0+ (UDP_GRO)",
        )
    )
    items.append(
        _feature(
            "reuseport BPF",
            p.reuseport_bpf,
            "datagrams cannot be steered to their owning worker: the gateway cannot start",
            "Linux 4.5+ (SO_ATTACH_REUSEPORT_CBPF)",
        )
    )
    if p.workers > 1:
        items.append(
            _feature(
                "TUN steering",
                p.tun_steering,
                "the kernel's flow table picks TUN queues: flows it has not learned (one-way, "
                "a flow's first packets, any beyond 4,096) are handed between workers, and a "
                "spread peer's flows stay on the queue that wrote them first",
                "CAP_BPF besides CAP_NET_ADMIN (docker run --cap-add BPF; systemd "
                "CapabilityBoundingSet=CAP_NET_ADMIN CAP_BPF) and Linux 5.12+",
            )
        )
    items.append(
        _feature(
            "recvmmsg",
            None if p.recvmmsg else "unavailable",
            "one recvfrom per datagram",
            "a glibc with recvmmsg on a 64-bit system",
        )
    )
    items.append(_native_item(p))
    limit = "none" if p.cgroup_limit is None else str(p.cgroup_limit)
    cpus = f"{p.cpus_online} online, {p.affinity} in affinity, cgroup limit {limit}"
    if p.cgroup_limit is not None and p.cgroup_limit < p.affinity:
        items.append(
            Item(
                "CPUs",
                cpus,
                False,
                f"the cgroup quota allows {p.cgroup_limit} CPU(s) of {p.affinity}",
                "raise the quota (docker --cpus, Kubernetes limits.cpu) for more workers",
            )
        )
    elif p.affinity < p.cpus_online:
        items.append(
            Item(
                "CPUs",
                cpus,
                False,
                f"CPU affinity allows {p.affinity} of {p.cpus_online} cores",
                "widen the affinity (taskset, systemd CPUAffinity=, cpuset)",
            )
        )
    else:
        items.append(Item("CPUs", cpus, True))
    if p.machine not in ordering.ORDERED_MACHINES:
        items.append(
            Item(
                "workers",
                f"{p.workers} (shardwg run's default here)",
                False,
                f"more than one worker needs x86-64 and this CPU is {p.machine or 'unknown'}: "
                "the shared-memory seqlocks, rings and counters rely on its store ordering; "
                "throughput is one core's",
                "none on this CPU; on x86-64 a worker per core "
                "(docs/architecture.md, 'Memory ordering')",
            )
        )
    elif p.workers <= 1:
        items.append(
            Item(
                "workers",
                "1 (shardwg run's default here)",
                False,
                "one worker: nothing is sharded, throughput is one core's",
                "give the gateway more cores",
            )
        )
    else:
        items.append(Item("workers", f"{p.workers} (shardwg run's default here)", True))
    return items


NEED_NET_ADMIN = "shardwg run needs CAP_NET_ADMIN to create its TUN"
GRANT = "run as root, or grant CAP_NET_ADMIN (docker run --cap-add NET_ADMIN)"


def _denied(error: str) -> bool:
    return "ermission denied" in error or "not permitted" in error


def _feature(name: str, error: str | None, cost: str, fix: str) -> Item:
    if error:
        return Item(name, f"missing ({error})", False, cost, fix)
    return Item(name, "ok", True)


def _native_item(p: Probes) -> Item:
    if p.native is None:
        return Item(
            "native data path",
            "missing",
            False,
            "the pure-Python data path seals and opens every packet in Python: "
            "several times less throughput per core",
            "install a C compiler, libssl-dev and python3-dev, then reinstall "
            "(pip install .) or build in place: python setup.py build_ext --inplace",
        )
    if p.native_disabled:
        return Item(
            "native data path",
            f"built ({p.native}) but disabled",
            False,
            "SHARDWG_NATIVE=0 selects the pure-Python data path",
            "unset SHARDWG_NATIVE",
        )
    return Item("native data path", f"ok, built against {p.native}", True)


def render(p: Probes, items: list[Item]) -> str:
    width = max(len(i.name) for i in items) + 2
    lines = [f"shardwg check: Linux {p.kernel} on {p.machine}, probed in {p.where}", ""]
    lines += [f"  {i.name:<{width}}{i.value}" for i in items]
    bad = [i for i in items if not i.ok]
    lines.append("")
    if not bad:
        lines.append("everything the data path uses is present")
    else:
        lines.append(f"{len(bad)} warning(s):")
        for i in bad:
            lines += [f"  - {i.name}: {i.warning}", f"    fix: {i.fix}"]
    return "\n".join(lines)


def check(as_json: bool = False) -> tuple[str, int]:
    """The report and the exit status (0: nothing missing, 1: warnings)."""
    p = probe()
    items = assess(p)
    status = 0 if all(i.ok for i in items) else 1
    if as_json:
        return msgspec.json.encode({"probes": p, "items": items}).decode(), status
    return render(p, items), status
