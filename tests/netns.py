"""Test harness: network namespaces, veth links, real wireguard-go peers, ICMP ping.

Everything this module creates carries the per-run prefix (namespaces) or per-run hex (interface
names, since wireguard-go's uapi sockets in /var/run/wireguard are shared by all namespaces), and is
removed by exact name or PID: never by pattern. `Namespace.call` runs a Python function inside a
namespace (fork + setns), so test logic stays ordinary Python with pytest's assert messages.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import errno
import itertools
import os
import pickle
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_HEX = secrets.token_hex(3)
RUN_PREFIX = f"swg{RUN_HEX}-"
UAPI_DIR = Path("/var/run/wireguard")
CLONE_NEWNET = 0x40000000
_seq = itertools.count()
_live: dict[str, Namespace] = {}


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


class CommandError(RuntimeError):
    """A harness command failed; carries its output so the test report shows why."""

    def __init__(self, cmd: Sequence[str], rc: int, out: str, err: str) -> None:
        super().__init__(
            f"{' '.join(cmd)} -> rc={rc}\nstdout: {out.strip()}\nstderr: {err.strip()}"
        )
        self.rc, self.stdout, self.stderr = rc, out, err


class RemoteError(AssertionError):
    """An exception raised inside Namespace.call; the message holds the child's traceback."""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw: Any) -> Any:
    """subprocess.run with text capture, a timeout, and output in the error."""
    cp = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and cp.returncode != 0:
        raise CommandError(cmd, cp.returncode, cp.stdout, cp.stderr)
    return cp


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({name}): {os.strerror(e)}")
    finally:
        os.close(fd)


def _stop(pid: int, grace: float = 3.0, alive: Callable[[], bool] | None = None) -> None:
    """SIGTERM pid and, when it leads one, its process group (what we start leads its own: Popen
    with start_new_session, call() children via setpgid), wait, then SIGKILL. Linux never reuses
    a PID that still names a group, so killpg(pid) reaches only that process's own group.

    alive: how to tell it is gone (Popen.poll for Popen children, so Popen does the reaping)."""
    check = alive or (lambda: _alive(pid))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):  # not a group leader
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_for(lambda: not check(), wait, 0.02):
            return


def _alive(pid: int) -> bool:
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
    """A network namespace made with `ip netns add`; close() kills what runs in it, then deletes."""

    def __init__(self, label: str = "") -> None:
        self.name = f"{RUN_PREFIX}{next(_seq)}{label}"
        self.procs: list[subprocess.Popen[Any]] = []
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
        """Run cmd inside the namespace (`ip netns exec`); PYTHONPATH points at the repo."""
        kw.setdefault("env", _env())
        return run(self.exec_cmd(cmd), check=check, timeout=timeout, **kw)  # type: ignore[no-any-return]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n <ns> ...`: the topology-building shortcut."""
        return run(["ip", "-n", self.name, *args], check=check)  # type: ignore[no-any-return]

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start cmd in the namespace in its own session (so its PID is its group); tracked.

        `ip netns exec` execs the command in place, so proc.pid is the command's PID.
        """
        kw.setdefault("env", _env())
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.exec_cmd(cmd), **kw)
        self.procs.append(proc)
        return proc

    def python(self, code: str, timeout: float = 30, check: bool = True) -> str:
        """Run `python -c code` in the namespace with the venv's interpreter; returns stdout."""
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
            if _alive(pid):
                _stop(pid, grace=0.5)
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

    def close(self) -> None:
        """Stop tracked processes (SIGTERM, wait, SIGKILL), then any other PID left inside the
        namespace (all ours: nobody else knows its name), then delete it."""
        for proc in self.procs:
            if proc.poll() is None:
                _stop(proc.pid, alive=lambda p=proc: p.poll() is None)  # type: ignore[misc]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self.procs.clear()
        if _live.pop(self.name, None) is None:
            return
        for pid in self.pids():
            if pid != os.getpid():
                _stop(pid, grace=1.0)
        run(["ip", "netns", "del", self.name], check=False)


