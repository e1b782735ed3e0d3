"""The benchmark's outputs from its JSON document: markdown tables with ratios, the targets with
PASS/MISS, and a PNG chart. Pure functions of the document, so a saved bench.json can be
re-rendered (`python -m lab.bench --render bench-out/bench.json`).

Document shape: doc["sections"][section][config][metric] = {"unit", "samples", "median", "min",
"max"}; ratios are of medians from the same run.
"""

from __future__ import annotations

import math
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


# (label, section, metric, digits)
PAIR_ROWS: list[tuple[str, str, str, int]] = [
    ("TCP, 1 stream (Gbit/s)", "tcp1", "gbit_s", 3),
    ("TCP, 4 streams (Gbit/s)", "tcp4", "gbit_s", 3),
    ("UDP, best rate at ≤1% loss (packets/s)", "udp", "best_pps", 0),
    ("UDP, that rate (Mbit/s)", "udp", "best_mbit_s", 1),
    ("idle ping RTT (ms, median)", "rtt", "ms", 3),
    ("CPU, end A (receiver), cores per Gbit/s, TCP 1", "cpu", "tcp1_cores_per_gbit_a", 2),
    ("CPU, end B (sender), cores per Gbit/s, TCP 1", "cpu", "tcp1_cores_per_gbit_b", 2),
    ("CPU, end A, cores per Gbit/s, TCP 4", "cpu", "tcp4_cores_per_gbit_a", 2),
    ("machine busy during TCP 1 (% of all CPUs)", "tcp1", "machine_busy_pct", 0),
    ("RSS, end A, all processes (MiB)", "rss", "rss_mib_a", 1),
    ("PSS, end A, all processes (MiB)", "rss", "pss_mib_a", 1),
    ("RSS, end B, all processes (MiB)", "rss", "rss_mib_b", 1),
]


def pair_table(doc: Doc) -> str:
    head = ["", LABELS["veth"], LABELS[WG], LABELS[SW], "vs wg-go", LABELS[SS], "vs wg-go"]
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for label, section, metric, digits in PAIR_ROWS:
        vals = {c: med(doc, section, c, metric) for c in ("veth", WG, SW, SS)}
        if all(v is None for v in vals.values()):
            continue
        lines.append(_row([
            label, fmt(vals["veth"], digits), fmt(vals[WG], digits), fmt(vals[SW], digits),
            fx(ratio(vals[SW], vals[WG])), fmt(vals[SS], digits), fx(ratio(vals[SS], vals[WG])),
        ]))  # fmt: skip
    return "\n".join(lines)


def handshake_table(doc: Doc) -> str:
    sec = doc["sections"].get("handshakes") or {}
    if not sec:
        return ""
    head = ["responder", "handshakes/s", "vs wireguard-go", "responder cores",
            "handshakes per core-second", "median answer (ms)", "cookie replies",
            "timeouts"]  # fmt: skip
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
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
    sec = doc["sections"].get("scaling") or {}
    if not sec:
        return ""
    head = ["shardwg workers", "aggregate Gbit/s (4 peers × 1 TCP stream)", "slowest peer Gbit/s",
            "gateway cores", "wireguard-go peers' cores", "machine busy",
            "vs 1 worker"]  # fmt: skip
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    one = med(doc, "scaling", "shardwg-1w", "gbit_s")
    for cfg, n in (("shardwg-1w", "1"), ("shardwg-2w", "2")):
        if cfg in sec:
            g = med(doc, "scaling", cfg, "gbit_s")
            slowest = med(doc, "scaling", cfg, "min_peer_gbit_s")
            cores = med(doc, "scaling", cfg, "cores")
            peers = med(doc, "scaling", cfg, "peer_cores")
            busy = med(doc, "scaling", cfg, "machine_busy_pct")
            busy_text = "—" if busy is None else f"{busy:.0f}%"
            lines.append(_row([n, fmt(g, 3), fmt(slowest, 3), fmt(cores), fmt(peers), busy_text,
                               fx(ratio(g, one))]))  # fmt: skip
    return "\n".join(lines)


