"""The container entrypoint, run as the container would run it.

No Docker engine runs here, so the tests recreate what one gives the image: a network namespace
of its own, a PID namespace in which the entrypoint is PID 1 (`unshare --pid --fork
--mount-proc`), only the environment variables the operator set, and only CAP_NET_ADMIN among
the capabilities (`setpriv --bounding-set -all,+net_admin`, as `docker run --cap-drop ALL
--cap-add NET_ADMIN`). A real wireguard-go peer on the far side of a veth checks the tunnel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from lab.harness import Harness
from lab.keys import genpsk, keypair
from lab.netns import REPO_ROOT, RUN_PREFIX, Namespace, unique_ifname, veth_link, wait_for
from lab.ping import ping
from lab.wggo import UAPI_DIR
from shardwg.config.model import parse_config
from shardwg.container import command, privileges
from shardwg.observe.cpus import cgroup_cpu_quota

GW_PORT, PEER_PORT = 51820, 51821
ENTRYPOINT = [sys.executable, "-m", "shardwg.container"]
# what `docker run --cap-drop ALL --cap-add NET_ADMIN` leaves a root process
ONLY_NET_ADMIN = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all",
                  "--bounding-set=-all,+net_admin", "--"]  # fmt: skip


def base_env(**extra: str) -> dict[str, str]:
    """A container's environment: PATH and what the operator set, nothing inherited."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)}
    env.update(extra)
    return env


def _host_children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


