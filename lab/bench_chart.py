"""The benchmark's chart (bench.png) from its JSON document: one panel per quantity, bars of
medians with min-max whiskers and a dot per repetition. Needs matplotlib (pip install '.[bench]').
"""

from __future__ import annotations

import math
from pathlib import Path

from lab.bench_report import SS, SW, WG, Doc

PANELS: list[tuple[str, str, str, list[str]]] = [
    # (title, section, metric, configs)
    ("TCP, 1 stream, A receives (Gbit/s)", "tcp1", "gbit_s", [WG, SW, SS]),
    ("TCP, 1 stream, A sends (Gbit/s)", "tcp1_send", "gbit_s", [WG, SW, SS]),
    ("TCP, 4 streams, A receives (Gbit/s)", "tcp4", "gbit_s", [WG, SW, SS]),
    ("UDP at ≤1% loss, A receives (kpackets/s)", "udp", "best_pps", [WG, SW, SS]),
    ("UDP at ≤1% loss, A sends (kpackets/s)", "udp_send", "best_pps", [WG, SW, SS]),
    ("idle ping RTT (ms)", "rtt", "ms", [WG, SW, SS]),
    ("receiver CPU, cores per Gbit/s (TCP 1)", "cpu", "tcp1_cores_per_gbit_a", [WG, SW, SS]),
    ("memory of end A, PSS (MiB)", "rss", "pss_mib_a", [WG, SW, SS]),
    ("handshakes per second", "handshakes", "per_s", ["wggo", "shardwg-1w", "shardwg-2w"]),
    ("4 peers, aggregate Gbit/s", "scaling", "gbit_s", ["shardwg-1w", "shardwg-2w"]),
    ("microbenchmark: open (kpackets/s, 1 core)", "micro", "open_pps",
     ["native", "python-batch", "python"]),
    ("microbenchmark: seal (kpackets/s, 1 core)", "micro", "seal_pps",
     ["native", "python-batch", "python", "aead"]),
]
COLORS = {"veth": "#9e9e9e", WG: "#4e79a7", SW: "#f28e2b", SS: "#e15759", "wggo": "#4e79a7",
          "shardwg-1w": "#f28e2b", "shardwg-2w": "#e15759", "native": "#59a14f",
          "python-batch": "#b07aa1", "python": "#edc948", "aead": "#9e9e9e"}  # fmt: skip
SHORT = {"veth": "veth", WG: "wg-go\n↔wg-go", SW: "shardwg\n↔wg-go", SS: "shardwg\n↔shardwg",
         "wggo": "wg-go", "shardwg-1w": "shardwg\n1 worker",
         "shardwg-2w": "shardwg\n2 workers", "native": "native\nbatch",
         "python-batch": "Python\nbatch", "python": "Python\nper packet",
         "aead": "bare AEAD\n(Python)"}  # fmt: skip


def chart(doc: Doc, path: Path) -> Path:
    """Bars of medians, min–max whiskers, one dot per repetition; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 4, figsize=(17, 12))
    for ax, (title, section, metric, configs) in zip(axes.flat, PANELS, strict=True):
        scale = 1e-3 if metric.endswith("_pps") else 1.0
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
    wg = meta.get("wireguard_go") or {}
    against = f", against wireguard-go {wg['version']}" if wg.get("version") else ""
    fig.suptitle(f"shardwg benchmark — {meta.get('date', '')}, {machine.get('cpu', '')} × "
                 f"{machine.get('cores', '?')} cores{against}, medians of "
                 f"{meta.get('reps', '?')} (dots: each repetition)", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
