"""The benchmark's outputs from its JSON document: markdown tables with ratios, the targets with
PASS/MISS (lab.bench_chart draws the PNG). Pure functions of the document, so a saved bench.json
can be re-rendered (`python -m lab.bench --render bench-out/bench.json`).

Document shape: doc["sections"][section][config][metric] = {"unit", "samples", "median", "min",
"max"}; ratios are of medians from the same run.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from lab.bench_pairs import LABELS

Doc = dict[str, Any]
WG, SW, SS = "wggo-wggo", "shardwg-wggo", "shardwg-shardwg"
HS_LABELS = {"wggo": "wireguard-go", "shardwg-1w": "shardwg, 1 worker",
             "shardwg-2w": "shardwg, 2 workers"}  # fmt: skip


def med(doc: Doc, section: str, config: str, metric: str) -> float | None:
    """The median of a metric, or None when it was not measured (or is not finite).
    A "_pct" suffix reads the fraction metric without it, times 100."""
    if metric.endswith("_pct"):
        v = med(doc, section, config, metric[: -len("_pct")])
        return None if v is None else 100 * v
    try:
        v = doc["sections"][section][config][metric]["median"]
    except (KeyError, TypeError):
        return None
    return float(v) if v is not None and math.isfinite(v) else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def fx(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells: list[str]) -> list[str]:
    """A table's header row and its rule (first column left-aligned, the rest right)."""
    return [_row(cells), _row(["---"] + ["---:"] * (len(cells) - 1))]



def _direction_rows() -> list[tuple[str, str, str, int]]:
    """Throughput and each end's CPU per Gbit/s, A receives (section tcp1 ...) and A sends
    (tcp1_send ...). In `A receives` end A is the receiver; in `A sends` it is the sender."""
    rows: list[tuple[str, str, str, int]] = []
    for sfx, d, role_a, role_b in (("", "A receives", "receiver", "sender"),
                                   ("_send", "A sends", "sender", "receiver")):  # fmt: skip
        rows += [
            (f"TCP, 1 stream, {d} (Gbit/s)", f"tcp1{sfx}", "gbit_s", 3),
            (f"TCP, 4 streams, {d} (Gbit/s)", f"tcp4{sfx}", "gbit_s", 3),
            (f"UDP, best rate at ≤1% loss, {d} (packets/s)", f"udp{sfx}", "best_pps", 0),
            (f"UDP, that rate, {d} (Mbit/s)", f"udp{sfx}", "best_mbit_s", 1),
        ]
        for streams in (1, 4):
            for side, role in (("a", role_a), ("b", role_b)):
                rows.append((f"CPU, end {side.upper()} ({role}), cores per Gbit/s, TCP "
                             f"{streams}, {d}", "cpu",
                             f"tcp{streams}{sfx}_cores_per_gbit_{side}", 2))  # fmt: skip
    return rows


# (label, section, metric, digits)
PAIR_ROWS: list[tuple[str, str, str, int]] = [
    *_direction_rows(),
    ("idle ping RTT (ms, median)", "rtt", "ms", 3),
    ("machine busy during TCP 1, A receives (% of all CPUs)", "tcp1", "machine_busy_pct", 0),
    ("RSS, end A, all processes (MiB)", "rss", "rss_mib_a", 1),
    ("PSS, end A, all processes (MiB)", "rss", "pss_mib_a", 1),
    ("RSS, end B, all processes (MiB)", "rss", "rss_mib_b", 1),
]
MICRO_PATHS = {
    "native": "batch kernel, native (C, OpenSSL)",
    "python-batch": "batch kernel, pure-Python reference",
    "python": "per-packet Python path (Device.send_packet / receive_transport)",
    "aead": "bare AEAD call from Python (floor of any per-packet Python path)",
}
MICRO_OPS = (("open", "open"), ("seal", "seal"), ("seal_tso", "seal, TSO super-packets"))


def pair_table(doc: Doc) -> str:
    head = ["", LABELS["veth"], LABELS[WG], LABELS[SW], "vs wg-go", LABELS[SS], "vs wg-go"]
    lines = _head(head)
    for label, section, metric, digits in PAIR_ROWS:
        vals = {c: med(doc, section, c, metric) for c in ("veth", WG, SW, SS)}
        if all(v is None for v in vals.values()):
            continue
        lines.append(_row([
            label, fmt(vals["veth"], digits), fmt(vals[WG], digits), fmt(vals[SW], digits),
            fx(ratio(vals[SW], vals[WG])), fmt(vals[SS], digits), fx(ratio(vals[SS], vals[WG])),
        ]))  # fmt: skip
    return "\n".join(lines)


