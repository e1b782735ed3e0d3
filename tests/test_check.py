"""`shardwg check`: the verdicts from given facts, then the real probes (as root: everything
present, nothing left behind; as nobody: the fallback path says why it is partial)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardwg.observe import check as C
from shardwg.observe import probes as P

REPO = Path(__file__).resolve().parent.parent


def good() -> P.Probes:
    return P.Probes(
        kernel="6.1.0-18-amd64", machine="x86_64", root=True,
        where="a throwaway network namespace",
        tun_tso=True, tun_uso=True, udp_gro=True, recvmmsg=True, native="OpenSSL 3.0.11",
        cpus_online=8, affinity=8, cgroup_limit=None, workers=8,
    )  # fmt: skip


def warnings(p: P.Probes) -> dict[str, C.Item]:
    return {i.name: i for i in C.assess(p) if not i.ok}


def test_everything_present_warns_of_nothing() -> None:
    assert warnings(good()) == {}
    text = C.render(good(), C.assess(good()))
    assert "everything the data path uses is present" in text
    assert "ok, built against OpenSSL 3.0.11" in text and "8 (shardwg run's default" in text


@pytest.mark.parametrize(
    ("change", "name", "in_fix"),
    [
        ({"kernel": "4.19.0"}, "kernel", "newer kernel"),
        ({"root": False}, "privileges", "as root"),
        ({"tun": "No such file or directory"}, "TUN device", "--device /dev/net/tun"),
        ({"tun": "Permission denied"}, "TUN device", "NET_ADMIN"),
        ({"multiqueue": "Invalid argument"}, "multiqueue TUN", "CONFIG_TUN"),
        ({"tun_tso": False, "tun_uso": False}, "TUN offloads", "TUNSETOFFLOAD"),
        ({"tun_uso": False}, "TUN offloads", "6.2"),
        ({"udp_gso": "Invalid argument"}, "UDP GSO", "UDP_SEGMENT"),
        ({"udp_gro": False}, "UDP GRO", "UDP_GRO"),
        ({"reuseport_bpf": "Invalid argument"}, "reuseport BPF", "SO_ATTACH_REUSEPORT_CBPF"),
        ({"tun_steering": "Operation not permitted"}, "TUN steering", "--cap-add BPF"),
        ({"recvmmsg": False}, "recvmmsg", "recvmmsg"),
        ({"native": None}, "native data path", "build_ext --inplace"),
        ({"native_disabled": True}, "native data path", "unset SHARDWG_NATIVE"),
        ({"cgroup_limit": 2, "workers": 2}, "CPUs", "limits.cpu"),
        ({"affinity": 4, "workers": 4}, "CPUs", "taskset"),
        ({"affinity": 1, "cpus_online": 1, "workers": 1}, "workers", "more cores"),
        ({"machine": "aarch64", "workers": 1}, "workers", "Memory ordering"),
    ],
)
def test_each_missing_piece_warns_with_its_fix(change: dict, name: str, in_fix: str) -> None:
    p = good()
    for k, v in change.items():
        setattr(p, k, v)
    found = warnings(p)
    assert set(found) == {name}, found
    assert found[name].warning and in_fix in found[name].fix


def test_tun_steering_matters_only_with_two_workers() -> None:
    p = good()
    p.tun_steering, p.workers, p.affinity, p.cpus_online = "Operation not permitted", 1, 1, 1
    assert "TUN steering" not in {i.name for i in C.assess(p)}


def test_a_missing_tun_hides_the_tun_details() -> None:
    p = good()
    p.tun, p.multiqueue = "No such file or directory", "no /dev/net/tun"
    assert set(warnings(p)) == {"TUN device"}


def test_check_with_probes_monkeypatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole command over fake probes: the exit status follows the warnings."""
    net = P.Probes(where="a throwaway network namespace", tun_tso=True, tun_uso=False,
                   udp_gro=True, udp_gso="Input/output error")  # fmt: skip
    monkeypatch.setattr(P, "_in_throwaway_namespace", lambda: net)
    monkeypatch.setattr(P, "_native", lambda: (None, "No module named '_native'"))
    monkeypatch.setenv("SHARDWG_NATIVE", "1")
    text, status = C.check()
    assert status == 1
    for name in ("UDP GSO", "TUN offloads", "native data path"):
        assert f"  - {name}: " in text, text
    data, _ = C.check(as_json=True)
    items = {i["name"]: i for i in json.loads(data)["items"]}
    assert items["UDP GSO"]["value"] == "missing (Input/output error)"
    assert items["UDP GRO"]["ok"] is True