def _child(ns: str, w: int, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
    """Body of Namespace.call's child: never returns (os._exit skips pytest's teardown)."""
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


def _is_v6(addr: str) -> bool:
    return ":" in addr


def add_address(ns: Namespace, dev: str, cidr: str) -> None:
    """`ip addr add`, IPv6 with nodad so it is usable at once."""
    ns.ip("addr", "add", cidr, "dev", dev, *(["nodad"] if _is_v6(cidr) else []))


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


# ---- keys -------------------------------------------------------------------------------------


def genkey() -> str:
    """A WireGuard private key (clamped like `wg genkey`), base64."""
    k = bytearray(secrets.token_bytes(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return base64.b64encode(bytes(k)).decode()


def pubkey(private_b64: str) -> str:
    priv = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    return base64.b64encode(priv.public_key().public_bytes_raw()).decode()


def genpsk() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def keypair() -> tuple[str, str]:
    """(private, public), base64."""
    priv = genkey()
    return priv, pubkey(priv)


# ---- wireguard-go -----------------------------------------------------------------------------


def _peer_conf(p: dict[str, Any]) -> str:
    lines = ["[Peer]", f"PublicKey = {p['public_key']}"]
    if p.get("preshared_key"):
        lines.append(f"PresharedKey = {p['preshared_key']}")
    if p.get("allowed_ips"):
        lines.append(f"AllowedIPs = {', '.join(p['allowed_ips'])}")
    if p.get("endpoint"):
        lines.append(f"Endpoint = {p['endpoint']}")
    if p.get("persistent_keepalive"):
        lines.append(f"PersistentKeepalive = {int(p['persistent_keepalive'])}")
    return "\n".join(lines)


class WireguardGo:
    """A real wireguard-go peer in a namespace: the interop baseline our engine is compared to.

    Debian's 0.0.20220316 takes `-f/--foreground IFNAME` and nothing else (any other first
    argument, "-h" included, is taken as an interface name and daemonizes!). Logs go to a temp
    file (log_text()); LOG_LEVEL=verbose makes them useful.
    """

    def __init__(
        self,
        ns: Namespace,
        ifname: str,
        private_key_b64: str,
        listen_port: int,
        peers: list[dict[str, Any]],
        addresses: list[str],
        mtu: int = 1420,
        routes: list[str] | None = None,
        log_level: str = "verbose",
        start_timeout: float = 10,
    ) -> None:
        self.ns, self.ifname = ns, ifname
        self.private_key, self.public_key = private_key_b64, pubkey(private_key_b64)
        self.listen_port = listen_port
        self.sock_path = UAPI_DIR / f"{ifname}.sock"
        if self.sock_path.exists():
            raise RuntimeError(f"{self.sock_path} exists: interface names must be unique per run")
        self._tmp = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{ifname}-")
        self.log_path = Path(self._tmp) / "wireguard-go.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc: subprocess.Popen[Any] | None = ns.popen(
            ["wireguard-go", "-f", ifname],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_env({"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": log_level}),
        )
        try:
            self._start(peers, addresses, mtu, routes or [], start_timeout)
        except BaseException:
            self.close()
            raise

    def _start(
        self, peers: list[dict[str, Any]], addrs: list[str], mtu: int, routes: list[str], t: float
    ) -> None:
        proc = self.proc
        assert proc is not None
        if not wait_for(lambda: self.sock_path.exists() or proc.poll() is not None, t):
            raise RuntimeError(f"wireguard-go {self.ifname}: no uapi socket after {t}s")
        if proc.poll() is not None:
            raise RuntimeError(f"wireguard-go {self.ifname} exited: {self.log_text()}")
        conf = "\n\n".join(
            [f"[Interface]\nPrivateKey = {self.private_key}\nListenPort = {self.listen_port}"]
            + [_peer_conf(p) for p in peers]
        )
        self.wg("setconf", self.ifname, self._secret_file("wg.conf", conf + "\n"))
        for cidr in addrs:
            add_address(self.ns, self.ifname, cidr)
        self.ns.ip("link", "set", self.ifname, "mtu", str(mtu), "up")
        for prefix in routes:
            self.ns.ip("-6" if _is_v6(prefix) else "-4", "route", "add", prefix, "dev", self.ifname)

    def _secret_file(self, name: str, text: str) -> str:
        path = os.path.join(self._tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def wg(self, *args: str) -> str:
        """Run `wg ...` in the namespace (it finds the uapi socket by interface name)."""
        return self.ns.run(["wg", *args]).stdout

    def set_peer(
        self,
        public_key: str,
        *,
        allowed_ips: list[str] | None = None,
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
        preshared_key: str | None = None,
        remove: bool = False,
    ) -> None:
        """`wg set <if> peer ...`: only the given fields change (allowed_ips replaces the list)."""
        args = ["set", self.ifname, "peer", public_key]
        if remove:
            args.append("remove")
        if endpoint is not None:
            args += ["endpoint", endpoint]
        if allowed_ips is not None:
            args += ["allowed-ips", ",".join(allowed_ips)]
        if persistent_keepalive is not None:
            args += ["persistent-keepalive", str(persistent_keepalive or "off")]
        if preshared_key is not None:
            args += ["preshared-key", self._secret_file("psk", preshared_key + "\n")]
        self.wg(*args)

    def show_dump(self) -> str:
        return self.wg("show", self.ifname, "dump")

    def _peer_field(self, peer_pub_b64: str, field: str) -> str | None:
        for line in self.wg("show", self.ifname, field).splitlines():
            parts = line.split("\t")
            if parts[0] == peer_pub_b64:
                return "\t".join(parts[1:])
        return None

    def latest_handshake(self, peer_pub_b64: str) -> int:
        """Unix time of the last handshake with the peer, 0 for never (or unknown peer)."""
        return int(self._peer_field(peer_pub_b64, "latest-handshakes") or 0)

    def transfer(self, peer_pub_b64: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) for the peer."""
        rx, _, tx = (self._peer_field(peer_pub_b64, "transfer") or "0\t0").partition("\t")
        return int(rx), int(tx)

    def endpoint(self, peer_pub_b64: str) -> str | None:
        ep = self._peer_field(peer_pub_b64, "endpoints")
        return None if ep in (None, "", "(none)") else ep

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop by PID; remove the uapi socket it may leave (exact path); drop temp files."""
        if self.proc is not None:
            proc = self.proc
            if proc.poll() is None:
                _stop(proc.pid, alive=lambda: proc.poll() is None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            self.proc = None
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
        if not self._log.closed:
            self._log.close()
        if not os.environ.get("SWG_KEEP_LOGS"):
            shutil.rmtree(self._tmp, ignore_errors=True)


# ---- ping -------------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def icmp_echo(addr: str, count: int, timeout: float, interval: float = 0.2) -> int:
    """Send ICMP(v6) echo requests from the current namespace until `count` replies arrive or
    timeout; returns the replies seen. Raw sockets, so no dependency on a ping binary."""
    v6 = _is_v6(addr)
    fam, proto = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    )
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    ident = secrets.randbits(16)
    got: set[int] = set()
    deadline = time.monotonic() + timeout
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        seq, next_send = 0, 0.0
        while len(got) < count and seq < 10_000:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_send:
                seq += 1
                body = struct.pack("!HH", ident, seq) + b"shardwg-ping"
                hdr = struct.pack("!BBH", req_type, 0, 0)
                csum = 0 if v6 else _checksum(hdr + body)  # the kernel fills ICMPv6's
                with contextlib.suppress(OSError):  # unreachable now may work later
                    s.sendto(struct.pack("!BBH", req_type, 0, csum) + body, (addr, 0))
                next_send = now + interval
            if not select.select([s], [], [], max(0.0, min(next_send, deadline) - now))[0]:
                continue
            pkt = s.recv(2048)
            icmp = pkt if v6 else pkt[(pkt[0] & 0x0F) * 4 :]
            if len(icmp) >= 8 and icmp[0] == rep_type:
                rid, rseq = struct.unpack_from("!HH", icmp, 4)
                if rid == ident:
                    got.add(rseq)
    return len(got)


def ping(ns: Namespace, addr: str, count: int = 3, timeout: float = 10) -> bool:
    """True when `count` echo replies from addr arrive within timeout (like ping -c N -w T)."""
    try:
        return bool(ns.call(icmp_echo, addr, count, timeout, timeout=timeout + 10) >= count)
    except OSError as e:
        if e.errno == errno.ENETUNREACH:
            return False
        raise


# ---- tracking, for fixtures -------------------------------------------------------------------


class Harness:
    """Tracks what a test made so teardown removes all of it, even after a failure."""

    def __init__(self) -> None:
        self.namespaces: list[Namespace] = []
        self.peers: list[WireguardGo] = []

    def __call__(self, n: int = 1, label: str = "") -> list[Namespace]:
        made = make_namespaces(n, label)
        self.namespaces += made
        return made

    def wireguard_go(self, ns: Namespace, *args: Any, **kwargs: Any) -> WireguardGo:
        wg = WireguardGo(ns, *args, **kwargs)
        self.peers.append(wg)
        return wg

    def close(self) -> None:
        errors: list[BaseException] = []
        closers: list[WireguardGo | Namespace] = [*self.peers, *reversed(self.namespaces)]
        for obj in closers:
            try:
                obj.close()
            except Exception as e:  # noqa: BLE001 - keep cleaning, report after
                errors.append(e)
        self.peers.clear()
        self.namespaces.clear()
        if errors:
            raise errors[0]


@atexit.register
def _close_leftovers() -> None:
    """Last resort when a fixture teardown never ran (Ctrl-C, crash): only this run's names."""
    for ns in list(_live.values()):
        with contextlib.suppress(Exception):
            ns.close()


# ---- skip checks ------------------------------------------------------------------------------

_probe: dict[str, str | None] = {}


def root_netns_problem() -> str | None:
    """Why namespace tests cannot run here, or None. Probes `ip netns add` once per session."""
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


def wireguard_go_problem() -> str | None:
    """Why interop tests cannot run here, or None."""
    missing = [b for b in ("wireguard-go", "wg") if shutil.which(b) is None]
    return (
        f"missing {', '.join(missing)} (apt-get install wireguard-go wireguard-tools)"
        if missing
        else None
    )