class Container:
    """The entrypoint started in `ns` the way a runtime starts a container's process: in a new
    PID namespace (it becomes PID 1) with a fixed environment; output to a log file."""

    def __init__(self, ns: Namespace, env: dict[str, str], wrapper: list[str] | None = None,
                 pid_namespace: bool = True) -> None:  # fmt: skip
        self.ns = ns
        self.tmp = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}ctr-")
        self.log_path = Path(self.tmp) / "container.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        pidns = ["unshare", "--pid", "--fork", "--mount-proc"] if pid_namespace else []
        self.proc = ns.popen([*pidns, *(wrapper or []), *ENTRYPOINT], env=env,
                             stdout=self._log, stderr=subprocess.STDOUT)  # fmt: skip
        self.pid_namespace = pid_namespace
        ns.on_close(self.close)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 20) -> None:
        ok = wait_for(lambda: "serving" in self.log_text() or self.proc.poll() is not None,
                      timeout)  # fmt: skip
        assert ok and self.proc.poll() is None, f"gateway did not start:\n{self.log_text()}"

    def init_pid(self) -> int:
        """The host PID of the container's PID 1 (unshare's child), or of the process itself."""
        if not self.pid_namespace:
            return self.proc.pid
        found: list[int] = []
        assert wait_for(lambda: bool(found.extend(_host_children(self.proc.pid)) or found), 5)
        return found[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            with_group = self.proc.pid
            try:
                os.killpg(with_group, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        if not self._log.closed:
            self._log.close()
        if not os.environ.get("SWG_KEEP_LOGS"):
            shutil.rmtree(self.tmp, ignore_errors=True)


def two_namespaces(h: Harness) -> tuple[Namespace, Namespace]:
    gw_ns, peer_ns = h(1, "ctr")[0], h(1, "cpeer")[0]
    veth_link(gw_ns, peer_ns, ["10.98.0.1/24"], ["10.98.0.2/24"])
    return gw_ns, peer_ns


def start_peer(h: Harness, peer_ns: Namespace, gw_pub: str, peer_keys: tuple[str, str],
               psk: str | None = None) -> Any:  # fmt: skip
    return h.wireguard_go(
        peer_ns, unique_ifname("wgp"), peer_keys[0], PEER_PORT,
        [{"public_key": gw_pub, "allowed_ips": ["10.0.0.0/24"],
          "endpoint": f"10.98.0.1:{GW_PORT}", "preshared_key": psk}],
        ["10.0.0.2/24"],
    )  # fmt: skip


def link_exists(ns: Namespace, ifname: str) -> bool:
    return ns.ip("link", "show", ifname, check=False).returncode == 0


def stop_and_check_gone(ctr: Container, ns: Namespace, ifname: str) -> None:
    """SIGTERM to the container's PID 1 (what `docker stop` sends): exit 0 within a few seconds,
    interface and UAPI socket removed."""
    os.kill(ctr.init_pid(), signal.SIGTERM)
    t0 = time.monotonic()
    rc = ctr.proc.wait(timeout=10)
    took = time.monotonic() - t0
    assert rc == 0, f"exit {rc} after SIGTERM:\n{ctr.log_text()}"
    assert took < 5, f"took {took:.1f} s to stop"
    assert not link_exists(ns, ifname)
    assert not (UAPI_DIR / f"{ifname}.sock").exists()
    assert not os.path.exists(f"/dev/shm/shardwg-{ifname}")


@pytest.mark.netns
@pytest.mark.interop
def test_environment_only_config_as_pid1(netns_factory: Harness) -> None:
    """No config file at all: the config comes from WG_* variables, the gateway runs as PID 1 of
    its PID namespace, carries no key in its environment, reaps orphans, stops on SIGTERM."""
    gw_ns, peer_ns = two_namespaces(netns_factory)
    gw_priv, gw_pub = keypair()
    peer_keys = keypair()
    psk = genpsk()
    ifname = unique_ifname("ctr")
    runtime = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}run-")
    psk_file = Path(runtime) / "psk"
    psk_file.write_text(psk + "\n")
    psk_file.chmod(0o600)
    env = base_env(
        SHARDWG_CONFIG=os.path.join(runtime, "absent", "wg0.conf"),  # nothing mounted
        SHARDWG_RUNTIME_DIR=os.path.join(runtime, "run"),
        SHARDWG_INTERFACE=ifname,
        SHARDWG_WORKERS="2",
        WG_PRIVATE_KEY=gw_priv,
        WG_ADDRESS="10.0.0.1/24",
        WG_LISTEN_PORT=str(GW_PORT),
        WG_MTU="1400",
        WG_PEER_1_PUBLIC_KEY=peer_keys[1],
        WG_PEER_1_ALLOWED_IPS="10.0.0.2/32",
        WG_PEER_1_PRESHARED_KEY_FILE=str(psk_file),
    )
    try:
        ctr = Container(gw_ns, env)
        ctr.wait_serving()
        start_peer(netns_factory, peer_ns, gw_pub, peer_keys, psk)
        assert ping(peer_ns, "10.0.0.1", count=3, timeout=10), ctr.log_text()

        # the stock wg tool sees the gateway through its UAPI socket
        out = gw_ns.run(["wg", "show", ifname]).stdout
        assert peer_keys[1] in out and "latest handshake" in out and "preshared key" in out

        # the config it wrote: owner-only, in the runtime dir, named after the interface
        written = Path(runtime) / "run" / f"{ifname}.conf"
        assert written.stat().st_mode & 0o777 == 0o600
        assert (Path(runtime) / "run").stat().st_mode & 0o777 == 0o700
        assert parse_config(written.read_text()).peers[0].preshared_key is not None

        # exec'd in place: PID 1 of its namespace runs `shardwg run`, with no key in its env
        init = ctr.init_pid()
        assert _status_field(init, "NSpid").split()[-1] == "1"
        cmdline = Path(f"/proc/{init}/cmdline").read_bytes().split(b"\0")
        assert b"shardwg" in cmdline and b"run" in cmdline and b"--workers" in cmdline
        environ = Path(f"/proc/{init}/environ").read_bytes()
        assert b"WG_PRIVATE_KEY" not in environ and gw_priv.encode() not in environ

        # PID 1 duty: an orphan re-parented to it is reaped, not left a zombie
        subprocess.run(["nsenter", "-t", str(init), "-p", "--", "sh", "-c", "sleep 0.3 & exit 0"],
                       check=True, timeout=10)  # fmt: skip
        time.sleep(1.5)
        zombies = [p for p in _host_children(init) if _state(p) == "Z"]
        assert not zombies, f"PID 1 left zombies {zombies}"

        # the image's HEALTHCHECK
        health = gw_ns.run([*ENTRYPOINT, "--healthcheck"], env=env, check=False)
        assert health.returncode == 0 and ifname in health.stdout, health

        logs = ctr.log_text()
        assert gw_priv not in logs and psk not in logs
        stop_and_check_gone(ctr, gw_ns, ifname)
        health = gw_ns.run([*ENTRYPOINT, "--healthcheck"], env=env, check=False)
        assert health.returncode == 1 and "unhealthy" in health.stdout
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.netns
@pytest.mark.interop
def test_mounted_file_with_only_net_admin(netns_factory: Harness) -> None:
    """A mounted wg-quick file, root with CAP_NET_ADMIN as its only capability (docker run
    --cap-drop ALL --cap-add NET_ADMIN), JSON logs."""
    gw_ns, peer_ns = two_namespaces(netns_factory)
    gw_priv, gw_pub = keypair()
    peer_keys = keypair()
    ifname = unique_ifname("ctr")
    mount = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}etc-")
    conf = Path(mount) / f"{ifname}.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, (f"[Interface]\nPrivateKey = {gw_priv}\nAddress = 10.0.0.1/24\n"
                  f"ListenPort = {GW_PORT}\n\n[Peer]\nPublicKey = {peer_keys[1]}\n"
                  "AllowedIPs = 10.0.0.2/32\n").encode())  # fmt: skip
    os.close(fd)
    env = base_env(SHARDWG_CONFIG=str(conf), SHARDWG_LOG_FORMAT="json", SHARDWG_WORKERS="auto")
    try:
        ctr = Container(gw_ns, env, wrapper=ONLY_NET_ADMIN)
        ctr.wait_serving()
        caps = int(_status_field(ctr.init_pid(), "CapEff"), 16)
        assert caps == 1 << privileges.CAP_NET_ADMIN, f"CapEff {caps:#x}"
        start_peer(netns_factory, peer_ns, gw_pub, peer_keys)
        assert ping(peer_ns, "10.0.0.1", count=3, timeout=10), ctr.log_text()
        assert peer_keys[1] in gw_ns.run(["wg", "show", ifname]).stdout
        for line in ctr.log_text().splitlines():
            record = json.loads(line)  # every line, the entrypoint's and the gateway's
            assert {"level", "msg"} <= record.keys()
        assert "from the file" in ctr.log_text()
        stop_and_check_gone(ctr, gw_ns, ifname)
    finally:
        shutil.rmtree(mount, ignore_errors=True)