def micro_table(doc: Doc) -> str:
    sec = doc["sections"].get("micro") or {}
    if not sec:
        return ""
    ops = [(op, label) for op, label in MICRO_OPS
           if any(med(doc, "micro", p, f"{op}_pps") is not None for p in sec)]  # fmt: skip
    head = ["path"] + [f"{label} (packets/s)" for _op, label in ops]
    head += [f"{label}: µs per packet" for _op, label in ops]
    lines = _head(head)
    for path, label in MICRO_PATHS.items():
        if path not in sec:
            continue
        v = [med(doc, "micro", path, f"{op}_pps") for op, _label in ops]
        lines.append(_row([label] + [fmt(x, 0) for x in v]
                          + [fmt(1e6 / x if x else None, 2) for x in v]))  # fmt: skip
    return "\n".join(lines)


def handshake_table(doc: Doc) -> str:
    sec = doc["sections"].get("handshakes") or {}
    if not sec:
        return ""
    head = ["responder", "handshakes/s", "vs wireguard-go", "responder cores",
            "handshakes per core-second", "median answer (ms)", "cookie replies",
            "timeouts"]  # fmt: skip
    lines = _head(head)
    wg = med(doc, "handshakes", "wggo", "per_s")
    for cfg in ("wggo", "shardwg-1w", "shardwg-2w"):
        if cfg not in sec:
            continue
        keys = ("per_s", "cores", "per_core_s", "latency_ms", "cookie_replies", "timeouts")
        m = {k: med(doc, "handshakes", cfg, k) for k in keys}
        lines.append(_row([
            HS_LABELS[cfg], fmt(m["per_s"], 0), fx(ratio(m["per_s"], wg)), fmt(m["cores"]),
            fmt(m["per_core_s"], 0), fmt(m["latency_ms"], 1), fmt(m["cookie_replies"], 0),
            fmt(m["timeouts"], 0),
        ]))  # fmt: skip
    return "\n".join(lines)


def scaling_table(doc: Doc) -> str:
    """1 against 2 workers; a run with `--worker-cpu` names its configs "shardwg-Nw cap C"
    and is compared with its own 1-worker row, never with an uncapped one."""
    sec = doc["sections"].get("scaling") or {}
    if not sec:
        return ""
    head = ["shardwg workers", "aggregate Gbit/s (4 peers × 1 TCP stream)", "slowest peer Gbit/s",
            "gateway cores", "wireguard-go peers' cores", "machine busy",
            "workers throttled", "vs 1 worker"]  # fmt: skip
    lines = _head(head)
    for cfg in sorted(sec, key=lambda c: (c.partition(" ")[2], c)):
        workers, _, cap = cfg.removeprefix("shardwg-").partition(" ")
        one = med(doc, "scaling", " ".join(filter(None, ["shardwg-1w", cap])), "gbit_s")
        g = med(doc, "scaling", cfg, "gbit_s")
        slowest = med(doc, "scaling", cfg, "min_peer_gbit_s")
        cores = med(doc, "scaling", cfg, "cores")
        peers = med(doc, "scaling", cfg, "peer_cores")
        busy = med(doc, "scaling", cfg, "machine_busy_pct")
        busy_text = "—" if busy is None else f"{busy:.0f}%"
        throttled = med(doc, "scaling", cfg, "throttled")
        throttled_text = "—" if throttled is None else f"{100 * throttled:.0f}% of periods"
        name = workers.removesuffix("w") + (f", each capped at {cap.split()[-1]} cores"
                                            if cap else "")  # fmt: skip
        lines.append(_row([name, fmt(g, 3), fmt(slowest, 3), fmt(cores), fmt(peers), busy_text,
                           throttled_text, fx(ratio(g, one))]))  # fmt: skip
    return "\n".join(lines)


_ONEPEER = re.compile(r"(?P<kind>\S+) (?P<workers>\d+)w spread (?P<spread>\S+)(?P<cap> cap \S+)? "
                      r"(?P<flows>\d+s \S+)")  # fmt: skip


def onepeer_table(doc: Doc) -> str:
    """One peer over 1 and 2 workers (lab/bench_onepeer.py): each configuration against the
    1-worker row of the same peer, streams, direction and CPU cap."""
    sec = doc["sections"].get("onepeer") or {}
    if not sec:
        return ""
    head = ["configuration", "Gbit/s", "vs 1 worker", "TCP retransmits",
            "smallest worker share", "workers throttled"]  # fmt: skip
    lines = _head(head)
    for cfg in sec:
        m = _ONEPEER.fullmatch(cfg)
        one = None
        if m:
            one = med(doc, "onepeer", f"{m['kind']} 1w spread off{m['cap'] or ''} {m['flows']}",
                      "gbit_s")  # fmt: skip
        g = med(doc, "onepeer", cfg, "gbit_s")
        throttled = med(doc, "onepeer", cfg, "throttled_pct")
        lines.append(_row([cfg, fmt(g, 3), fx(ratio(g, one)),
                           fmt(med(doc, "onepeer", cfg, "retransmits"), 0),
                           fmt(med(doc, "onepeer", cfg, "min_worker_share")),
                           "—" if throttled is None else f"{throttled:.0f}%"]))  # fmt: skip
    return "\n".join(lines)


