"""The gateway's command line and environment: what `python -m shardwg run` gets.

Worker count (SHARDWG_WORKERS, "auto": usable cores capped by the cgroup CPU quota),
log format, metrics address (when this shardwg has --metrics), and an environment
without the WG_* variables, so no key lingers in the gateway's /proc/<pid>/environ.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from shardwg.container.environment import FOREIGN_VARS, EntrypointError, env_value
from shardwg.container.plan import Plan
from shardwg.observe.cpus import cgroup_cpu_limit, default_workers
from shardwg.shm import ordering

MAX_WORKERS = 256


def worker_count(env: Mapping[str, str]) -> int | None:
    """SHARDWG_WORKERS as a number, or for auto/unset the usable cores capped by the cgroup
    quota when there is one (None: leave it to shardwg run); 1 off x86-64."""
    value = env_value(env, "SHARDWG_WORKERS")
    if value is None or value.lower() == "auto":
        if not ordering.multi_worker_ok():
            return 1  # more than one worker needs x86-64 (shm/ordering.py)
        limit = cgroup_cpu_limit()
        if limit is None:
            return None
        return min(default_workers(limit=limit), MAX_WORKERS)
    if not value.isdigit() or not 1 <= int(value) <= MAX_WORKERS:
        raise EntrypointError(f"SHARDWG_WORKERS must be auto or 1..{MAX_WORKERS}, not {value!r}")
    return int(value)


def run_supports(option: str) -> bool:
    """Whether this shardwg's `run` subcommand has `option` (e.g. --metrics)."""
    from shardwg.cli import build_parser

    for action in build_parser()._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and "run" in choices:
            run_parser = choices["run"]
            return isinstance(run_parser, argparse.ArgumentParser) and any(
                option in a.option_strings for a in run_parser._actions
            )
    return False


def run_command(p: Plan, env: Mapping[str, str], extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "shardwg", "run", "--config", p.config_path]
    if p.interface != Path(p.config_path).stem:
        cmd += ["--interface", p.interface]
    workers = worker_count(env)
    if workers is not None:
        cmd += ["--workers", str(workers)]
    fmt = log_format(env)
    if fmt == "json":
        cmd += ["--log-format", "json"]
    metrics = env_value(env, "SHARDWG_METRICS")
    if metrics is not None:
        if run_supports("--metrics"):
            cmd += ["--metrics", metrics]
        else:
            p.warnings.append("this shardwg has no --metrics option: SHARDWG_METRICS ignored")
    return cmd + extra


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment the gateway inherits: without the WG_* variables this entrypoint
    consumed (keys must not linger in /proc/<pid>/environ)."""
    return {k: v for k, v in env.items() if not k.startswith("WG_") or k in FOREIGN_VARS}


def log_format(env: Mapping[str, str]) -> str:
    fmt = (env.get("SHARDWG_LOG_FORMAT") or "text").strip().lower()
    if fmt not in ("text", "json"):
        raise EntrypointError(f"SHARDWG_LOG_FORMAT must be text or json, not {fmt!r}")
    return fmt
