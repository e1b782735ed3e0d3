"""A star: one shardwg gateway and N wireguard-go peers on a shared, bridged underlay; and
the smallest shape, one wireguard-go peer on a veth, waiting for a gateway the test starts.

The shape the demo, the benchmark and the soak all need. A Linux bridge in its own "underlay"
namespace plays the switch, so the gateway sees every peer on one interface as it would on a
real LAN, and nothing touches the host's own network. Peers know the gateway's endpoint and
initiate; the gateway learns theirs from the handshake, as a road-warrior gateway does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from lab.gateway_proc import ShardwgGateway
from lab.harness import Harness
from lab.keys import keypair
from lab.netns import LabError, Namespace, add_bridge, bridge_port, unique_ifname, veth_link
from lab.wggo import WireguardGo

GW_PORT, PEER_PORT = 51820, 51821
MAX_PEERS = 250
BRIDGE = "br0"


def _host(net: str, n: int) -> str:
    """The n-th host of a /16 given as "a.b": 10.99 + 2 -> 10.99.0.2."""
    return f"{net}.{n // 256}.{n % 256}"


@dataclass
class StarPeer:
    """One peer's namespace, keys and addresses; `wg` once started."""

    name: str
    ns: Namespace
    private_key: str
    public_key: str
    underlay: str
    tunnel4: str
    tunnel6: str
    wg: WireguardGo | None = None


@dataclass
class Star:
    """Namespaces `<prefix><name>site-a` (gateway), `...underlay` (bridge), `...peer1..N`.

    build() wires the underlay; start() runs the peers and the gateway. Everything belongs to
    `harness`, whose close() removes it.
    """

    harness: Harness
    n_peers: int
    name: str = ""
    underlay_net: str = "10.99"
    tunnel_net: str = "10.0"
    tunnel6_prefix: str = "fd00::"
    mtu: int = 1420
    gw_private_key: str = ""
    gw_public_key: str = ""
    gw_ns: Namespace | None = None
    underlay_ns: Namespace | None = None
    peers: list[StarPeer] = field(default_factory=list)
    gateway: ShardwgGateway | None = None

    @property
    def gw_underlay(self) -> str:
        return _host(self.underlay_net, 1)

    @property
    def gw_tunnel4(self) -> str:
        return _host(self.tunnel_net, 1)

    @property
    def gw_tunnel6(self) -> str:
        return f"{self.tunnel6_prefix}1"

    def build(self) -> Star:
        """Namespaces, bridge and addressed veths; no WireGuard yet."""
        if not 1 <= self.n_peers <= MAX_PEERS:
            raise LabError(f"peers must be 1..{MAX_PEERS}, not {self.n_peers}")
        self.gw_private_key, self.gw_public_key = keypair()
        self.gw_ns = self.harness.namespace(f"{self.name}site-a", exact=True)
        self.underlay_ns = self.harness.namespace(f"{self.name}underlay", exact=True)
        add_bridge(self.underlay_ns, BRIDGE)
        bridge_port(self.underlay_ns, BRIDGE, self.gw_ns, [f"{self.gw_underlay}/16"], "site-a")
        for i in range(self.n_peers):
            name = f"peer{i + 1}"
            ns = self.harness.namespace(f"{self.name}{name}", exact=True)
            priv, pub = keypair()
            host = i + 2
            peer = StarPeer(
                name, ns, priv, pub,
                underlay=_host(self.underlay_net, host),
                tunnel4=_host(self.tunnel_net, host),
                tunnel6=f"{self.tunnel6_prefix}{host:x}",
            )  # fmt: skip
            bridge_port(self.underlay_ns, BRIDGE, ns, [f"{peer.underlay}/16"], name)
            self.peers.append(peer)
        return self

    def start(self, workers: int = 2, gw_args: list[str] | None = None) -> Star:
        """The gateway first (so the peers' first initiation finds it), then each peer."""
        assert self.gw_ns is not None, "build() first"
        self.gateway = self.harness.gateway(
            self.gw_ns,
            unique_ifname("swg"),
            self.gw_private_key,
            GW_PORT,
            [
                {"public_key": p.public_key, "allowed_ips": [f"{p.tunnel4}/32", f"{p.tunnel6}/128"]}
                for p in self.peers
            ],
            [f"{self.gw_tunnel4}/16", f"{self.gw_tunnel6}/64"],
            workers=workers,
            mtu=self.mtu,
            extra_args=gw_args,
        )
        for p in self.peers:
            p.wg = self.harness.wireguard_go(
                p.ns,
                unique_ifname("wgp"),
                p.private_key,
                PEER_PORT,
                [{
                    "public_key": self.gw_public_key,
                    "allowed_ips": [f"{self.tunnel_net}.0.0/16", f"{self.tunnel6_prefix}/64"],
                    "endpoint": f"{self.gw_underlay}:{GW_PORT}",
                }],
                [f"{p.tunnel4}/16", f"{p.tunnel6}/64"],
                mtu=self.mtu,
            )  # fmt: skip
        return self

    def namespaces(self) -> list[Namespace]:
        return [ns for ns in (self.gw_ns, self.underlay_ns) if ns] + [p.ns for p in self.peers]


class PeerSite(NamedTuple):
    """`gw_ns` (veth0 10.99.0.1) and `p_ns` (10.99.0.2) on one veth; in `p_ns` a wireguard-go
    peer (tunnel 10.0.0.10/24) that knows the gateway's key and 10.99.0.1:51820. The gateway
    is the caller's to start in `gw_ns` with `gw_keys[0]`: its peers and options vary."""

    gw_ns: Namespace
    p_ns: Namespace
    gw_keys: tuple[str, str]
    p_keys: tuple[str, str]
    wg: WireguardGo


def wireguard_go_peer_site(h: Harness) -> PeerSite:
    gw_ns, p_ns = h(1, "gw")[0], h(1, "p")[0]
    veth_link(gw_ns, p_ns, ["10.99.0.1/24"], ["10.99.0.2/24"], name_a="veth0")
    gw_keys, p_keys = keypair(), keypair()
    wg = h.wireguard_go(
        p_ns, unique_ifname("wgp"), p_keys[0], PEER_PORT,
        [{"public_key": gw_keys[1], "allowed_ips": ["10.0.0.0/24"],
          "endpoint": f"10.99.0.1:{GW_PORT}", "persistent_keepalive": 0}],
        ["10.0.0.10/24"],
    )  # fmt: skip
    return PeerSite(gw_ns, p_ns, gw_keys, p_keys, wg)
