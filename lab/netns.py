"""Network namespaces, veth links and bridges, and the processes run inside them.

Everything made here carries the per-run prefix (namespaces) or per-run hex (interface names,
since wireguard-go's uapi sockets in /var/run/wireguard are shared by all namespaces), and is
removed by exact name or PID, never by pattern: several runs (tests, demo, bench) may share a
machine. `Namespace.call` runs a Python function inside a namespace (fork + setns), so lab logic
stays ordinary Python.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import pickle
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import shardwg

# The directory holding the `shardwg` package: put first on PYTHONPATH of everything started in a
# namespace, so `python -m shardwg` there runs this very copy (checkout or install alike).
REPO_ROOT = Path(shardwg.__file__).resolve().parent.parent
RUN_HEX = secrets.token_hex(3)
RUN_PREFIX = f"swg{RUN_HEX}-"
CLONE_NEWNET = 0x40000000
_seq = itertools.count()
_live: dict[str, Namespace] = {}


class LabError(RuntimeError):
    """The lab could not build or drive what was asked; the message says what and why."""


class CommandError(LabError):
    """A lab command failed; carries its output so the report shows why."""

    def __init__(self, cmd: Sequence[str], rc: int, out: str, err: str) -> None:
        super().__init__(
            f"{' '.join(cmd)} -> rc={rc}\nstdout: {out.strip()}\nstderr: {err.strip()}"
        )
        self.rc, self.stdout, self.stderr = rc, out, err


class RemoteError(AssertionError):
    """An exception raised inside Namespace.call; the message holds the child's traceback.

    An AssertionError so a failed check inside a namespace reads as a test failure."""


def unique_ifname(base: str = "wg") -> str:
    """An interface name unique to this run, within Linux's 15 bytes (e.g. "wg3fa9c1" + n)."""
    name = f"{base}{RUN_HEX}{next(_seq)}"
    if len(name) > 15:
        raise ValueError(f"{name!r} is longer than 15 bytes: use a shorter base")
    return name


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll predicate until truthy or timeout; bounded in time and in count."""
    deadline = time.monotonic() + timeout
    for _ in range(max(1, int(timeout / max(interval, 0.001)) + 2)):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return bool(predicate())


def lab_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for lab processes: ours, with this shardwg first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run(
    cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """subprocess.run with text capture, a timeout, and output in the error."""
    cp: subprocess.CompletedProcess[str] = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and cp.returncode != 0:
        raise CommandError(cmd, cp.returncode, cp.stdout, cp.stderr)
    return cp


def missing_tools(*names: str) -> list[str]:
    """The executables among names that are not on PATH."""
    return [n for n in names if shutil.which(n) is None]


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({name}): {os.strerror(e)}")
    finally:
        os.close(fd)


def stop_pid(pid: int, grace: float = 3.0, alive: Callable[[], bool] | None = None) -> None:
    """SIGTERM pid and, when it leads one, its process group (what we start leads its own: Popen
    with start_new_session, call() children via setpgid), wait, then SIGKILL. Linux never reuses
    a PID that still names a group, so killpg(pid) reaches only that process's own group.

    alive: how to tell it is gone (Popen.poll for Popen children, so Popen does the reaping)."""
    check = alive or (lambda: pid_alive(pid))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):  # not a group leader
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_for(lambda: not check(), wait, 0.02):
            return


def stop_popen(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """stop_pid for a Popen child, letting Popen reap it."""
    if proc.poll() is None:
        stop_pid(proc.pid, grace, alive=lambda: proc.poll() is None)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2)


def pid_alive(pid: int) -> bool:
    """True while pid runs; reaps it if it is our child, and a zombie counts as gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fall back to kill(0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie someone else will reap counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Namespace:
    """A network namespace made with `ip netns add`; close() kills what runs in it, then deletes.

    label: appended to the run prefix and a sequence number ("swg3fa9c1-4gw"); with exact=True
    the name is the prefix plus label alone ("swg3fa9c1-site-a"), for names people read.
    """

    def __init__(self, label: str = "", *, exact: bool = False) -> None:
        self.name = f"{RUN_PREFIX}{label}" if exact else f"{RUN_PREFIX}{next(_seq)}{label}"
        if self.name in _live:
            raise LabError(f"namespace {self.name} already exists in this run")
        self.procs: list[subprocess.Popen[Any]] = []
        self._cleanups: list[Callable[[], None]] = []
        run(["ip", "netns", "add", self.name])
        _live[self.name] = self
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def exec_cmd(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd inside the namespace (`ip netns exec`); PYTHONPATH points at shardwg."""
        kw.setdefault("env", lab_env())
        return run(self.exec_cmd(cmd), check=check, timeout=timeout, **kw)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n <ns> ...`: the topology-building shortcut."""
        return run(["ip", "-n", self.name, *args], check=check)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start cmd in the namespace in its own session (so its PID is its group); tracked.

        `ip netns exec` execs the command in place, so proc.pid is the command's PID.
        """
        kw.setdefault("env", lab_env())
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.exec_cmd(cmd), **kw)
        self.procs.append(proc)
        return proc

    def python(self, code: str, timeout: float = 30, check: bool = True) -> str:
        """Run `python -c code` in the namespace with our interpreter; returns stdout."""
        return self.run([sys.executable, "-c", code], timeout=timeout, check=check).stdout

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30, **kwargs: Any) -> Any:
        """Run fn(*args, **kwargs) in a forked child that joined this namespace; return its
        (pickled) result or raise RemoteError with the child's traceback. The child is killed
        (by PID) if it overruns timeout."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(r)
            os.setpgid(0, 0)  # its own group: a timeout kill takes what it spawned too
            _child(self.name, w, fn, args, kwargs)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # both sides, so the group exists whichever runs first
        os.close(w)
        data = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([r], [], [], left)[0]:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {self.name} > {timeout}s")
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(r)
            if pid_alive(pid):
                stop_pid(pid, grace=0.5)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if not data:
            raise RemoteError(f"{getattr(fn, '__name__', fn)} in {self.name}: child died silently")
        status, value, tb = pickle.loads(bytes(data))
        if status != "ok":
            raise RemoteError(f"in {self.name}: {value}\n--- child traceback ---\n{tb}")
        return value

    def pids(self) -> list[int]:
        """PIDs of every process inside this namespace (`ip netns pids`)."""
        cp = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in cp.stdout.split() if p.isdigit()]

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run fn (newest first) when the namespace closes, before its processes are killed:
        what lives in it (a wireguard-go peer, a gateway) gets a graceful stop and removes its
        files even when the code that made it never called its close()."""
        self._cleanups.append(fn)

    def close(self) -> None:
        """Run on_close callbacks, stop tracked processes (SIGTERM, wait, SIGKILL), then any other
        PID left inside the namespace (all ours: nobody else knows its name), then delete it.
        Idempotent; the first callback error is raised once the namespace is gone."""
        errors: list[Exception] = []
        while self._cleanups:
            try:
                self._cleanups.pop()()
            except Exception as e:  # noqa: BLE001 - keep cleaning, report after
                errors.append(e)
        for proc in self.procs:
            stop_popen(proc)
        self.procs.clear()
        if _live.pop(self.name, None) is not None:
            for pid in self.pids():
                if pid != os.getpid():
                    stop_pid(pid, grace=1.0)
            run(["ip", "netns", "del", self.name], check=False)
        if errors:
            raise errors[0]


def _child(ns: str, w: int, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
    """Body of Namespace.call's child: never returns (os._exit skips the parent's teardown)."""
    code = 0
    try:
        _setns(ns)
        result: tuple[str, Any, str] = ("ok", fn(*args, **kwargs), "")
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        result = ("err", f"{type(e).__name__}: {e}", traceback.format_exc())
    try:
        payload = pickle.dumps(result)
    except Exception as e:  # noqa: BLE001
        payload = pickle.dumps(("err", f"result not picklable: {e!r}", ""))
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(w, view) :]
    except OSError:
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def make_namespaces(n: int, label: str = "") -> list[Namespace]:
    """n fresh namespaces with lo up; on a failure the ones already made are removed."""
    made: list[Namespace] = []
    try:
        for _ in range(n):
            made.append(Namespace(label))
    except BaseException:
        for ns in made:
            ns.close()
        raise
    return made


def is_v6(addr: str) -> bool:
    return ":" in addr


def add_address(ns: Namespace, dev: str, cidr: str) -> None:
    """`ip addr add`, IPv6 with nodad so it is usable at once."""
    ns.ip("addr", "add", cidr, "dev", dev, *(["nodad"] if is_v6(cidr) else []))


def veth_link(
    a: Namespace,
    b: Namespace,
    a_addrs: list[str],
    b_addrs: list[str],
    name_a: str = "veth0",
    name_b: str = "veth0",
    mtu: int = 1500,
) -> None:
    """A veth pair created directly inside a and b (never in the host namespace), addressed, up."""
    a.ip("link", "add", name_a, "mtu", str(mtu), "type", "veth",
         "peer", "name", name_b, "mtu", str(mtu), "netns", b.name)  # fmt: skip
    for ns, dev, addrs in ((a, name_a, a_addrs), (b, name_b, b_addrs)):
        for cidr in addrs:
            add_address(ns, dev, cidr)
        ns.ip("link", "set", dev, "up")


def add_bridge(ns: Namespace, name: str = "br0") -> str:
    """A Linux bridge, up, in ns: a switch joining any number of namespaces by veth."""
    ns.ip("link", "add", name, "type", "bridge")
    ns.ip("link", "set", name, "up")
    return name


def bridge_port(
    bridge_ns: Namespace,
    bridge: str,
    ns: Namespace,
    addrs: list[str],
    port_name: str,
    dev: str = "eth0",
    mtu: int = 1500,
) -> None:
    """Plug ns into the bridge: veth `port_name` (a bridge port in bridge_ns) to `dev` in ns."""
    veth_link(bridge_ns, ns, [], addrs, port_name, dev, mtu)
    bridge_ns.ip("link", "set", port_name, "master", bridge)


def listening(ns: Namespace, port: int, proto: str = "tcp") -> bool:
    """True when something in ns listens on port (`ss`), without connecting to it."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    return bool(ns.run(["ss", flag, f"sport = :{port}"], check=False).stdout.strip())


@atexit.register
def _close_leftovers() -> None:
    """Last resort when a teardown never ran (Ctrl-C, crash): only this run's names."""
    for ns in list(_live.values()):
        with contextlib.suppress(Exception):
            ns.close()


_probe: dict[str, str | None] = {}


def root_netns_problem() -> str | None:
    """Why namespace work cannot run here, or None. Probes `ip netns add` once per process."""
    if "netns" not in _probe:
        reason: str | None = None
        if os.geteuid() != 0:
            reason = "needs root (network namespaces, TUN)"
        elif not os.path.exists("/dev/net/tun"):
            reason = "no /dev/net/tun (tun module missing?)"
        elif shutil.which("ip") is None:
            reason = "iproute2 `ip` is not installed"
        else:
            try:
                Namespace("probe").close()
            except Exception as e:  # noqa: BLE001
                reason = f"cannot create a network namespace: {e}"
        _probe["netns"] = reason
    return _probe["netns"]
