"""The supervisor's workers as processes: fork, reap and replace, police, stop, message.

Each worker slot keeps its index for the gateway's whole life (its TUN queue, UDP
sockets and counter block are the index's); the process in it changes. A dead worker
is replaced at once, unless it said its configuration cannot work (EXIT_BOOT_FAILURE)
or it keeps dying right after start (STORM_LIMIT): then the gateway stops instead of
restarting in a loop. A hung one (no heartbeat for STUCK_AFTER, none at all within
BOOT_GRACE, or no control message taken for STALL_LIMIT) is killed, then replaced.

What a worker runs (`main`) and where its heartbeat is read (`heartbeat`) are the
supervisor's: this module only knows processes, so the in-memory tests drive the
watchdog without a gateway.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from shardwg.engine.control_link import STALL_LIMIT, ControlLink
from shardwg.engine.exits import EXIT_BOOT_FAILURE, EXIT_CRASH

log = logging.getLogger("shardwg.engine.supervisor")  # the supervisor's lines, as before

STUCK_AFTER = 3.0  # seconds without a heartbeat before a worker is killed and replaced
# (a dead worker is replaced at once through SIGCHLD; this only catches a hung one, and a
# saturated 2-core box was seen to starve a healthy worker for 2 s under a flood)
BOOT_GRACE = 5.0  # a new worker has this long to send its first heartbeat
QUICK_DEATH = 2.0  # a worker dying sooner than this after start counts towards a storm
STORM_LIMIT = 5  # consecutive quick deaths of one worker slot that stop the gateway
STOP_WAIT = 3.0  # seconds stopped workers get to exit before SIGKILL


@dataclass
class WorkerSlot:
    index: int
    pid: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    restarts: int = 0
    control: ControlLink | None = None  # the control stream's queue (never blocks)


class WorkerPool:
    """One slot per worker; `main(slot, control socket)` runs in each forked child and
    returns its exit code, `heartbeat(index)` reads a worker's last beat."""

    def __init__(
        self,
        count: int,
        main: Callable[[WorkerSlot, socket.socket], int],
        heartbeat: Callable[[int], float],
    ) -> None:
        self.slots = [WorkerSlot(i) for i in range(count)]
        self.main = main
        self.heartbeat = heartbeat

    def pids(self) -> set[int]:
        return {s.pid for s in self.slots if s.pid}

    def spawn(self, slot: WorkerSlot) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = EXIT_CRASH
            try:
                parent_end.close()
                _set_parent_death_signal()
                code = self.main(slot, child_end)
            except BaseException:
                log.exception("worker %d crashed", slot.index)
            finally:
                os._exit(code)
        child_end.close()
        if slot.control is not None:
            slot.control.close()  # what it still queued is in the configuration the child has
        slot.control = ControlLink(parent_end)
        slot.pid = pid
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, pid)

    def spawn_all(self, restart: bool = False) -> None:
        """Fork every worker (`restart`: each replaces a stopped one, counted as a restart)."""
        for s in self.slots:
            if restart:
                s.restarts += 1
            self.spawn(s)

    def reap(self, now: float, replace: bool = True) -> int:
        """Collect exited children and fork replacements (if `replace`); the exit code the
        gateway must stop with (a configuration that cannot work, a restart storm), else 0."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 0
            if pid == 0:
                return 0
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            slot.pid = 0
            if not replace:
                continue
            if code == EXIT_BOOT_FAILURE:
                log.error("worker %d cannot start (configuration); stopping", slot.index)
                return EXIT_BOOT_FAILURE
            lived = now - slot.started
            slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH else 0
            if slot.quick_deaths >= STORM_LIMIT:
                log.error(
                    "worker %d died %d times within %.0f s of starting; stopping the gateway",
                    slot.index, slot.quick_deaths, QUICK_DEATH,
                )  # fmt: skip
                return 1
            log.warning("worker %d (pid %d) exited with %s after %.1f s; replacing it",
                        slot.index, pid, code, lived)  # fmt: skip
            slot.restarts += 1
            self.spawn(slot)

    def check_heartbeats(self, now: float) -> None:
        """Kill a worker that never beat, stopped beating, or stopped taking control
        messages; the reaper replaces it."""
        for slot in self.slots:
            if slot.pid == 0:
                continue
            beat = self.heartbeat(slot.index)
            if beat < slot.started:  # not beating yet since this start
                if now - slot.started > BOOT_GRACE:
                    log.warning("worker %d never sent a heartbeat; killing it", slot.index)
                    _kill(slot.pid)
            elif now - beat > STUCK_AFTER:
                log.warning("worker %d stuck (no heartbeat for %.1f s); killing it",
                            slot.index, now - beat)  # fmt: skip
                _kill(slot.pid)
            elif slot.control is not None and slot.control.stalled_for(now) > STALL_LIMIT:
                log.warning("worker %d took no control message for %.1f s (%d bytes queued); "
                            "replacing it", slot.index, slot.control.stalled_for(now),
                            len(slot.control.queue))  # fmt: skip
                _kill(slot.pid)

    def stop(self) -> None:
        """Stop every worker and wait (at most STOP_WAIT, then SIGKILL); slots stay assigned."""
        live = [s for s in self.slots if s.pid]
        for s in live:
            _signal(s.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while any(s.pid for s in live) and time.monotonic() < deadline:
            for s in live:
                if s.pid and _reaped(s.pid):
                    s.pid = 0
            time.sleep(0.02)
        for s in live:
            if s.pid:
                _kill(s.pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(s.pid, 0)
                s.pid = 0

    # ------------------------------------------------------------------ control streams
    def broadcast(self, data: bytes) -> None:
        """Queue one encoded message for every worker; never blocks (a worker that does not
        take it is replaced by the watchdog and boots from the configuration holding it)."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.control is None or not slot.pid:
                continue  # a worker being replaced boots from the new configuration
            slot.control.send(data, now)

    def backlogged(self) -> list[ControlLink]:
        """The control links holding bytes the socket has not taken yet."""
        return [s.control for s in self.slots if s.control is not None and s.control.queue]

    def close_links(self) -> None:
        for s in self.slots:
            if s.control is not None:
                s.control.close()
                s.control = None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _kill(pid: int) -> None:
    _signal(pid, signal.SIGKILL)


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def no_core_dumps() -> None:
    """Keys live on the Python heap too: no core dumps, and no ptrace by other users
    (RLIMIT_CORE=0 and PR_SET_DUMPABLE=0, inherited by every worker)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.debug("RLIMIT_CORE not set: %s", exc)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    except (OSError, AttributeError) as exc:
        log.debug("PR_SET_DUMPABLE not cleared: %s", exc)


def _set_parent_death_signal() -> None:
    """PR_SET_PDEATHSIG: a worker gets SIGTERM if the supervisor dies (kill -9 included)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError) as exc:
        if getattr(exc, "errno", None) != errno.ENOSYS:
            log.debug("PR_SET_PDEATHSIG unavailable: %s", exc)