def run_entrypoint(env: dict[str, str], *args: str, wrapper: list[str] | None = None,
                   timeout: float = 30) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([*(wrapper or []), *ENTRYPOINT, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_bad_environment_exits_2_without_secrets(tmp_path: Path) -> None:
    priv, pub = keypair()
    other_priv = keypair()[0]
    psk = genpsk()
    absent = str(tmp_path / "none" / "wg0.conf")
    two_lines = tmp_path / "psk"
    two_lines.write_text(f"{psk}\n{psk}\n")
    common = {"SHARDWG_CONFIG": absent, "SHARDWG_RUNTIME_DIR": str(tmp_path / "run")}
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "no config"),
        ({"WG_ADDRESS": "10.0.0.1/24"}, "WG_PRIVATE_KEY or WG_PRIVATE_KEY_FILE is required"),
        ({"WG_PRIVATE_KEY": priv[:-2] + "B="}, "WG_PRIVATE_KEY: key is not"),  # non-canonical
        ({"WG_PRIVATE_KEY": priv[:20]}, "WG_PRIVATE_KEY: key is not the correct length"),
        ({"WG_PRIVATE_KEY": f"{priv}\n{other_priv}"}, "WG_PRIVATE_KEY contains a newline"),
        ({"WG_PRIVATE_KEY": priv, "WG_PRIVATE_KEY_FILE": str(two_lines)}, "not both"),
        ({"WG_PRIVATE_KEY_FILE": str(tmp_path / "missing")}, "cannot read WG_PRIVATE_KEY_FILE"),
        ({"WG_PRIVATE_KEY": priv, "WG_LISTENPORT": "51820"}, "unknown variable(s) WG_LISTENPORT"),
        ({"WG_PRIVATE_KEY": priv, "WG_ADDRESS": "10.0.0.300/24"}, "WG_ADDRESS: Address"),
        ({"WG_PRIVATE_KEY": priv, "WG_LISTEN_PORT": "70000"}, "WG_LISTEN_PORT: ListenPort 70000"),
        ({"WG_PRIVATE_KEY": priv, "WG_PEER_1_ENDPOINT": "10.0.0.2:51820"},
         "WG_PEER_1_PUBLIC_KEY is required"),
        ({"WG_PRIVATE_KEY": priv, "WG_PEER_1_PUBLIC_KEY": other_priv[:-4]},
         "WG_PEER_1_PUBLIC_KEY: key is not the correct length"),
        ({"WG_PRIVATE_KEY": priv, "WG_PEER_1_PUBLIC_KEY": pub,
          "WG_PEER_1_PRESHARED_KEY_FILE": str(two_lines)}, "holds more than one line"),
        ({"WG_PRIVATE_KEY": priv, "WG_PEER_1_PUBLIC_KEY": pub,
          "WG_PEER_1_PRESHARED_KEY": psk[:-3] + "#x="}, "WG_PEER_1_PRESHARED_KEY contains"),
        ({"WG_PRIVATE_KEY": priv, "WG_PEER_1_PUBLIC_KEY": pub,
          "WG_PEER_1_ALLOWED_IPS": "10.0.0.0/33"}, "WG_PEER_1_ALLOWED_IPS"),
        ({"WG_PRIVATE_KEY": priv, "WG_PEER_3_PUBLIC_KEY": pub, "WG_PEER_3_ENDPOINT": "nope"},
         "WG_PEER_3_ENDPOINT: missing port"),
        ({"WG_PRIVATE_KEY": priv, "SHARDWG_INTERFACE": "much-too-long-name0"},
         "not a valid interface name"),
        ({"WG_PRIVATE_KEY": priv, "SHARDWG_WORKERS": "lots"}, "SHARDWG_WORKERS must be"),
        ({"WG_PRIVATE_KEY": priv, "SHARDWG_LOG_FORMAT": "xml"}, "SHARDWG_LOG_FORMAT must be"),
    ]  # fmt: skip
    secrets = [priv, other_priv, psk, priv[:20], other_priv[:-4], psk[:-3], priv[:-2] + "B="]
    for i, (extra, expected) in enumerate(cases):
        # --check takes the same path up to the exec, so should a case ever be valid by mistake
        # no gateway starts outside a namespace; the first case runs exactly as a container does
        cp = run_entrypoint(base_env(**common, **extra), *(["--check"] if i else []))
        out = cp.stdout + cp.stderr
        assert cp.returncode == 2, (extra.keys(), cp.returncode, out)
        assert expected in out, (expected, out)
        for secret in secrets:
            assert secret not in out, f"a key leaked for {sorted(extra)}: {out}"
        assert "Traceback" not in out
    assert not (tmp_path / "run").exists(), "nothing is written when the input is bad"


