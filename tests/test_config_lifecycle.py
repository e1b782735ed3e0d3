"""Config life cycle against a real gateway: SaveConfig, FwMark, Table = off, JSON logs."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest
from test_sharding import build_site

from lab.gateway_proc import ShardwgGateway
from lab.harness import Harness
from lab.netns import wait_for
from lab.ping import ping
from shardwg.config.model import load_config

pytestmark = [pytest.mark.interop, pytest.mark.netns]


def test_save_config_writes_running_config_back(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 2, 2, gw_knows=[0], extra_interface="SaveConfig = true")
    try:
        assert ping(site.peers[0][0], "10.0.0.1", count=1, timeout=10)
        site.gw_ns.run(["wg", "set", site.gw.ifname, "peer", site.peer_conf[1]["public_key"],
                        "allowed-ips", "10.0.0.11/32"])  # fmt: skip
    finally:
        assert site.gw.stop() == 0
    cfg = load_config(str(site.gw.config_path))
    keys = {base64.b64encode(p.public_key).decode() for p in cfg.peers}
    assert keys == {site.peer_conf[0]["public_key"], site.peer_conf[1]["public_key"]}
    assert cfg.interface.save_config
    assert stat.S_IMODE(os.stat(site.gw.config_path).st_mode) == 0o600


def test_fwmark_marks_our_udp(netns_factory: Harness) -> None:
    """Packets carrying mark 0x42 are blackholed by a policy rule: with FwMark = 0x42 the
    tunnel cannot form; `wg set fwmark 0` clears the mark live and it comes up."""
    site = build_site(netns_factory, 1, 1, gw_initiates=True, extra_interface="FwMark = 0x42")
    try:
        site.gw_ns.ip("rule", "add", "fwmark", "0x42", "table", "142")
        site.gw_ns.ip("route", "add", "blackhole", "default", "table", "142")
        assert not ping(site.gw_ns, "10.0.0.10", count=1, timeout=4)
        assert site.gw_ns.run(["wg", "show", site.gw.ifname, "fwmark"]).stdout.strip() == "0x42"
        site.gw_ns.run(["wg", "set", site.gw.ifname, "fwmark", "0"])
        assert ping(site.gw_ns, "10.0.0.10", count=2, timeout=15), site.gw.log_text()
    finally:
        assert site.gw.stop() == 0


def test_table_off_adds_no_routes(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 1, extra_interface="Table = off")
    try:
        routes = site.gw_ns.ip("route", "show", "dev", site.gw.ifname).stdout
        assert "10.0.0.10" not in routes
        # the connected /24 of the interface address still works
        assert "10.0.0.0/24" in routes
        assert "Table = off" in site.gw.log_text()
    finally:
        assert site.gw.stop() == 0


def test_json_logs_and_no_secrets(netns_factory: Harness) -> None:
    site = build_site(netns_factory, 1, 2)
    site.gw.stop()
    gw = ShardwgGateway(
        site.gw_ns, site.gw.ifname, site.gw_keys[0], 51820, site.peer_conf, ["10.0.0.1/24"],
        workers=2, extra_args=["--log-format", "json", "--verbose"],
    )  # fmt: skip
    try:
        assert ping(site.peers[0][0], "10.0.0.1", count=2, timeout=10)
        site.gw_ns.run(["wg", "showconf", gw.ifname])  # the UAPI returns the key; logs never
    finally:
        assert gw.stop() == 0
    text = gw.log_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records and all({"ts", "level", "msg", "pid"} <= r.keys() for r in records)
    assert any("handshake complete" in r["msg"] for r in records)
    priv = site.gw_keys[0]
    assert priv not in text and base64.b64decode(priv).hex() not in text
    assert wait_for(lambda: not os.path.exists(f"/dev/shm/shardwg-{gw.ifname}"), 2)
