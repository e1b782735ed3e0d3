"""Which data path implementation runs: the native kernel when it is built and not turned
off with SHARDWG_NATIVE=0, else the pure-Python reference. Decided once per process."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

ENV = "SHARDWG_NATIVE"


@dataclass(frozen=True)
class Impl:
    """One implementation of the batch functions, and how to describe it to an operator."""

    name: str  # "native" or "python"
    detail: str  # the OpenSSL version, or why the Python path runs
    open_batch: Any
    new_keys: Any  # () -> a per-session cipher context holder (set/clear)
    seal_run: Any  # one run of TUN reads for one peer -> one GSO run of sealed datagrams
    sealer: Any  # (key) -> the per-session send cipher context seal_run takes


def _python(why: str) -> Impl:
    from shardwg.datapath import open_ref, seal_ref

    return Impl(
        "python", why, open_ref.open_batch, open_ref.RefKeys, seal_ref.seal_run, seal_ref.Sealer
    )


def native_module() -> ModuleType | None:
    try:
        return importlib.import_module("shardwg.datapath._native")
    except ImportError:
        return None


def choose(env: str | None = None) -> Impl:
    """Native unless SHARDWG_NATIVE=0 or the extension is missing; SHARDWG_NATIVE=1 makes a
    missing extension an error instead of a fallback."""
    want = os.environ.get(ENV, "") if env is None else env
    if want == "0":
        return _python(f"{ENV}=0")
    mod = native_module()
    if mod is None:
        if want == "1":
            raise ImportError(f"{ENV}=1 but shardwg.datapath._native is not built")
        return _python("the native extension is not built (pip install needs a C compiler and "
                       "libssl-dev)")  # fmt: skip
    return Impl(
        "native", str(mod.OPENSSL_VERSION), mod.open_batch, mod.OpenKeys, mod.seal_run, mod.Sealer
    )


def python_impl() -> Impl:
    return _python("asked for")


_CHOSEN: Impl | None = None


def current() -> Impl:
    """The implementation this process uses (chosen on first use)."""
    global _CHOSEN
    if _CHOSEN is None:
        _CHOSEN = choose()
    return _CHOSEN


def describe(impl: Impl | None = None) -> str:
    impl = impl or current()
    return f"{impl.name} ({impl.detail})"