def test_bad_mounted_file_exits_2(tmp_path: Path) -> None:
    priv = keypair()[0]
    conf = tmp_path / "wg9.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {priv}\nListenPort = 51820\nMTU = 9\n")
    cp = run_entrypoint(base_env(SHARDWG_CONFIG=str(conf)), "--check")
    assert cp.returncode == 2
    assert f"{conf}:4: MTU" in cp.stderr and priv not in cp.stderr + cp.stdout


def test_check_prints_the_command(tmp_path: Path) -> None:
    """--check: valid input, nothing written, the exact command that would be exec'd."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun (the privilege checks run too)")
    priv, pub = keypair()
    env = base_env(SHARDWG_CONFIG=str(tmp_path / "absent.conf"),
                   SHARDWG_RUNTIME_DIR=str(tmp_path / "run"), WG_PRIVATE_KEY=priv,
                   WG_PEER_7_PUBLIC_KEY=pub, WG_PEER_7_ALLOWED_IPS="10.1.0.0/16",
                   SHARDWG_WORKERS="3", SHARDWG_LOG_FORMAT="json")  # fmt: skip
    cp = run_entrypoint(env, "--check", "--verbose")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == [
        sys.executable, "-m", "shardwg", "run", "--config", str(tmp_path / "run" / "wg0.conf"),
        "--workers", "3", "--log-format", "json", "--verbose",
    ]  # fmt: skip
    assert not (tmp_path / "run").exists()
    assert "1 peer(s)" in cp.stderr and priv not in cp.stderr


@pytest.mark.netns
def test_missing_capability_or_tun_exits_2(tmp_path: Path) -> None:
    """What a container started without --cap-add NET_ADMIN or --device /dev/net/tun sees."""
    priv = keypair()[0]
    env = base_env(SHARDWG_CONFIG=str(tmp_path / "absent.conf"),
                   SHARDWG_RUNTIME_DIR=str(tmp_path / "run"), WG_PRIVATE_KEY=priv)  # fmt: skip
    no_net_admin = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin", "--"]
    cp = run_entrypoint(env, wrapper=no_net_admin)
    assert cp.returncode == 2, cp.stderr
    assert "missing capability CAP_NET_ADMIN" in cp.stderr and "--cap-add NET_ADMIN" in cp.stderr
    assert priv not in cp.stderr

    # a private mount namespace in which /dev/net is an empty tmpfs: no TUN device
    hide_tun = ["unshare", "--mount", "--", "sh", "-c", 'mount -t tmpfs none /dev/net && exec "$@"',
                "sh"]  # fmt: skip
    cp = run_entrypoint(env, wrapper=hide_tun)
    assert cp.returncode == 2, cp.stderr
    assert "cannot open /dev/net/tun" in cp.stderr and "--device /dev/net/tun" in cp.stderr
    assert not (tmp_path / "run").exists()

    # --cap-drop ALL: root can no longer read a mounted config owned by another user
    conf = tmp_path / "wg7.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {priv}\n")
    conf.chmod(0o600)
    os.chown(conf, 65534, 65534)
    tmp_path.chmod(0o755)
    cp = run_entrypoint(base_env(SHARDWG_CONFIG=str(conf)), "--check", wrapper=ONLY_NET_ADMIN)
    assert cp.returncode == 2, cp.stderr
    assert "Permission denied" in cp.stderr and "chown 0" in cp.stderr


def test_environment_for_the_gateway_drops_keys() -> None:
    env = {"WG_PRIVATE_KEY": "k", "WG_PEER_1_PRESHARED_KEY": "p", "WG_HIDE_KEYS": "never",
           "PATH": "/bin", "SHARDWG_WORKERS": "2"}  # fmt: skip
    assert command.child_environment(env) == {
        "WG_HIDE_KEYS": "never", "PATH": "/bin", "SHARDWG_WORKERS": "2"
    }  # fmt: skip


def test_cgroup_cpu_limit(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "pod" / "ctr").mkdir(parents=True)
    (v2 / "pod" / "cpu.max").write_text("250000 100000\n")
    (v2 / "pod" / "ctr" / "cpu.max").write_text("max 100000\n")
    cg = tmp_path / "cgroup"
    cg.write_text("0::/pod/ctr\n")
    assert command.cgroup_cpu_limit(str(v2), str(cg)) == 3  # 2.5 CPUs, from the parent
    assert cgroup_cpu_quota(str(v2), str(cg)) == 2.5  # what --spread auto counts
    (v2 / "pod" / "cpu.max").write_text("max 100000\n")
    assert command.cgroup_cpu_limit(str(v2), str(cg)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "x").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "x" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu,cpuacct" / "docker" / "x" / "cpu.cfs_period_us").write_text("100000\n")
    cg.write_text("4:cpu,cpuacct:/docker/x\n3:memory:/docker/x\n")
    assert command.cgroup_cpu_limit(str(v1), str(cg)) == 1
    assert cgroup_cpu_quota(str(v1), str(cg)) == 0.5


def test_run_supports_reads_the_cli() -> None:
    assert command.run_supports("--config")
    assert command.run_supports("--log-format")
    assert not command.run_supports("--no-such-option")
