"""Lab tooling shared by the tests, the demo, the benchmark and the soak: network namespaces,
veth/bridge underlays, real wireguard-go peers, a `shardwg run` process, pings and checked TCP
transfers. Needs root; nothing here imports pytest, so scripts can use it as is.

Modules, one concept each:
    netns         namespaces, links, processes inside them, prerequisites
    keys          WireGuard keys (independent of shardwg.config.keys: the lab is the oracle)
    wgconf        wg-quick config text and redaction
    wggo          a wireguard-go peer
    gateway_proc  a `shardwg run` process
    ping          ICMP echo with round-trip times
    transfer      TCP transfers checked with sha256
    iperf         one iperf3 TCP run
    harness       one owner that closes all of the above
    topology      a gateway and N peers on a bridged underlay; one peer on a veth
    demo          `python -m lab.demo`
"""

from lab.gateway_proc import ShardwgGateway
from lab.harness import Harness
from lab.iperf import IperfResult, iperf3_problem, iperf3_tcp
from lab.keys import genkey, genpsk, keypair, pubkey
from lab.netns import (
    CommandError,
    LabError,
    Namespace,
    RemoteError,
    root_netns_problem,
    unique_ifname,
    veth_link,
    wait_for,
)
from lab.ping import ping, ping_rtts
from lab.topology import Star, StarPeer
from lab.transfer import Transfer, TransferResult
from lab.wggo import WireguardGo, wireguard_go_problem

__all__ = [
    "CommandError",
    "Harness",
    "IperfResult",
    "LabError",
    "Namespace",
    "RemoteError",
    "ShardwgGateway",
    "Star",
    "StarPeer",
    "Transfer",
    "TransferResult",
    "WireguardGo",
    "genkey",
    "genpsk",
    "iperf3_problem",
    "iperf3_tcp",
    "keypair",
    "ping",
    "ping_rtts",
    "pubkey",
    "root_netns_problem",
    "unique_ifname",
    "veth_link",
    "wait_for",
    "wireguard_go_problem",
]
