"""Imports point one way: the sans-IO core never imports I/O, processes or outer layers."""

from __future__ import annotations

import ast
from pathlib import Path

PROTO = Path(__file__).resolve().parent.parent / "shardwg" / "proto"
FORBIDDEN = {
    "socket", "os", "time", "select", "selectors", "posix_ipc", "pyroute2", "subprocess",
    "threading", "multiprocessing", "signal", "mmap", "fcntl", "asyncio",
}  # fmt: skip
OUTER = ("shardwg.io", "shardwg.shm", "shardwg.engine", "shardwg.cli", "shardwg.uapi",
         "shardwg.observe", "shardwg.container", "shardwg.config", "lab")  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_proto_is_sans_io() -> None:
    files = sorted(PROTO.glob("*.py"))
    assert len(files) > 10
    for path in files:
        for mod in imported_modules(path):
            top = mod.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {mod}"
            assert not mod.startswith(OUTER), f"{path.name} imports outer layer {mod}"


def test_checker_would_catch_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\nfrom shardwg.io import tun\n")
    assert {"socket", "shardwg.io"} <= imported_modules(bad)