def targets(doc: Doc) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it was met (None: not measured).
    The throughput goals are issue 11's, against the wireguard-go the run raced."""
    rtt_sw, rtt_wg = med(doc, "rtt", SW, "ms"), med(doc, "rtt", WG, "ms")

    def vs_wg(section: str, config: str, metric: str = "gbit_s") -> float | None:
        return ratio(med(doc, section, config, metric), med(doc, section, WG, metric))

    rows: list[tuple[str, str, float | None, float, str, bool]] = [
        # (name, how it is measured, value, goal, unit, higher is better)
        ("shardwg<->shardwg TCP 1 stream vs wg-go<->wg-go, A receives", "ratio of medians",
         vs_wg("tcp1", SS), 1.5, "x", True),
        ("shardwg<->wg-go TCP 1 stream vs wg-go<->wg-go, A (shardwg) receives",
         "ratio of medians", vs_wg("tcp1", SW), 1.1, "x", True),
        ("shardwg<->wg-go TCP 1 stream vs wg-go<->wg-go, A (shardwg) sends",
         "ratio of medians", vs_wg("tcp1_send", SW), 1.1, "x", True),
        ("shardwg receiving end, TCP 1 stream (end A of shardwg<->wg-go, A receives)",
         "cores per Gbit/s", med(doc, "cpu", SW, "tcp1_cores_per_gbit_a"), 0.25, "cores", False),
        ("shardwg<->shardwg UDP packets/s at ≤1% loss vs wg-go<->wg-go, A receives",
         "ratio of medians", vs_wg("udp", SS, "best_pps"), 1.5, "x", True),
        ("microbenchmark open, native, 1420 B in batches of 64", "packets per CPU-second",
         med(doc, "micro", "native", "open_pps"), 600_000, "", True),
        ("microbenchmark seal, native, 1420 B in batches of 64", "packets per CPU-second",
         med(doc, "micro", "native", "seal_pps"), 600_000, "", True),
        ("shardwg handshakes per core-second (1 worker)", "responses / responder CPU s",
         med(doc, "handshakes", "shardwg-1w", "per_core_s"), 2500, "", True),
        ("shardwg 2 workers vs 1 worker, 4 peers", "ratio of aggregate Gbit/s",
         ratio(med(doc, "scaling", "shardwg-2w", "gbit_s"),
               med(doc, "scaling", "shardwg-1w", "gbit_s")), 1.7, "x", True),
        ("idle ping RTT, shardwg<->wg-go vs wg-go<->wg-go", "ratio of medians (≤ 1 = no worse)",
         ratio(rtt_sw, rtt_wg), 1.0, "x", False),
    ]  # fmt: skip
    out = []
    for name, how, value, goal, unit, higher in rows:
        met = None if value is None else (value >= goal if higher else value <= goal)
        out.append({"target": name, "measured_as": how, "value": value, "goal": goal,
                    "unit": unit, "higher_is_better": higher, "met": met})  # fmt: skip
    return out


def targets_table(doc: Doc) -> str:
    lines = [_row(["target", "goal", "measured", "verdict"]), _row(["---", "---:", "---:", "---"])]
    for t in doc.get("targets") or targets(doc):
        unit = f" {t['unit']}" if t["unit"].isalpha() else t["unit"]
        digits = 0 if t["goal"] >= 100 else 2
        goal = ("≥ " if t["higher_is_better"] else "≤ ") + f"{fmt(t['goal'], digits)}{unit}"
        value = "not measured" if t["value"] is None else f"{fmt(t['value'], digits)}{unit}"
        verdict = {True: "PASS", False: "MISS", None: "—"}[t["met"]]
        lines.append(_row([f"{t['target']} ({t['measured_as']})", goal, value, verdict]))
    return "\n".join(lines)


