"""The example configs in configs/ and the deployment files in deploy/: they parse, they say what
they claim, and the site-to-site pair really carries traffic between two LANs through two
shardwg gateways.

The end-to-end test rebuilds the pair's network in namespaces with the configs' own addresses:

    lan-a 192.168.10.10 -- 192.168.10.1 site-a 203.0.113.1 -- internet (router)
                                    -- 198.51.100.2 site-b 192.168.20.1 -- lan-b 192.168.20.10

and runs `shardwg run` on configs/site-a.conf and configs/site-b.conf as written except for the
keys (fresh ones, filled in by `fill_keys`, as an operator would) and the file names (the config
stem is the interface name, and UAPI socket names are shared by every namespace).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lab.harness import Harness
from lab.keys import keypair, pubkey
from lab.netns import REPO_ROOT, RUN_PREFIX, Namespace, unique_ifname, veth_link, wait_for
from lab.ping import ping
from lab.transfer import Transfer
from shardwg.config.model import Config, load_config, parse_config

CONFIGS = REPO_ROOT / "configs"
DEPLOY = REPO_ROOT / "deploy"
CONF_FILES = sorted(CONFIGS.glob("*.conf"))
EXAMPLE_MARK = "example only"
_KEY_LINE = re.compile(r"^(\s*(PrivateKey|PublicKey|PresharedKey)\s*=\s*)(\S+)", re.M | re.I)
_PUB_COMMENT = re.compile(r"public key of the key above[^:]*:\s*(\S+)")


def conf(name: str) -> Config:
    return load_config(str(CONFIGS / f"{name}.conf"))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def networks(cidrs: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def covered(net: str, allowed: list[str]) -> bool:
    n = ipaddress.ip_network(net, strict=False)
    return any(n.version == a.version and n.subnet_of(a) for a in networks(allowed))  # type: ignore[arg-type]


# -- the examples parse and are honest -----------------------------------------------------


def test_configs_dir_has_the_documented_examples() -> None:
    names = {p.name for p in CONFIGS.iterdir()}
    assert {"site-a.conf", "site-b.conf", "hub.conf", "sidecar.conf", "README.md"} <= names
    readme = (CONFIGS / "README.md").read_text()
    for p in CONF_FILES:
        assert p.name in readme, f"configs/README.md does not explain {p.name}"
    for needle in ("shardwg genkey", "shardwg pubkey", "net.ipv4.ip_forward", "NAT"):
        assert needle in readme


@pytest.mark.parametrize("path", CONF_FILES, ids=[p.name for p in CONF_FILES])
def test_example_parses_with_marked_valid_keys(path: Path) -> None:
    text = path.read_text()
    cfg = parse_config(text, str(path))  # every key is valid base64 of 32 bytes, or this raises
    assert len(cfg.interface.private_key) == 32 and cfg.peers
    assert EXAMPLE_MARK in text and "shardwg genkey" in text
    for m in _KEY_LINE.finditer(text):
        before = text[: m.start()].splitlines()[-3:]
        assert any(EXAMPLE_MARK in line.lower() for line in before), (
            f"{path.name}: the key at {m.group(2)} is not marked {EXAMPLE_MARK!r} just above it"
        )
    # the public key quoted for the operator is the real one
    quoted = _PUB_COMMENT.findall(text)
    assert quoted == [pubkey(b64(cfg.interface.private_key))], path.name
    # and no two examples share a private key
    privs = [load_config(str(p)).interface.private_key for p in CONF_FILES]
    assert len(set(privs)) == len(privs)


def test_site_pair_is_consistent() -> None:
    a, b = conf("site-a"), conf("site-b")
    (peer_b,) = a.peers
    (peer_a,) = b.peers
    assert peer_b.public_key == base64.b64decode(pubkey(b64(b.interface.private_key)))
    assert peer_a.public_key == base64.b64decode(pubkey(b64(a.interface.private_key)))
    assert peer_b.preshared_key == peer_a.preshared_key
    # each side routes the other's LAN and tunnel address, and not its own LAN
    assert covered("192.168.20.0/24", peer_b.allowed_ips)
    assert covered("192.168.10.0/24", peer_a.allowed_ips)
    assert not covered("192.168.10.0/24", peer_b.allowed_ips)
    assert not covered("192.168.20.0/24", peer_a.allowed_ips)
    tun_a = ipaddress.ip_interface(a.interface.addresses[0])
    tun_b = ipaddress.ip_interface(b.interface.addresses[0])
    assert (str(tun_a.ip), str(tun_b.ip)) == ("10.10.0.1", "10.10.0.2")
    assert covered(f"{tun_b.ip}/32", peer_b.allowed_ips)
    assert covered(f"{tun_a.ip}/32", peer_a.allowed_ips)
    # B dials A's listen port and keeps the path open; A waits (B may be behind NAT)
    assert a.interface.listen_port and peer_a.endpoint is not None
    assert peer_a.endpoint.port == a.interface.listen_port
    assert peer_a.persistent_keepalive == 25 and peer_b.persistent_keepalive == 0
    assert a.interface.table is None and b.interface.table is None  # routes in the main table


def test_hub_peers_do_not_overlap() -> None:
    hub = conf("hub")
    assert len(hub.peers) == 8
    seen: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for p in hub.peers:
        nets = networks(p.allowed_ips)
        assert [n.prefixlen for n in nets] == [32, 24], p.allowed_ips  # a /32 plus a LAN
        subnets = [str(ipaddress.ip_interface(a).network) for a in hub.interface.addresses]
        assert covered(str(nets[0]), subnets)  # the tunnel address is in the hub's subnet
        for n in nets:
            assert not any(n.overlaps(s) for s in seen), f"{n} overlaps"  # type: ignore[arg-type]
            seen.append(n)
    assert len({p.public_key for p in hub.peers}) == 8


def test_sidecar_is_narrow() -> None:
    side = conf("sidecar")
    i = side.interface
    assert i.fwmark and i.listen_port is None and not i.save_config
    assert i.table in (None, "auto", "off")
    (peer,) = side.peers
    for n in networks(peer.allowed_ips):
        assert n.prefixlen >= 8, "a sidecar must not route everything through the tunnel"
    assert covered("10.50.1.1/32", peer.allowed_ips)
    assert peer.endpoint is not None and peer.persistent_keepalive


# -- fill_keys: what an operator does to the examples --------------------------------------


def fill_keys(template: str, keys: dict[str, str]) -> str:
    """The template with every key replaced: keys maps each old (example) key to a new one."""

    def swap(m: re.Match[str]) -> str:
        return m.group(1) + keys[m.group(3)]

    out = _KEY_LINE.sub(swap, template)
    return _PUB_COMMENT.sub(lambda m: m.group(0).replace(m.group(1), keys.get(m.group(1), "")), out)


def fresh_site_pair() -> tuple[str, str, dict[str, str]]:
    """site-a.conf and site-b.conf text with fresh keys (example private and public keys both
    mapped), and the new keys by role."""
    a_text = (CONFIGS / "site-a.conf").read_text()
    b_text = (CONFIGS / "site-b.conf").read_text()
    a, b = parse_config(a_text), parse_config(b_text)
    (a_priv, a_pub), (b_priv, b_pub) = keypair(), keypair()
    mapping = {
        b64(a.interface.private_key): a_priv,
        pubkey(b64(a.interface.private_key)): a_pub,
        b64(b.interface.private_key): b_priv,
        pubkey(b64(b.interface.private_key)): b_pub,
    }
    new = {"a_priv": a_priv, "a_pub": a_pub, "b_priv": b_priv, "b_pub": b_pub}
    return fill_keys(a_text, mapping), fill_keys(b_text, mapping), new


def test_fill_keys_makes_a_working_pair() -> None:
    a_text, b_text, new = fresh_site_pair()
    a, b = parse_config(a_text), parse_config(b_text)
    assert b64(a.interface.private_key) == new["a_priv"]
    assert b64(a.peers[0].public_key) == new["b_pub"]
    assert b64(b.peers[0].public_key) == new["a_pub"]
    assert EXAMPLE_MARK in a_text  # comments stay; the keys in them are replaced too
    assert new["a_pub"] in a_text and conf("site-a").peers[0].allowed_ips == a.peers[0].allowed_ips


# -- end to end: two LANs through two gateways -------------------------------------------


class GatewayRun:
    """`shardwg run --config <file>` in ns, logging to a file; stop() sends SIGTERM."""

    def __init__(self, ns: Namespace, ifname: str, text: str, workers: int = 2) -> None:
        self.ns, self.ifname = ns, ifname
        self.tmp = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{ifname}-")
        self.path = Path(self.tmp) / f"{ifname}.conf"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, text.encode())
        os.close(fd)
        self.log_path = Path(self.tmp) / "shardwg.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = ns.popen(
            [sys.executable, "-m", "shardwg", "run", "--config", str(self.path),
             "--workers", str(workers)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        ns.on_close(self.close)
        ok = wait_for(lambda: "serving" in self.log() or self.proc.poll() is not None, 20)
        assert ok and self.proc.poll() is None, f"{ifname} did not start:\n{self.log()}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        return int(self.proc.returncode)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        if not self._log.closed:
            self._log.close()
        if not os.environ.get("SWG_KEEP_LOGS"):
            shutil.rmtree(self.tmp, ignore_errors=True)


def forwarding(ns: Namespace, on: bool) -> None:
    """net.ipv4.ip_forward of that namespace only (each namespace has its own)."""
    ns.run(["sh", "-c", f"echo {int(on)} > /proc/sys/net/ipv4/ip_forward"])


def endpoint_of(ns: Namespace, ifname: str, peer_pub: str) -> str:
    for line in ns.run(["wg", "show", ifname, "endpoints"]).stdout.splitlines():
        key, _, ep = line.partition("\t")
        if key == peer_pub:
            return "" if ep == "(none)" else ep
    return ""


@pytest.mark.netns
@pytest.mark.interop
def test_site_to_site_lan_to_lan(netns_factory: Harness) -> None:
    h = netns_factory
    lan_a, site_a, inet, site_b, lan_b = (h(1, label)[0] for label in
                                          ("lana", "sitea", "inet", "siteb", "lanb"))  # fmt: skip
    # the public side: site A and site B on different networks, a router between them
    veth_link(site_a, inet, ["203.0.113.1/24"], ["203.0.113.254/24"], "wan", "to-a")
    veth_link(site_b, inet, ["198.51.100.2/24"], ["198.51.100.254/24"], "wan", "to-b")
    forwarding(inet, True)
    site_a.ip("route", "add", "default", "via", "203.0.113.254")
    site_b.ip("route", "add", "default", "via", "198.51.100.254")
    # the LANs, each host's default route pointing at its site's gateway
    veth_link(site_a, lan_a, ["192.168.10.1/24"], ["192.168.10.10/24"], "lan", "eth0")
    veth_link(site_b, lan_b, ["192.168.20.1/24"], ["192.168.20.10/24"], "lan", "eth0")
    lan_a.ip("route", "add", "default", "via", "192.168.10.1")
    lan_b.ip("route", "add", "default", "via", "192.168.20.1")
    # what configs/README.md tells a site-to-site gateway to do
    forwarding(site_a, True)
    forwarding(site_b, True)

    a_text, b_text, keys = fresh_site_pair()
    if_a, if_b = unique_ifname("sita"), unique_ifname("sitb")
    gw_a = GatewayRun(site_a, if_a, a_text)
    gw_b = GatewayRun(site_b, if_b, b_text)
    logs = lambda: f"--- site-a ---\n{gw_a.log()}\n--- site-b ---\n{gw_b.log()}"  # noqa: E731
    try:
        # site B dials A by itself (PersistentKeepalive): A learns B's endpoint with no traffic
        assert wait_for(lambda: endpoint_of(site_a, if_a, keys["b_pub"]) != "", 10), logs()
        assert endpoint_of(site_a, if_a, keys["b_pub"]) == "198.51.100.2:51820"
        # so a host on LAN A can reach LAN B first, though A has no Endpoint for B
        assert ping(lan_a, "192.168.20.10", count=3, timeout=10), logs()
        assert ping(lan_b, "192.168.10.10", count=3, timeout=10), logs()
        assert ping(lan_a, "10.10.0.2", count=2, timeout=10), logs()  # B's tunnel address
        # routes came from AllowedIPs (Table = auto): LAN B via the tunnel on A
        route = site_a.run(["ip", "route", "get", "192.168.20.10"]).stdout
        assert f"dev {if_a}" in route, route

        # a TCP transfer, checked with sha256, from a host on LAN A to a host on LAN B
        tr = Transfer(lan_b, lan_a, "192.168.20.10", 5201, 2 << 20, seed=11, timeout=60).run()
        assert tr.ok and tr.received_bytes == 2 << 20, (tr, logs())

        # B counted it on its peer (workers publish counters about once a second)
        def b_received() -> int:
            return int(site_b.run(["wg", "show", if_b, "transfer"]).stdout.split()[1])

        assert wait_for(lambda: b_received() > 2 << 20, 5), b_received()

        # the README's warning is real: without forwarding on B, LAN B is unreachable
        forwarding(site_b, False)
        assert not ping(lan_a, "192.168.20.10", count=1, timeout=2)
        forwarding(site_b, True)
        assert ping(lan_a, "192.168.20.10", count=2, timeout=10), logs()
    finally:
        codes = (gw_a.stop(), gw_b.stop())
    assert codes == (0, 0), logs()
    for ns, ifname in ((site_a, if_a), (site_b, if_b)):
        assert ns.ip("link", "show", ifname, check=False).returncode != 0


# -- deploy/: compose, Kubernetes, systemd, Dockerfile --------------------------------------


def _scalar(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    if text[0] == '"':
        return json.loads(text)  # YAML's double-quoted escapes, as far as JSON has them
    if text[0] == "'":
        assert text[-1] == "'", f"unterminated string {text!r}"
        return text[1:-1].replace("''", "'")
    if text[0] in "[{":
        return json.loads(text)  # flow collections kept JSON-compatible in our files
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    return text


def _strip_comment(line: str) -> str:
    out, quote = [], ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            break
        out.append(ch)
    return "".join(out).rstrip()


def mini_yaml(text: str) -> list[Any]:
    """Documents of a block-style YAML subset (maps, lists, scalars, JSON-compatible flow
    collections, `|` literal blocks): the fallback when PyYAML is not installed, and checked
    against PyYAML when it is."""
    assert "\t" not in text, "tabs in YAML"
    docs: list[list[tuple[int, str]]] = [[]]
    raw = text.split("\n")
    i = 0
    while i < len(raw):
        line = raw[i]
        if line.strip() == "---":
            docs.append([])
        elif line.rstrip().endswith(": |") or line.rstrip().endswith(": |-"):
            indent = len(line) - len(line.lstrip())
            lines: list[str] = []
            i += 1
            while i < len(raw) and (
                not raw[i].strip() or len(raw[i]) - len(raw[i].lstrip()) > indent
            ):
                lines.append(raw[i])
                i += 1
            while lines and not lines[-1].strip():
                lines.pop()
            inner = min((len(b) - len(b.lstrip()) for b in lines if b.strip()), default=0)
            chomp = "" if line.rstrip().endswith("-") else "\n"
            body = "\n".join(b[inner:] for b in lines) + chomp
            docs[-1].append((indent, line.split(":", 1)[0].strip() + ": " + json.dumps(body)))
            continue
        else:
            stripped = _strip_comment(line)
            if stripped.strip():
                docs[-1].append((len(stripped) - len(stripped.lstrip()), stripped.strip()))
        i += 1

    def parse(lines: list[tuple[int, str]], pos: int, indent: int) -> tuple[Any, int]:
        if lines[pos][1].startswith("- ") or lines[pos][1] == "-":
            seq = []
            while pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("-"):
                rest = lines[pos][1][1:].strip()
                if not rest:
                    value, pos = parse(lines, pos + 1, lines[pos + 1][0])
                elif re.match(r"[\w.\-/]+:( |$)", rest):  # "- key: value" opens a map
                    lines[pos] = (indent + 2, rest)
                    value, pos = parse(lines, pos, indent + 2)
                else:
                    value, pos = _scalar(rest), pos + 1
                seq.append(value)
            return seq, pos
        mapping: dict[str, Any] = {}
        while pos < len(lines) and lines[pos][0] == indent:
            key, sep, rest = lines[pos][1].partition(":")
            assert sep, f"not a mapping line: {lines[pos][1]!r}"
            key = _scalar(key)
            assert key not in mapping, f"duplicate key {key}"
            if rest.strip():
                mapping[key], pos = _scalar(rest), pos + 1
            elif pos + 1 < len(lines) and lines[pos + 1][0] >= indent and (
                lines[pos + 1][0] > indent or lines[pos + 1][1].startswith("-")
            ):
                mapping[key], pos = parse(lines, pos + 1, lines[pos + 1][0])
            else:
                mapping[key], pos = None, pos + 1
        return mapping, pos

    out = []
    for doc in docs:
        if not doc:
            continue
        value, end = parse(doc, 0, doc[0][0])
        assert end == len(doc), f"could not parse YAML near {doc[end][1]!r}"
        out.append(value)
    return out


def load_yaml(path: Path) -> list[Any]:
    docs = mini_yaml(path.read_text())
    try:
        import yaml
    except ImportError:
        return docs
    real = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert real == docs, f"{path.name}: the mini parser disagrees with PyYAML"
    return real


def test_compose_file() -> None:
    (doc,) = load_yaml(DEPLOY / "compose.yaml")
    gw = doc["services"]["shardwg"]
    assert gw["cap_add"] == ["NET_ADMIN"] and gw["cap_drop"] == ["ALL"]
    assert "/dev/net/tun:/dev/net/tun" in gw["devices"]
    mounts = [v for v in gw["volumes"] if "/etc/wireguard" in str(v)]
    assert mounts and all(str(v).endswith(":ro") for v in mounts)
    assert gw["sysctls"]["net.ipv4.ip_forward"] in (1, "1")
    assert gw["stop_signal"] == "SIGTERM" and gw.get("init") is not True


def test_k8s_sidecar_pod() -> None:
    docs = load_yaml(DEPLOY / "k8s-sidecar.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert {"Pod", "Secret"} <= kinds.keys()
    spec = kinds["Pod"]["spec"]
    assert not spec.get("hostNetwork") and not spec.get("hostPID")
    assert [c["name"] for c in spec["containers"]] == ["app"]
    # a native sidecar: an init container that keeps running (restartPolicy: Always)
    (sidecar,) = [c for c in spec["initContainers"] if c["name"] == "shardwg"]
    assert sidecar["restartPolicy"] == "Always"
    probe = ["python", "-m", "shardwg.container", "--healthcheck"]
    assert sidecar["startupProbe"]["exec"]["command"] == probe
    assert sidecar["livenessProbe"]["exec"]["command"] == probe
    sc = sidecar["securityContext"]
    assert sc["capabilities"]["add"] == ["NET_ADMIN"] and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    secret_vol = next(v for v in spec["volumes"] if "secret" in v)
    assert secret_vol["secret"]["defaultMode"] == 0o400
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == secret_vol["name"])
    assert mount["readOnly"] is True and mount["mountPath"] == "/etc/wireguard"
    secret = kinds["Secret"]
    # the Secret's config is a valid config (example keys)
    (conf_text,) = (secret.get("stringData") or {}).values()
    parse_config(conf_text, "k8s Secret")


def test_systemd_unit() -> None:
    unit = (DEPLOY / "shardwg@.service").read_text()
    for needle in (
        "ExecStart=/usr/local/bin/shardwg run --config /etc/wireguard/%i.conf",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "ProtectSystem=strict",
        "KillSignal=SIGTERM",
    ):
        assert needle in unit, needle
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    tmp = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}unit-")
    try:
        # an instance name and an ExecStart that exists here, so verify checks the rest
        path = Path(tmp) / "shardwg@wg0.service"
        path.write_text(unit.replace("/usr/local/bin/shardwg", shutil.which("true") or "/bin/true"))
        cp = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
        ours = [line for line in (cp.stdout + cp.stderr).splitlines() if str(path) in line or
                "shardwg@" in line]  # fmt: skip
        if cp.returncode != 0 and not ours and "System has not been booted" in cp.stderr:
            pytest.skip(f"systemd-analyze cannot verify here: {cp.stderr.strip()[:200]}")
        assert not ours, "\n".join(ours)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_dockerfile_and_dockerignore() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    assert 'ENTRYPOINT ["python", "-m", "shardwg.container"]' in lines
    assert 'CMD ["python", "-m", "shardwg.container", "--healthcheck"]' in lines
    assert "STOPSIGNAL SIGTERM" in lines
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert "--no-cache-dir" in text and "wireguard-tools" in text
    ignore = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]  # fmt: skip
    assert ignore[0] == "*", "an allow-list: nothing enters the build context unless named"
    for pattern in (".git", ".venv", "**/__pycache__", "**/*.conf"):
        assert pattern in ignore
    # the build context keeps what the image installs
    for needed in ("pyproject.toml", "shardwg"):
        assert f"!{needed}" in ignore
