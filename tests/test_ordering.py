"""More than one worker only where the shared-memory structures are sound (issue 13 item 6).

The seqlock, the handoff rings, the counters and the recv_floor word rely on
x86-64's store order (Python cannot emit barriers). On another architecture the
gateway must refuse more than one worker with a clear message, before it creates
anything, and `shardwg run` without --workers must fall back to one worker.
"""

from __future__ import annotations

import base64
import platform

import pytest

from shardwg.config.model import parse_config
from shardwg.engine import supervisor
from shardwg.engine.supervisor import Supervisor, SupervisorError

_KEY = base64.b64encode(bytes(range(1, 33))).decode()


class _WouldStart(Exception):
    pass


class _NoUapi:
    """Stands in for the UAPI server, the first thing start() makes: if the refusal is
    missing, start() stops here instead of making a TUN and a region on the host."""

    def __init__(self, *_args: object) -> None:
        pass

    def start(self) -> None:
        raise _WouldStart("the supervisor went on to create the gateway")


def _supervisor(monkeypatch: pytest.MonkeyPatch, workers: int) -> Supervisor:
    monkeypatch.setattr(supervisor, "UapiServer", _NoUapi)
    return Supervisor(parse_config(f"[Interface]\nPrivateKey = {_KEY}\n"), "swgord0", workers)


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "armv7l", "ppc64le", "riscv64", ""])
def test_two_workers_refused_off_x86_64(monkeypatch: pytest.MonkeyPatch, machine: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    sup = _supervisor(monkeypatch, 2)
    with pytest.raises(SupervisorError, match=r"(?s)x86-64.*--workers 1") as err:
        sup.start()
    assert (machine or "unknown") in str(err.value)
    assert sup.uapi is None and sup.region is None and sup.gateway is None  # nothing made


def test_default_worker_count_is_one_off_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardwg import cli

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cli.default_workers() == 1
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert cli.default_workers() >= 1


def test_one_worker_allowed_off_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker shares nothing on the hot path with another process: allowed anywhere."""
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(_WouldStart):
        _supervisor(monkeypatch, 1).start()


def test_two_workers_allowed_on_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with pytest.raises(_WouldStart):
        _supervisor(monkeypatch, 2).start()


def test_container_auto_workers_is_one_off_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardwg.container.command import worker_count

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert worker_count({"SHARDWG_WORKERS": "auto"}) == 1
    assert worker_count({}) == 1