def test_kernel_version() -> None:
    assert C.kernel_version("6.18.44-fc-v1147") == (6, 18)
    assert C.kernel_version("garbage") == (0, 0)


def run_check(*prefix: str) -> subprocess.CompletedProcess[str]:
    # what the machine gives, whichever path this test run forces with SHARDWG_NATIVE (the
    # suite runs once with SHARDWG_NATIVE=0, which check rightly reports as a gap)
    env = {k: v for k, v in os.environ.items() if k != "SHARDWG_NATIVE"}
    return subprocess.run([*prefix, sys.executable, "-m", "shardwg", "check", "--json"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=env)  # fmt: skip


@pytest.mark.netns  # root
def test_as_root_everything_is_present_and_nothing_is_left_behind() -> None:
    done = run_check()
    out = json.loads(done.stdout)
    probes, items = out["probes"], {i["name"]: i for i in out["items"]}
    assert probes["where"] == "a throwaway network namespace"
    native_here = importlib.util.find_spec("shardwg.datapath._native") is not None
    bad = {n: i for n, i in items.items() if not i["ok"]}
    if native_here:  # built in this tree: it must be found, with its OpenSSL
        from shardwg.datapath import _native  # type: ignore[attr-defined]

        assert items["native data path"]["value"] == f"ok, built against {_native.OPENSSL_VERSION}"
    else:
        assert set(bad) <= {"native data path"}
        bad.pop("native data path", None)
    for name in ("TUN device", "multiqueue TUN", "UDP GSO", "UDP GRO", "reuseport BPF"):
        assert items[name]["ok"], items[name]
    if "TUN steering" in items:  # listed with 2 workers or more
        assert items["TUN steering"]["ok"], items["TUN steering"]
    assert items["TUN offloads"]["value"].startswith("TSO ok")
    assert not {n for n in bad if n not in ("CPUs", "workers")}, bad  # shared CI boxes vary
    assert done.returncode == (1 if any(not i["ok"] for i in items.values()) else 0)
    # the TUN was made in a namespace that died with the probing child (other agents share
    # this host, so only our own names are checked)
    after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "swgchk" not in after


@pytest.mark.netns
def test_without_privileges_it_says_why_the_probes_are_partial() -> None:
    done = run_check("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    out = json.loads(done.stdout)
    assert done.returncode == 1
    assert out["probes"]["where"].startswith("the current network namespace")
    items = {i["name"]: i for i in out["items"]}
    assert not items["privileges"]["ok"] and "as root" in items["privileges"]["fix"]
    assert (
        "NET_ADMIN" in items["TUN device"]["fix"]
        or "NET_ADMIN" in items.get("multiqueue TUN", {"fix": ""})["fix"]
    )


def test_default_workers_is_affinity_capped_by_the_quota() -> None:
    from shardwg.observe.cpus import default_workers

    assert default_workers(8, 3) == 3 and default_workers(8, None) == 8
    assert default_workers(2, 5) == 2 and default_workers(1, None) == 1


@pytest.mark.parametrize(("machine", "workers"), [("aarch64", 1), ("arm64", 1), ("x86_64", 8)])
def test_off_x86_64_check_says_one_worker_and_why(
    monkeypatch: pytest.MonkeyPatch, machine: str, workers: int
) -> None:
    """shardwg run starts one worker off x86-64 (shm/ordering.py): check must say so, and
    why, rather than promise a worker per core."""
    net = P.Probes(where="a throwaway network namespace", tun_tso=True, tun_uso=True,
                   udp_gro=True)  # fmt: skip
    monkeypatch.setattr(P, "_in_throwaway_namespace", lambda: net)
    monkeypatch.setattr(P, "_native", lambda: ("OpenSSL 3.0.11", ""))
    monkeypatch.setattr(P, "affinity_cores", lambda: 8)
    monkeypatch.setattr(P, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(P.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(P.platform, "machine", lambda: machine)
    monkeypatch.delenv("SHARDWG_NATIVE", raising=False)
    data, status = C.check(as_json=True)
    out = json.loads(data)
    item = {i["name"]: i for i in out["items"]}["workers"]
    assert out["probes"]["machine"] == machine and out["probes"]["workers"] == workers
    assert item["value"] == f"{workers} (shardwg run's default here)"
    if workers == 1:
        assert not item["ok"] and status == 1
        assert f"this CPU is {machine}" in item["warning"] and "x86-64" in item["warning"]
        assert "Memory ordering" in item["fix"]
        text, _ = C.check()
        assert f"  - workers: {item['warning']}" in text
    else:
        assert item["ok"], item
