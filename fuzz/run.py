"""Fuzz campaign runner: `python fuzz/run.py [--target NAME] [--seconds N] [--engine E]`.

Engines: `hypothesis` (always available; structure-aware strategies that start from
the seed corpus and mutate it) and `atheris` (coverage-guided libFuzzer, if the
package is installed; run in a child process because libFuzzer owns its process).
Every crash or broken property is written to fuzz/crashes/ as `<target>-<sha>.bin`
with a `.txt` traceback, and checked for reproducing on fresh worlds.
Other commands: `--reproduce FILE` runs one input, `--make-corpus` rewrites the seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python fuzz/run.py` puts fuzz/ first, not the repo
    sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, Verbosity, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz import targets  # noqa: E402

CRASH_DIR = Path(__file__).resolve().parent / "crashes"
WORK_DIR = Path(__file__).resolve().parent / "work"
SLOW_SECONDS = 1.0  # one input taking this long is a denial-of-service finding
BATCH_EXAMPLES = 1000  # hypothesis examples per batch; the deadline is checked between

# --------------------------------------------------------------------------- strategies

_INTERESTING = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x7F, 0x80, 0xFE, 0xFF]


@st.composite
def corpus_mutant(draw: Any, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level edits (flip, set, insert, delete, truncate, splice)."""
    buf = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 6))
        pos = draw(st.integers(0, len(buf)))
        if kind == 0 and buf:
            buf[pos % len(buf)] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1 and buf:
            buf[pos % len(buf)] = draw(st.sampled_from(_INTERESTING) | st.integers(0, 255))
        elif kind == 2:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == 3:
            del buf[pos : pos + draw(st.integers(1, 16))]
        elif kind == 4:
            del buf[pos:]
        elif kind == 5:
            other = draw(st.sampled_from(seeds))
            cut = draw(st.integers(0, len(other)))
            buf = buf[:pos] + bytearray(other[cut:])
        elif kind == 6 and buf:
            start = pos % len(buf)
            buf[start:start] = buf[start : start + draw(st.integers(1, 64))]
    return bytes(buf)


def _ops(max_pos: int) -> st.SearchStrategy[bytes]:
    """`targets.mutate` ops aimed inside a message of about `max_pos` bytes."""
    op = st.tuples(
        st.integers(0, 255),
        st.integers(0, max_pos) | st.sampled_from([0, 3, 4, 7, 8, 11, 12, 16, 60, 76, 116, 132]),
        st.sampled_from(_INTERESTING) | st.integers(0, 255),
    )
    return st.lists(op, max_size=6).map(
        lambda ops: b"".join(bytes([k, p & 0xFF, p >> 8, v]) for k, p, v in ops)
    )


def _handshake_inputs() -> st.SearchStrategy[bytes]:
    return st.builds(lambda sel, ops: bytes([sel]) + ops, st.integers(0, 15), _ops(160))


def _transport_inputs() -> st.SearchStrategy[bytes]:
    jump = st.integers(0, 9000) | st.sampled_from([0, 1, 8126, 8127, 8128, 8129, 8191])
    return st.builds(
        lambda sel, size, j, ops: bytes([sel, size]) + j.to_bytes(2, "little") + ops,
        st.integers(0, 15),
        st.integers(0, 255),
        jump,
        _ops(1400),
    )


