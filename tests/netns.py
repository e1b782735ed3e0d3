"""The namespace harness the tests import as `netns`; it lives in shardwg.lab so the demo, the
benchmark and the soak share one copy. Re-exports only."""

from shardwg.lab.harness import Harness
from shardwg.lab.keys import genkey, genpsk, keypair, pubkey
from shardwg.lab.netns import (
    CLONE_NEWNET,
    REPO_ROOT,
    RUN_HEX,
    RUN_PREFIX,
    CommandError,
    LabError,
    Namespace,
    RemoteError,
    add_address,
    add_bridge,
    bridge_port,
    make_namespaces,
    root_netns_problem,
    run,
    unique_ifname,
    veth_link,
    wait_for,
)
from shardwg.lab.ping import icmp_echo, icmp_rtts, ping, ping_rtts
from shardwg.lab.wggo import UAPI_DIR, WireguardGo, wireguard_go_problem

__all__ = [
    "CLONE_NEWNET",
    "REPO_ROOT",
    "RUN_HEX",
    "RUN_PREFIX",
    "UAPI_DIR",
    "CommandError",
    "Harness",
    "LabError",
    "Namespace",
    "RemoteError",
    "WireguardGo",
    "add_address",
    "add_bridge",
    "bridge_port",
    "genkey",
    "genpsk",
    "icmp_echo",
    "icmp_rtts",
    "keypair",
    "make_namespaces",
    "ping",
    "ping_rtts",
    "pubkey",
    "root_netns_problem",
    "run",
    "unique_ifname",
    "veth_link",
    "wait_for",
    "wireguard_go_problem",
]
