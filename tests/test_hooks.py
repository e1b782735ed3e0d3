"""wg-quick's PreUp/PostUp/PreDown/PostDown and DNS: the runner alone (real bash), then a real
gateway in a namespace whose hooks leave evidence in files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import wgconf
from lab.harness import Harness
from lab.keys import keypair
from lab.netns import Namespace, lab_env, stop_popen, unique_ifname, wait_for
from shardwg.config.model import InterfaceConfig
from shardwg.engine import hooks as H

# -- the runner --------------------------------------------------------------------------


def iface(**kw: list[str]) -> InterfaceConfig:
    return InterfaceConfig(private_key=b"\x01" * 32, **kw)  # type: ignore[arg-type]


def test_substitute_every_percent_i() -> None:
    assert H.substitute("iptables -A FORWARD -i %i -o %i", "wg7") == (
        "iptables -A FORWARD -i wg7 -o wg7"
    )
    assert H.substitute("echo 100%", "wg0") == "echo 100%"


def test_dns_split_like_wg_quick() -> None:
    servers, search = H.split_dns(["10.0.0.53", "fd00::53", "corp.example", "lan"])
    assert servers == ["10.0.0.53", "fd00::53"] and search == ["corp.example", "lan"]
    assert H.resolvconf_input(["1.1.1.1", "corp.example", "lan"]) == (
        "nameserver 1.1.1.1\nsearch corp.example lan\n"
    )
    assert H.resolvconf_input(["1.1.1.1"]) == "nameserver 1.1.1.1\n"


def test_resolvconf_name_takes_the_interface_order_prefix(tmp_path: Path) -> None:
    order = tmp_path / "interface-order"
    assert H.resolvconf_name("wg0", str(order)) == "wg0"  # no file: the bare name
    order.write_text("lo.inet6\nlo.inet\ntun*\ntap*\nhso*\nem+([0-9])?(_+([0-9]))*\n")
    assert H.resolvconf_name("wg0", str(order)) == "tun.wg0"


def test_hooks_run_in_order_with_percent_i(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hooks = H.Hooks("wgx1", iface(post_up=[f"echo one %i >> {log}", f"echo two %i >> {log}"]))
    hooks.run("PostUp")
    assert log.read_text() == "one wgx1\ntwo wgx1\n"


def test_a_failing_hook_stops_its_phase_like_set_e(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hooks = H.Hooks("wgx1", iface(pre_up=[
        f"echo first >> {log}",
        f"false; echo same-hook-after-false >> {log}",  # wg-quick's set -e: stops here
        f"echo next-hook >> {log}",
    ]))  # fmt: skip
    with pytest.raises(H.HookError, match=r"PreUp hook failed \(exit code 1\): false"):
        hooks.run("PreUp")
    assert log.read_text() == "first\n"
    piped = H.Hooks("x", iface(pre_up=["false | true"]))  # pipefail, as in wg-quick
    with pytest.raises(H.HookError):
        piped.run("PreUp")


def test_no_hooks_runs_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    H.Hooks("x", iface(post_up=[f"echo ran >> {log}"]), run_hooks=False).run("PostUp")
    assert not log.exists()


def test_pump_serves_while_a_hook_runs_and_can_abandon_it() -> None:
    calls = []

    def pump() -> bool:
        calls.append(time.monotonic())
        return len(calls) < 3

    t0 = time.monotonic()
    with pytest.raises(H.HookError, match="killed by signal 15"):
        H.Hooks("x", iface(post_up=["sleep 30"])).run("PostUp", pump)
    assert len(calls) == 3 and time.monotonic() - t0 < 10


def test_trust_problem(tmp_path: Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text("")
    conf.chmod(0o600)
    assert H.trust_problem(str(conf)) is None
    conf.chmod(0o620)
    assert "writable by group or others" in (H.trust_problem(str(conf)) or "")
    conf.chmod(0o644)  # readable is wg-quick's business (the key warning), not a hook risk
    assert H.trust_problem(str(conf)) is None
    if os.geteuid() == 0:
        os.chown(conf, 12345, -1)
        assert "owned by uid 12345" in (H.trust_problem(str(conf)) or "")


def test_dns_without_resolvconf_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no resolvconf on it
    hooks = H.Hooks("wg9", iface(dns=["10.0.0.53"]))
    with caplog.at_level(logging.WARNING):
        hooks.set_dns()
    assert "resolvconf is not installed" in caplog.text and "10.0.0.53" in caplog.text
    assert not hooks.dns_set


def fake_resolvconf(directory: Path, record: Path, exit_code: int = 0) -> Path:
    """A resolvconf that appends its arguments and stdin to `record`."""
    directory.mkdir(exist_ok=True)
    tool = directory / "resolvconf"
    tool.write_text(f'#!/bin/bash\n{{ echo "args: $*"; cat; }} >> {record}\nexit {exit_code}\n')
    tool.chmod(0o755)
    return tool


def test_dns_through_resolvconf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record"
    tool = fake_resolvconf(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    hooks = H.Hooks("wg9", iface(dns=["10.0.0.53", "corp.example"]))
    hooks.set_dns()
    assert record.read_text() == (
        f"args: -a {H.resolvconf_name('wg9')} -m 0 -x\nnameserver 10.0.0.53\nsearch corp.example\n"
    )
    hooks.unset_dns()
    hooks.unset_dns()  # once only
    assert record.read_text().count("args: -d") == 1
    failing = fake_resolvconf(tmp_path / "bin2", record, exit_code=5)
    monkeypatch.setenv("PATH", f"{failing.parent}:{os.environ['PATH']}")
    with pytest.raises(H.HookError, match="exit code 5"):
        H.Hooks("wg9", iface(dns=["10.0.0.53"])).set_dns()


# -- a real gateway in a namespace -------------------------------------------------------

LINK = "ip -o link show dev %i 2>/dev/null | wc -l"  # 1 while the interface exists, else 0


def write_config(tmp: Path, ifname: str, lines: list[str], mode: int = 0o600) -> Path:
    text = wgconf.config_text(
        wgconf.interface_section(keypair()[0], 0, ["10.77.0.1/24"], 1420, "\n".join(lines)),
        [{"public_key": keypair()[1], "allowed_ips": ["10.77.5.0/24"]}],
    )
    path = wgconf.write_secret(tmp / f"{ifname}.conf", text)
    path.chmod(mode)
    return path


def run_cmd(conf: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shardwg", "run", "--config", str(conf), "--workers", "2",
            *extra]  # fmt: skip


def start(ns: Namespace, conf: Path, out: Path, path_prefix: str = "",
          extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:  # fmt: skip
    env = lab_env({"PATH": f"{path_prefix}:{os.environ['PATH']}"} if path_prefix else None)
    with open(out, "wb") as f:
        proc = ns.popen(run_cmd(conf, *extra), stdout=f, stderr=subprocess.STDOUT, env=env)
    ok = wait_for(lambda: "serving" in out.read_text() or proc.poll() is not None, 20)
    assert ok and proc.poll() is None, out.read_text()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=15)
    finally:
        stop_popen(proc)


def link_exists(ns: Namespace, ifname: str) -> bool:
    return ns.ip("link", "show", "dev", ifname, check=False).returncode == 0


@pytest.mark.netns
@pytest.mark.interop  # PostUp calls the real `wg`
def test_hooks_run_at_wg_quicks_moments(netns_factory: Harness, tmp_path: Path) -> None:
    (ns,) = netns_factory(1, "hk")
    ifname = unique_ifname("hk")
    ev = tmp_path / "evidence"
    extra_peer = keypair()[1]
    conf = write_config(tmp_path, ifname, [
        f'PreUp = echo "preup1 %i link=$({LINK})" >> {ev}',
        f"PreUp = echo preup2 %i >> {ev}",
        f"PostUp = echo \"postup1 %i link=$({LINK}) addr=$(ip -o -4 addr show dev %i"
        f" | awk '{{print $4}}') route=$(ip route show 10.77.5.0/24 dev %i | wc -l)\" >> {ev}",
        f"PostUp = echo \"postup2 port=$(wg show %i listen-port)\" >> {ev}",  # UAPI served
        f"PostUp = wg set %i peer {extra_peer} allowed-ips 10.77.9.0/24",  # ...and changes apply
        f'PreDown = echo "predown %i link=$({LINK}) peers=$(wg show %i peers | wc -l)" >> {ev}',
        f'PostDown = echo "postdown1 %i link=$({LINK})" >> {ev}',
        f"PostDown = echo postdown2 %i >> {ev}",
    ])  # fmt: skip
    out = tmp_path / "out"
    proc = start(ns, conf, out)
    lines = ev.read_text().splitlines()
    assert lines[:2] == [f"preup1 {ifname} link=0", f"preup2 {ifname}"], lines
    assert lines[2] == f"postup1 {ifname} link=1 addr=10.77.0.1/24 route=1", lines
    assert lines[3].startswith("postup2 port=") and int(lines[3].split("=")[1]) > 0, lines
    assert len(lines) == 4  # nothing of the down phases yet
    assert "10.77.9.0/24" in ns.ip("route", "show", "dev", ifname).stdout  # wg set took effect
    assert stop(proc) == 0, out.read_text()
    assert ev.read_text().splitlines()[4:] == [
        f"predown {ifname} link=1 peers=2",
        f"postdown1 {ifname} link=0",
        f"postdown2 {ifname}",
    ]
    assert not link_exists(ns, ifname)
    assert "[#] echo preup2 " + ifname in out.read_text()  # echoed like wg-quick


@pytest.mark.netns
def test_failing_postup_fails_the_start_and_removes_the_interface(
    netns_factory: Harness, tmp_path: Path
) -> None:
    (ns,) = netns_factory(1, "hk")
    ifname = unique_ifname("hk")
    ev = tmp_path / "evidence"
    record = tmp_path / "resolvconf"
    tool = fake_resolvconf(tmp_path / "bin", record)
    conf = write_config(tmp_path, ifname, [
        "DNS = 10.77.0.53, corp.example",
        f"PostUp = echo postup1 link=$({LINK}) >> {ev}",
        f"PostUp = echo postup2 >> {ev}; exit 7",
        f"PostUp = echo postup3 >> {ev}",
        f"PreDown = echo predown >> {ev}",
        f"PostDown = echo postdown >> {ev}",
    ])  # fmt: skip
    env = lab_env({"PATH": f"{tool.parent}:{os.environ['PATH']}"})
    done = ns.run(run_cmd(conf), check=False, timeout=60, env=env)
    assert done.returncode == 1, done.stderr
    assert "PostUp hook failed (exit code 7)" in done.stderr
    assert ev.read_text().splitlines() == ["postup1 link=1", "postup2"]  # nothing further
    assert not link_exists(ns, ifname)  # undone, as wg-quick's EXIT trap does
    assert not os.path.exists(f"/dev/shm/shardwg-{ifname}")
    assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")
    calls = [line for line in record.read_text().splitlines() if line.startswith("args:")]
    assert calls == [f"args: -a {H.resolvconf_name(ifname)} -m 0 -x",
                     f"args: -d {H.resolvconf_name(ifname)} -f"]  # fmt: skip


@pytest.mark.netns
def test_failing_preup_creates_nothing(netns_factory: Harness, tmp_path: Path) -> None:
    (ns,) = netns_factory(1, "hk")
    ifname = unique_ifname("hk")
    ev = tmp_path / "evidence"
    conf = write_config(tmp_path, ifname, [
        f"PreUp = echo preup1 >> {ev}", "PreUp = exit 3", f"PreUp = echo preup3 >> {ev}",
        f"PostUp = echo postup >> {ev}", f"PostDown = echo postdown >> {ev}",
    ])  # fmt: skip
    done = ns.run(run_cmd(conf), check=False, timeout=60)
    assert done.returncode == 1 and "PreUp hook failed (exit code 3)" in done.stderr
    assert ev.read_text() == "preup1\n"
    assert not link_exists(ns, ifname)
    assert not os.path.exists(f"/dev/shm/shardwg-{ifname}")


@pytest.mark.netns
def test_an_existing_interface_is_neither_hooked_nor_deleted(
    netns_factory: Harness, tmp_path: Path
) -> None:
    """wg-quick refuses an existing interface before PreUp; and the one that exists is not
    ours to delete (shardwg used to remove it while undoing its failed start)."""
    (ns,) = netns_factory(1, "hk")
    ifname = unique_ifname("hk")
    ns.ip("link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p")
    ev = tmp_path / "evidence"
    conf = write_config(tmp_path, ifname, [f"PreUp = echo preup >> {ev}"])
    done = ns.run(run_cmd(conf), check=False, timeout=60)
    assert done.returncode == 1 and "already exists" in done.stderr
    assert not ev.exists()
    assert link_exists(ns, ifname)


@pytest.mark.netns
def test_hooks_trust_and_no_hooks(netns_factory: Harness, tmp_path: Path) -> None:
    (ns,) = netns_factory(1, "hk")
    ifname = unique_ifname("hk")
    ev = tmp_path / "evidence"
    conf = write_config(tmp_path, ifname, [f"PostUp = echo postup >> {ev}"], mode=0o660)
    done = ns.run(run_cmd(conf), check=False, timeout=60)
    assert done.returncode == 1 and "refusing to run hooks" in done.stderr
    assert "writable by group or others" in done.stderr and not link_exists(ns, ifname)
    conf.chmod(0o600)
    out = tmp_path / "out"
    proc = start(ns, conf, out, extra=("--no-hooks",))
    assert "1 hook(s) in the config not run (--no-hooks)" in out.read_text()
    assert stop(proc) == 0
    assert not ev.exists()