def _datagram_inputs() -> st.SearchStrategy[bytes]:
    """A well-typed header with any size and body, so the fuzz gets past classify."""
    size = st.sampled_from([31, 32, 33, 48, 63, 64, 65, 91, 92, 93, 147, 148, 149]) | st.integers(
        0, 1500
    )
    return st.builds(
        lambda t, n, body: (bytes([t, 0, 0, 0]) + body * (n // max(1, len(body)) + 1))[:n],
        st.sampled_from([1, 2, 3, 4]),
        size,
        st.binary(min_size=1, max_size=64),
    )


_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE="
_CONFIG_KEYS = {
    "PrivateKey": [_KEY, "AAAA", ""],
    "ListenPort": ["51820", "0", "65536", "-1", "0x10"],
    "FwMark": ["0x1234", "off", "0x", "4294967296", "1234"],
    "Address": ["10.0.0.1/24, fd00::1/64", "1.2.3.4", "fe80::1%eth0/64", "300.0.0.1"],
    "DNS": ["1.1.1.1, example.com", ""],
    "MTU": ["1280", "575", "65535", "1420"],
    "Table": ["off", "auto", "1234", "main"],
    "SaveConfig": ["true", "false", "yes"],
    "PostUp": ["echo up", "a\rb", "x = y"],
    "PublicKey": [_KEY, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", ""],
    "PresharedKey": [_KEY],
    "AllowedIPs": ["10.0.0.0/24, ::/0", "", "10.0.0.1/33", "1.2.3.4/255.0.0.0", "::1/128,"],
    "Endpoint": ["1.2.3.4:51820", "[fd00::1]:1", "host.example:65535", "[::1", "a:b:c:1"],
    "PersistentKeepalive": ["25", "off", "65536"],
}


def _config_inputs() -> st.SearchStrategy[bytes]:
    def cased(s: str) -> st.SearchStrategy[str]:
        return st.sampled_from([s, s.lower(), s.upper()])

    kv = st.sampled_from(sorted(_CONFIG_KEYS)).flatmap(
        lambda k: st.tuples(cased(k), st.sampled_from(_CONFIG_KEYS[k]) | st.text(max_size=20)).map(
            lambda kv: f"{kv[0]} = {kv[1]}"
        )
    )
    line = (
        cased("[Interface]")
        | cased("[Peer]")
        | kv
        | st.sampled_from(["", "# comment", "\ufeff", "[Other]", "key"])
        | st.text(max_size=30)
    )
    return st.builds(
        lambda lines, nl: nl.join(lines).encode("utf-8", "surrogatepass"),
        st.lists(line, max_size=20),
        st.sampled_from(["\n", "\r\n"]),
    )


_HEX = "00" * 31 + "01"
_UAPI_VALUES = {
    "private_key": [_HEX, "0" * 64, "zz", _HEX.upper()],
    "listen_port": ["51820", "65536", "007", ""],
    "fwmark": ["0", "4294967295", "4294967296"],
    "replace_peers": ["true", "false"],
    "public_key": [_HEX, "ab" * 32, "x"],
    "update_only": ["true"],
    "remove": ["true", "1"],
    "preshared_key": ["0" * 64, _HEX],
    "endpoint": ["1.2.3.4:5", "[::1]:5", "[fe80::1%eth0]:1", "::1:5", "[1.2.3.4]:5", "a:1"],
    "persistent_keepalive_interval": ["25", "65535", "65536"],
    "replace_allowed_ips": ["true"],
    "allowed_ip": ["10.0.0.0/8", "::/0", "1.2.3.4/33", "01.2.3.4/8", "fe80::%1/64", "1.2.3.4"],
    "protocol_version": ["1", "2"],
}


def _uapi_inputs() -> st.SearchStrategy[bytes]:
    line = st.sampled_from(sorted(_UAPI_VALUES)).flatmap(
        lambda k: st.tuples(st.just(k), st.sampled_from(_UAPI_VALUES[k]) | st.text(max_size=12))
    ).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=20)
    request = st.just("get=1\n\n") | st.lists(line, max_size=8).map(
        lambda lines: "set=1\n" + "".join(x + "\n" for x in lines) + "\n"
    )
    return st.lists(request, min_size=1, max_size=4).map(
        lambda reqs: "".join(reqs).encode("utf-8", "surrogatepass")
    )


@st.composite
def _seal_inputs(draw: Any) -> bytes:
    """Knobs + a few packets: good super-packets with bytes edited, or raw ones."""
    from fuzz.targets.seal import encode, seeds

    good = list(seeds().values())
    buf = bytearray(draw(st.sampled_from(good)))
    for _ in range(draw(st.integers(0, 8))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        buf = buf[: draw(st.integers(0, len(buf)))]
    if draw(st.booleans()):
        raws = draw(st.lists(st.binary(min_size=20, max_size=200), max_size=3))
        buf = bytearray(encode(raws, bytes(buf[:8]).ljust(8, b"\0")))
    return bytes(buf)


_STRUCTURED = {
    "datagram": _datagram_inputs,
    "mutated_handshake": _handshake_inputs,
    "transport": _transport_inputs,
    "config": _config_inputs,
    "uapi": _uapi_inputs,
    "seal": _seal_inputs,
}


def input_strategy(target: str, seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Raw bytes, mutated seeds and (where it helps) inputs shaped like the format."""
    parts: list[st.SearchStrategy[bytes]] = [st.binary(max_size=512)]
    if seeds:
        parts.append(corpus_mutant(seeds))
    if target in _STRUCTURED:
        parts.append(_STRUCTURED[target]())
    return st.one_of(parts)


# --------------------------------------------------------------------------- running


@dataclass
class Finding:
    target: str
    data: bytes
    trace: str
    signature: str
    reproduces: bool
    path: Path | None = None
    slow: float = 0.0


@dataclass
class Report:
    target: str
    engine: str
    execs: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    note: str = ""

    def line(self) -> str:
        rate = self.execs / self.seconds if self.seconds else 0.0
        text = (
            f"{self.target:18} {self.engine:10} {self.execs:9d} execs {self.seconds:7.1f} s "
            f"{rate:8.0f}/s  slowest {self.slowest * 1000:7.1f} ms  findings {len(self.findings)}"
        )
        return text + (f"  ({self.note})" if self.note else "")


def _signature(exc: BaseException) -> str:
    """Exception type and the innermost frame in shardwg (else the innermost at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "shardwg" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__}@{where}"


def _reproduces(target: str, data: bytes) -> bool:
    targets.reset_worlds()
    try:
        targets.TARGETS[target](data)
    except Exception:
        return True
    finally:
        targets.reset_worlds()
    return False


def save_finding(f: Finding, crash_dir: Path = CRASH_DIR) -> Path:
    """Write the reproducer (.bin) and the traceback and replay command (.txt)."""
    crash_dir.mkdir(parents=True, exist_ok=True)
    prefix = "slow" if f.slow else "crash"
    name = f"{f.target}-{prefix}-{hashlib.sha1(f.data).hexdigest()[:12]}"
    path = crash_dir / f"{name}.bin"
    path.write_bytes(f.data)
    (crash_dir / f"{name}.txt").write_text(
        f"target: {f.target}\nsignature: {f.signature}\nreproduces on fresh worlds: "
        f"{f.reproduces}\ninput ({len(f.data)} bytes): {f.data.hex()}\n"
        f"replay: python fuzz/run.py --target {f.target} --reproduce {path}\n\n{f.trace}"
    )
    f.path = path
    return path


class _Executor:
    """Runs one target, counting execs, timing them and remembering the last failure."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.fn = targets.TARGETS[target]
        self.execs = 0
        self.slowest = 0.0
        self.slow_input: tuple[bytes, float] | None = None
        self.last_failure: tuple[bytes, BaseException, str] | None = None

    def __call__(self, data: bytes) -> None:
        self.execs += 1
        t0 = time.perf_counter()
        try:
            self.fn(data)
        except Exception as exc:
            self.last_failure = (data, exc, traceback.format_exc())
            raise
        finally:
            dt = time.perf_counter() - t0
            if dt > self.slowest:
                self.slowest = dt
                if dt > SLOW_SECONDS:
                    self.slow_input = (data, dt)

    def finding(self) -> Finding | None:
        if self.last_failure is None:
            return None
        data, exc, trace = self.last_failure
        self.last_failure = None
        return Finding(self.target, data, trace, _signature(exc), _reproduces(self.target, data))


def run_hypothesis(target: str, seconds: float, quiet: bool = False) -> Report:
    """Seeds first, then hypothesis batches until the time is up; one file per new bug."""
    report = Report(target, "hypothesis")
    ex = _Executor(target)
    seen: set[str] = set()
    start = time.monotonic()

    def record(f: Finding | None) -> None:
        if f is None or f.signature in seen:
            return
        seen.add(f.signature)
        save_finding(f)
        report.findings.append(f)
        if not quiet:
            print(f"  FINDING {f.signature} reproduces={f.reproduces} -> {f.path}", flush=True)

    corpus = targets.load_corpus(target)
    for _name, blob in corpus:
        try:
            ex(blob)
        except Exception:
            record(ex.finding())
    strategy = input_strategy(target, [b for _n, b in corpus])
    end = start + seconds

    @settings(
        max_examples=BATCH_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
    )
    @given(strategy)
    def batch(data: bytes) -> None:
        ex(data)

    while time.monotonic() < end:
        try:
            batch()
        except Exception:
            record(ex.finding())
    if ex.slow_input is not None:
        data, dt = ex.slow_input
        record(Finding(target, data, f"took {dt:.2f} s", f"slow@{dt:.1f}s", True, slow=dt))
    report.execs, report.slowest = ex.execs, ex.slowest
    report.seconds = time.monotonic() - start
    return report


def run_atheris(target: str, seconds: float, quiet: bool = False) -> Report:
    """libFuzzer through atheris in a child process; parses its final stats."""
    report = Report(target, "atheris")
    try:
        import atheris  # noqa: F401
    except ImportError:
        report.note = "skipped: atheris not installed (pip install atheris)"
        return report
    work = WORK_DIR / target
    work.mkdir(parents=True, exist_ok=True)
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    before = set(CRASH_DIR.iterdir())
    args = [
        sys.executable,
        "-c",
        _ATHERIS_CHILD,
        str(ROOT),
        target,
        str(work),
        str(targets.CORPUS_DIR / target),
        f"-max_total_time={int(seconds)}",
        f"-artifact_prefix={CRASH_DIR}/{target}-",
        "-max_len=4096",
        f"-timeout={int(SLOW_SECONDS * 10)}",
        "-print_final_stats=1",
        "-rss_limit_mb=4096",
    ]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace", cwd=ROOT)
    report.seconds = time.monotonic() - start
    log = proc.stdout + proc.stderr
    (work / "last.log").write_text(log)
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    report.execs = int(m.group(1)) if m else 0
    m = re.search(r"stat::slowest_unit_time_sec:\s*(\d+)", log)
    report.slowest = float(m.group(1)) if m else 0.0
    m = re.search(r"stat::new_units_added:\s*(\d+)", log)
    report.note = f"{m.group(1)} new corpus units in {work}" if m else ""
    for path in sorted(set(CRASH_DIR.iterdir()) - before):
        if path.suffix:
            continue
        data = path.read_bytes()
        m = re.search(r"=== Uncaught Python exception: ===\n(.*?)\n\n", log, re.S)
        trace = m.group(1) if m else log[-4000:]
        last = trace.strip().splitlines()[-1] if trace.strip() else "?"
        sig = "atheris: " + last.split(":")[0]
        f = Finding(target, data, trace, sig, _reproduces(target, data))
        save_finding(f)
        report.findings.append(f)
        if not quiet:
            print(f"  FINDING (atheris) reproduces={f.reproduces} -> {path}", flush=True)
    if proc.returncode and not report.findings:
        report.note = f"libFuzzer exited {proc.returncode}; see {work / 'last.log'}"
    return report


# The child imports shardwg only inside instrument_imports, so libFuzzer sees its coverage
# (run.py itself has imported it already, uninstrumented).
_ATHERIS_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import atheris
with atheris.instrument_imports(include=["shardwg", "fuzz"]):
    from fuzz import targets
atheris.Setup([sys.argv[0], *sys.argv[3:]], targets.TARGETS[sys.argv[2]])
atheris.Fuzz()
"""


def reproduce(target: str, path: Path) -> int:
    data = path.read_bytes()
    targets.reset_worlds()
    try:
        targets.TARGETS[target](data)
    except Exception:
        traceback.print_exc()
        return 1
    print(f"{path}: no failure")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", choices=sorted(targets.TARGETS))
    ap.add_argument("--seconds", type=float, default=60.0, help="per target and engine")
    ap.add_argument(
        "--engine", action="append", choices=["hypothesis", "atheris"], help="default: both"
    )
    ap.add_argument("--reproduce", type=Path, help="run one input file (needs one --target)")
    ap.add_argument("--make-corpus", action="store_true", help="rewrite fuzz/corpus")
    ns = ap.parse_args(argv)
    if ns.make_corpus:
        for name, n in targets.make_corpus().items():
            print(f"{name}: {n} seeds")
        return 0
    names = ns.target or list(targets.TARGETS)
    if ns.reproduce:
        return reproduce(names[0], ns.reproduce)
    engines = ns.engine or ["hypothesis", "atheris"]
    reports = []
    for name in names:
        for engine in engines:
            runner = run_hypothesis if engine == "hypothesis" else run_atheris
            print(f"fuzzing {name} with {engine} for {ns.seconds:.0f} s", flush=True)
            report = runner(name, ns.seconds)
            print(report.line(), flush=True)
            reports.append(report)
    print("\nsummary")
    for r in reports:
        print(r.line())
        for f in r.findings:
            print(f"    {f.signature} reproduces={f.reproduces} {f.path}")
    return 1 if any(r.findings for r in reports) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
