"""`shardwg show`: what `wg show` prints, plus how each worker (core) is doing."""

from __future__ import annotations

import os
import time

import msgspec

from shardwg.observe.status import GatewayStatus, MoveStatus, read_status

SHM_DIR = "/dev/shm"
SHM_PREFIX = "shardwg-"


def running_interfaces() -> list[str]:
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(n[len(SHM_PREFIX) :] for n in names if n.startswith(SHM_PREFIX))


def _ago(unix: int) -> str:
    if not unix:
        return "never"
    secs = int(time.time() - unix)
    if secs < 60:
        return f"{secs} seconds ago"
    if secs < 3600:
        return f"{secs // 60} minutes, {secs % 60} seconds ago"
    return f"{secs // 3600} hours, {secs % 3600 // 60} minutes ago"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


def _rate(bps: float) -> str:
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.2f} {unit}"
    return f"{bps:.0f} bit/s"


_SPREAD_WHY = {
    "policy": "--spread",
    "override": "its Spread = on",
    "traffic": "its traffic saturated its worker (--spread auto)",
    "fewer": "fewer peers than workers, its worker busy (--spread auto)",
}


def _move(m: MoveStatus) -> str:
    why = "counts evened after a configuration change"
    if m.reason == "load":
        why = f"load: worker {m.src} at {m.ratio:.2f}x the mean"
    done = f"adopted in {m.latency * 1000:.0f} ms" if m.latency >= 0 else "in flight"
    ago = max(0, int(time.time() - m.time))
    return f"{m.public_key[:8]}… worker {m.src} -> {m.dst}, {ago} s ago ({why}; {done})"


def render(st: GatewayStatus) -> str:
    lines = [
        f"interface: {st.interface}",
        f"  listening port: {st.listen_port}",
        f"  workers: {st.workers} (supervisor pid {st.supervisor_pid}, up {st.uptime:.0f} s)"
        + ("  UNDER LOAD (cookies required)" if st.under_load else ""),
        f"  data path: {st.datapath or 'unknown'}",
    ]
    if not st.running:
        lines.insert(1, "  NOT RUNNING: the supervisor is gone; this is a stale region "
                        "(removed at the next start on this interface)")  # fmt: skip
    if st.placement is not None:
        pl = st.placement
        lines.append(f"  placement: {pl.mode} ({pl.moves} move{'' if pl.moves == 1 else 's'})")
        for m in pl.recent:
            lines.append(f"    {_move(m)}")
    for p in st.peers:
        lines += ["", f"peer: {p.public_key}", f"  worker: {p.owner}"]
        if p.spread:
            lines.append(f"  spread over every worker: {_SPREAD_WHY.get(p.spread, p.spread)}")
        if p.endpoint:
            lines.append(f"  endpoint: {p.endpoint}")
        if p.allowed_ips:
            lines.append(f"  allowed ips: {', '.join(p.allowed_ips)}")
        lines.append(f"  latest handshake: {_ago(p.latest_handshake)}")
        lines.append(f"  transfer: {_bytes(p.rx_bytes)} received, {_bytes(p.tx_bytes)} sent")
        if p.persistent_keepalive:
            lines.append(f"  persistent keepalive: every {p.persistent_keepalive} seconds")
    lines += ["", "workers:"]
    header = (
        f"  {'id':>2} {'pid':>7} {'peers':>5} {'beat':>6} {'rx pkt/s':>9} {'tx pkt/s':>9}"
        f" {'rx':>12} {'tx':>12} {'hs done':>7} {'handoff in/out':>15} {'drops':>7}"
        f" {'kernel drops':>12}"
    )
    lines.append(header)
    for w in st.worker_stats:
        beat = f"{w.heartbeat_age:.1f}s" if w.alive else "dead"
        drops = sum(w.drops.values())
        lines.append(
            f"  {w.worker:>2} {w.pid:>7} {w.peers_owned:>5} {beat:>6} {w.rx_pps:>9.0f}"
            f" {w.tx_pps:>9.0f} {_rate(w.rx_bps):>12} {_rate(w.tx_bps):>12}"
            f" {w.handshakes_completed:>7} {f'{w.handoffs_in}/{w.handoffs_out}':>15} {drops:>7}"
            f" {w.kernel_drops:>12}"
        )
    for w in st.worker_stats:
        if w.initiation_share < 1.0:
            lines.append(
                f"  worker {w.worker}: initiation flood, ~{w.initiations_offered:,}/s offered;"
                f" the kernel admits 1/{round(1 / w.initiation_share)} of cookie-less ones"
            )
    if st.drops_total:
        lines += ["", "drops by reason:"]
        for reason, n in sorted(st.drops_total.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {n}")
    return "\n".join(lines)


def show(interface: str, as_json: bool, interval: float) -> str:
    st = read_status(interface, interval)
    if as_json:
        return msgspec.json.encode(st).decode()
    return render(st)