def targets(doc: Doc) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it was met (None: not measured)."""
    rtt_sw, rtt_wg = med(doc, "rtt", SW, "ms"), med(doc, "rtt", WG, "ms")
    rows: list[tuple[str, str, float | None, float, str, bool]] = [
        # (name, how it is measured, value, goal, unit, higher is better)
        ("shardwg<->wg-go TCP 1 stream vs wg-go<->wg-go", "ratio of medians",
         ratio(med(doc, "tcp1", SW, "gbit_s"), med(doc, "tcp1", WG, "gbit_s")), 2.0, "x", True),
        ("shardwg<->shardwg TCP 1 stream vs wg-go<->wg-go", "ratio of medians",
         ratio(med(doc, "tcp1", SS, "gbit_s"), med(doc, "tcp1", WG, "gbit_s")), 3.0, "x", True),
        ("shardwg<->wg-go UDP packets/s at ≤1% loss vs wg-go<->wg-go", "ratio of medians",
         ratio(med(doc, "udp", SW, "best_pps"), med(doc, "udp", WG, "best_pps")), 2.0, "x", True),
        ("shardwg CPU per Gbit/s (end A of shardwg<->wg-go, TCP 1 stream)", "cores per Gbit/s",
         med(doc, "cpu", SW, "tcp1_cores_per_gbit_a"), 0.5, "cores", False),
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
        "end A receives (iperf3 server), end B sends. CPU is utime+stime from /proc of the "
        "tunnel processes (wireguard-go; shardwg supervisor + its worker children). UDP: "
        f"iperf3 -u -l 1392 -w 4M, offered rate doubled from 50 Mbit/s until loss > 1%, then two "
        "bisection steps. `veth, no tunnel` is the same test without WireGuard: the ceiling of "
        "this machine and of iperf3 itself."
    )
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
    parts = ["### Tunnels", pair_table(doc)]
    hs = handshake_table(doc)
    if hs:
        parts += ["### Handshakes (valid initiations from 256 peers, ≤ 64 unanswered at once)", hs]
    sc = scaling_table(doc)
    if sc:
        parts += ["### Scaling: 1 vs 2 workers, 4 wireguard-go peers", sc]
    parts += ["### Targets", targets_table(doc)]
    parts += ["\n".join(f"- {n}" for n in footnotes(doc))]
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ chart

PANELS: list[tuple[str, str, str, list[str]]] = [
    # (title, section, metric, configs)
    ("TCP, 1 stream (Gbit/s)", "tcp1", "gbit_s", [WG, SW, SS]),
    ("TCP, 4 streams (Gbit/s)", "tcp4", "gbit_s", [WG, SW, SS]),
    ("UDP at ≤1% loss (kpackets/s)", "udp", "best_pps", [WG, SW, SS]),
    ("idle ping RTT (ms)", "rtt", "ms", [WG, SW, SS]),
    ("receiver CPU, cores per Gbit/s (TCP 1)", "cpu", "tcp1_cores_per_gbit_a", [WG, SW, SS]),
    ("memory of end A, PSS (MiB)", "rss", "pss_mib_a", [WG, SW, SS]),
    ("handshakes per second", "handshakes", "per_s", ["wggo", "shardwg-1w", "shardwg-2w"]),
    ("4 peers, aggregate Gbit/s", "scaling", "gbit_s", ["shardwg-1w", "shardwg-2w"]),
]
COLORS = {"veth": "#9e9e9e", WG: "#4e79a7", SW: "#f28e2b", SS: "#e15759", "wggo": "#4e79a7",
          "shardwg-1w": "#f28e2b", "shardwg-2w": "#e15759"}  # fmt: skip
SHORT = {"veth": "veth", WG: "wg-go\n↔wg-go", SW: "shardwg\n↔wg-go", SS: "shardwg\n↔shardwg",
         "wggo": "wg-go", "shardwg-1w": "shardwg\n1 worker",
         "shardwg-2w": "shardwg\n2 workers"}  # fmt: skip


def chart(doc: Doc, path: Path) -> Path:
    """Bars of medians, min–max whiskers, one dot per repetition; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 8))
    for ax, (title, section, metric, configs) in zip(axes.flat, PANELS, strict=True):
        scale = 1e-3 if metric == "best_pps" else 1.0
        shown = []
        for c in configs:
            s = doc["sections"].get(section, {}).get(c, {}).get(metric)
            if s and s["median"] is not None and math.isfinite(s["median"]):
                shown.append((c, s))
        ax.set_title(title, fontsize=10)
        if not shown:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        xs = list(range(len(shown)))
        meds = [s["median"] * scale for _c, s in shown]
        lo = [max(0.0, (s["median"] - s["min"]) * scale) for _c, s in shown]
        hi = [max(0.0, (s["max"] - s["median"]) * scale) for _c, s in shown]
        ax.bar(xs, meds, yerr=[lo, hi], capsize=4, color=[COLORS[c] for c, _s in shown])
        for x, (_c, s) in zip(xs, shown, strict=True):
            ax.scatter([x] * len(s["samples"]), [v * scale for v in s["samples"]], s=10,
                       color="black", zorder=3)  # fmt: skip
        for x, m in zip(xs, meds, strict=True):
            text = f"{m:,.0f}" if m >= 100 else f"{m:.3g}"
            ax.annotate(text, (x, m), ha="left", va="bottom", fontsize=8, xytext=(4, 1),
                        textcoords="offset points")  # fmt: skip
        ax.set_xticks(xs, [SHORT[c] for c, _s in shown], fontsize=8)
        ax.margins(y=0.15)
    meta = doc.get("meta", {})
    machine = meta.get("machine", {})
    fig.suptitle(f"shardwg benchmark — {meta.get('date', '')}, {machine.get('cpu', '')} × "
                 f"{machine.get('cores', '?')} cores, medians of {meta.get('reps', '?')} "
                 "(dots: each repetition)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
