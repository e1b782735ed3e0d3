"""Imports point one way: down the floors of the house, never in a circle, never into the lab.

Floors (a package may import its own floor's modules and any lower floor, never a higher one;
sibling packages on one floor do not import each other):

  0  proto                 sans-IO protocol: no sockets, clock, processes
  1  uapi                  the `wg` configuration socket's data model, wire format and server;
                           it imports nothing of ours, and config applies a `wg set` as a
                           diff of its SetRequest, so it sits below config (the brief's sketch
                           had it beside observe)
  2  config, shm           configuration files and diffs; shared memory
  3  io                    sockets, TUN, netlink, steering, offloads (vnet, coalesce)
  4  datapath              the batch data path (its Python reference builds on io's vnet
                           and coalesce)
  5  observe               status, show, metrics (read shared memory and config; `check`
                           reports whether the native kernel is built)
  6  engine                supervisor, workers, boot, live configuration
  7  cli                   the command line
  8  container             the container entry point: it turns the environment into a
                           configuration, then runs the command line's `run` (the brief's
                           sketch had it below cli; the code builds on the cli's parser)
  9  __main__              `python -m shardwg`

The graph holds every import statement, function-local and TYPE_CHECKING ones included: a
circle through a deferred import is still a circle the reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "shardwg" / "proto"
FORBIDDEN = {
    "socket", "os", "time", "select", "selectors", "posix_ipc", "pyroute2", "subprocess",
    "threading", "multiprocessing", "signal", "mmap", "fcntl", "asyncio",
}  # fmt: skip
OUTER = ("shardwg.io", "shardwg.shm", "shardwg.engine", "shardwg.cli", "shardwg.uapi",
         "shardwg.observe", "shardwg.container", "shardwg.config", "shardwg.datapath",
         "lab")  # fmt: skip
FLOORS = {
    "shardwg": 0,  # the package's __init__ (a version string)
    "shardwg.proto": 0,
    "shardwg.uapi": 1,
    "shardwg.config": 2,
    "shardwg.shm": 2,
    "shardwg.io": 3,
    "shardwg.datapath": 4,
    "shardwg.observe": 5,
    "shardwg.engine": 6,
    "shardwg.cli": 7,
    "shardwg.container": 8,
    "shardwg.__main__": 9,
}


def imported_modules(
    path: Path, package: str = "", modules: frozenset[str] = frozenset()
) -> set[str]:
    """Absolute module names a file imports; `package` (the file's own package) resolves
    relative imports. `from pkg import a, b` yields pkg.a and pkg.b where they are in
    `modules`, and pkg itself unless every name is such a submodule."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base:
                subs = {f"{base}.{alias.name}" for alias in node.names} & modules
                found.update(subs)
                if len(subs) < len(node.names):
                    found.add(base)
    return found


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> every module it imports (any package) for the files under root/shardwg."""
    files = {module_name(root, p): p for p in sorted((root / "shardwg").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = imported_modules(path, package, frozenset(files)) - {name}
    return graph


def floor_of(module: str) -> tuple[str, int] | None:
    """(package, floor) of a shardwg module by its longest listed prefix."""
    best = None
    for pkg, floor in FLOORS.items():
        inside = module.startswith(pkg + ".") and pkg != "shardwg"  # the root: exactly
        if (module == pkg or inside) and (best is None or len(pkg) > len(best[0])):
            best = (pkg, floor)
    return best


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        here = floor_of(src)
        if here is None:
            bad.append(f"{src} is on no floor (add its package to FLOORS)")
            continue
        for dst in sorted(targets):
            there = floor_of(dst) if dst.startswith("shardwg") else None
            if there is None or there[0] == here[0] or here[0] == "shardwg":
                continue  # outside shardwg, or within one package
            if there[1] >= here[1] and there[0] != "shardwg":
                bad.append(f"{src} (floor {here[1]}) imports {dst} (floor {there[1]})")
    return bad


def lab_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{src} imports {dst}"
        for src, targets in sorted(graph.items())
        for dst in sorted(targets)
        if dst == "lab" or dst.startswith("lab.")
    ]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), among shardwg modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ---------------------------------------------------------------------- the real tree
def test_proto_is_sans_io() -> None:
    files = sorted(PROTO.glob("*.py"))
    assert len(files) > 10
    for path in files:
        for mod in imported_modules(path):
            top = mod.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {mod}"
            assert not mod.startswith(OUTER), f"{path.name} imports outer layer {mod}"


def test_every_module_sits_on_a_floor_and_imports_only_down() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 60 and "shardwg.engine.worker" in graph
    assert floor_violations(graph) == []


def test_shm_and_io_never_import_the_engine() -> None:
    graph = import_graph(ROOT)
    for src, targets in graph.items():
        if src.startswith(("shardwg.shm", "shardwg.io")):
            up = [t for t in targets if t.startswith(("shardwg.engine", "shardwg.container"))]
            assert not up, f"{src} imports {up}"


def test_the_product_never_imports_the_lab() -> None:
    assert lab_imports(import_graph(ROOT)) == []


def test_no_import_cycles() -> None:
    assert import_cycles(import_graph(ROOT)) == []


# ---------------------------------------------------------------------- the checker itself
def _plant(root: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(root)


def test_checker_would_catch_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\nfrom shardwg.io import tun\n")
    assert {"socket", "shardwg.io"} <= imported_modules(bad)


def test_checker_catches_planted_violations(tmp_path: Path) -> None:
    graph = _plant(
        tmp_path,
        {
            "shardwg/__init__.py": "",
            "shardwg/shm/__init__.py": "",
            "shardwg/shm/slot.py": "def f():\n    from shardwg.engine import boss\n",
            "shardwg/engine/__init__.py": "",
            "shardwg/engine/boss.py": "from . import helper\nimport lab.netns\n",
            "shardwg/engine/helper.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from shardwg.engine.boss import Boss\n"
            ),
            "shardwg/mystery/__init__.py": "",
        },
    )
    assert graph["shardwg.engine.boss"] == {"shardwg.engine.helper", "lab.netns"}
    assert floor_violations(graph) == [
        "shardwg.mystery is on no floor (add its package to FLOORS)",
        "shardwg.shm.slot (floor 2) imports shardwg.engine.boss (floor 6)",
    ]
    assert lab_imports(graph) == ["shardwg.engine.boss imports lab.netns"]
    assert import_cycles(graph) == [["shardwg.engine.boss", "shardwg.engine.helper"]]


def test_checker_sees_the_old_supervisor_circle(tmp_path: Path) -> None:
    """The circle this test was written against: boot and live took the Supervisor."""
    graph = _plant(
        tmp_path,
        {
            "shardwg/engine/supervisor.py": (
                "from shardwg.engine.live import LiveConfig\n"
                "def spawn():\n    from shardwg.engine.boot import boot_worker\n"
            ),
            "shardwg/engine/live.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from shardwg.engine.supervisor import Supervisor\n"
            ),
            "shardwg/engine/boot.py": (
                "def boot():\n    from shardwg.engine.supervisor import EXIT_BOOT_FAILURE\n"
            ),
            "shardwg/config/model.py": "from shardwg.io import tun\n",
            "shardwg/io/tun.py": "",
            "shardwg/io/__init__.py": "",
        },
    )
    assert import_cycles(graph) == [
        ["shardwg.engine.boot", "shardwg.engine.live", "shardwg.engine.supervisor"]
    ]
    assert floor_violations(graph) == [
        "shardwg.config.model (floor 2) imports shardwg.io.tun (floor 3)"
    ]