def footnotes(doc: Doc) -> list[str]:
    notes = []
    meta = doc.get("meta", {})
    x = meta.get("x25519")
    if x:
        per_hs = 3 * x["dh_us"] + x["base_us"]  # es, ee, se + the responder's ephemeral
        notes.append(
            f"X25519 with the bindings shardwg uses (timeit, best of 5): {x['dh_us']:.1f} µs per "
            f"DH, {x['base_us']:.1f} µs per public key. A responder does 3 DH + 1 public key per "
            f"handshake ({per_hs:.0f} µs): at most {1e6 / per_hs:,.0f} handshakes per "
            f"core-second before any hashing, AEAD or Python. The generator makes one initiation "
            f"in {x['initiation_us']:.0f} µs, before the timed window."
        )
    reps = meta.get("reps")
    notes.append(
        f"Medians of {reps} repetition(s), configurations alternating within each repetition; "
        "`A receives`: iperf3 client in B sends to the server in A; `A sends`: the same with -R. "
        "In shardwg<->wg-go, A is shardwg. CPU is utime+stime from /proc of each end's "
        "tunnel processes (wireguard-go; shardwg supervisor + its worker children) over the "
        "run, divided by the Gbit/s. UDP: iperf3 -u -l 1392 -w 4M, offered rate doubled from 50 "
        "Mbit/s until loss > 1%, then two bisection steps. `veth, no tunnel` is the same test "
        "without WireGuard: the ceiling of this machine and of iperf3 itself."
    )
    micro = meta.get("micro")
    if micro and "micro" in (doc.get("sections") or {}):
        native = ("native kernel built" if micro.get("native_built") else
                  "native kernel not built: no native row")  # fmt: skip
        if not micro.get("kernel_ops"):
            native = "this tree has no batch-kernel microbenchmark yet: no kernel rows"
        notes.append(
            f"Microbenchmark: {micro['packet_bytes']}-byte IP packets in batches of "
            f"{micro['batch']}, no syscalls; packets per CPU-second of the benchmarking thread, "
            "so other load on the machine does not count. Per-packet Python path: two in-memory "
            f"devices after a real handshake, {micro.get('batches', '?')} batches per "
            "repetition, every message opened fresh. Batch kernel rows: "
            "shardwg.datapath.microbench (seal = 64 single packets per call; TSO = two "
            f"32-segment super-packets); {native}."
        )
    if meta.get("shardwg_datapath"):
        notes.append(f"shardwg at {meta.get('shardwg_commit', '?')}, data path: "
                     f"{meta['shardwg_datapath']}.")  # fmt: skip
    wg = meta.get("wireguard_go")
    if wg:
        pkg = f", Debian package {wg['debian_package']}" if wg.get("debian_package") else ""
        notes.append(f"wireguard-go raced: {wg['version']} ({wg['path']}{pkg}).")
    la0, la1 = meta.get("loadavg_start"), meta.get("loadavg_end")
    if la0 and la1:
        notes.append(f"Load average (1 min) {la0[0]:.2f} at the start, {la1[0]:.2f} at the end; "
                     "above ~0.5 at the start means something else was running.")  # fmt: skip
    errs = doc.get("errors") or []
    if errs:
        notes.append(f"{len(errs)} measurement(s) failed and are left out: see `errors` in the "
                     "JSON.")  # fmt: skip
    return notes


def markdown(doc: Doc) -> str:
    wg = (doc.get("meta") or {}).get("wireguard_go") or {}
    against = f" (wireguard-go {wg['version']})" if wg.get("version") else ""
    pairs = pair_table(doc)
    parts = [f"### Tunnels{against}", pairs] if pairs.count("\n") > 1 else []
    micro = micro_table(doc)
    if micro:
        parts += ["### Microbenchmark: open and seal per packet, one core, no syscalls", micro]
    hs = handshake_table(doc)
    if hs:
        parts += ["### Handshakes (valid initiations from 256 peers, ≤ 64 unanswered at once)", hs]
    sc = scaling_table(doc)
    if sc:
        parts += ["### Scaling: 1 vs 2 workers, 4 wireguard-go peers", sc]
    op = onepeer_table(doc)
    if op:
        parts += ["### One peer over 1 and 2 workers (`shardwg-<peer> <workers> spread "
                  "<setting> <streams> <direction>`)", op]
    parts += ["### Targets", targets_table(doc)]
    parts += ["\n".join(f"- {n}" for n in footnotes(doc))]
    return "\n\n".join(parts) + "\n"


def write_outputs(doc: Doc, out: Path) -> list[str]:
    """bench.json, bench.md and bench.png in out; returns notes about what could not be made."""
    from lab import bench_chart

    out.mkdir(parents=True, exist_ok=True)
    notes = []
    (out / "bench.md").write_text(markdown(doc))
    try:
        bench_chart.chart(doc, out / "bench.png")
        doc["meta"]["chart"] = "bench.png"
    except ImportError:
        doc["meta"]["chart"] = None
        notes.append("no chart: matplotlib is not installed (pip install '.[bench]')")
    (out / "bench.json").write_text(json.dumps(doc, indent=1, allow_nan=False, default=_json_num))
    return notes


def _json_num(o: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {o!r}")


def finite(doc: Any) -> Any:
    """inf/nan (a zero-throughput division) become null: JSON has no such numbers."""
    if isinstance(doc, float):
        return doc if doc == doc and abs(doc) != float("inf") else None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [finite(v) for v in doc]
    return doc
