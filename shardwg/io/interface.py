"""Bringing a gateway's interface up and down: TUN queues, addresses, routes, UDP sockets.

The gateway opens every TUN queue and every UDP socket before any worker runs,
in a fixed order, and keeps them open for its whole life: the reuseport group's
join order (which the steering program indexes) then never changes, even when a
worker is replaced.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

from shardwg.config.model import Config
from shardwg.io import netlink
from shardwg.io.tun import TunDevice
from shardwg.io.udp import open_udp_group
from shardwg.io.vnet import TUN_F_TCP, TUN_F_UDP

log = logging.getLogger("shardwg.io.interface")


class GatewayError(Exception):
    """A setup problem the user must fix (shown without a traceback)."""


def tun_offload_flags(tun: TunDevice) -> int:
    """TSO4/6 + CSUM, and USO4/6 where the kernel has it (Linux >= 6.2)."""
    try:
        tun.set_offload(TUN_F_TCP | TUN_F_UDP)
        return TUN_F_TCP | TUN_F_UDP
    except OSError:
        return TUN_F_TCP


def routing_table(cfg: Config) -> int | None | str:
    """None: main table; "off": no routes; an int: that table."""
    table = cfg.interface.table
    if table is None or table == "auto":
        return None
    if table == "off":
        return "off"
    return int(table)


@dataclass
class Gateway:
    config: Config
    ifname: str
    workers: int = 1
    tun: TunDevice | None = None
    udp4: list[socket.socket] = field(default_factory=list)
    udp6: list[socket.socket] = field(default_factory=list)
    port: int = 0
    tun_offload: bool = False
    created: bool = False  # we made the link: close() may delete it (never someone else's)

    def open(self) -> None:
        if netlink.link_exists(self.ifname):
            raise GatewayError(f"interface {self.ifname} already exists (another instance?)")
        cfg = self.config.interface
        try:
            # IFF_VNET_HDR. By default every offload is off: reads are plain packets whose
            # checksums the kernel finished (cheaper than finishing them in Python: measured
            # in docs/performance.md), while writes may be coalesced TCP super-packets.
            # --tun-offload turns on TSO/USO + CSUM: reads are then up to 64 KiB super-packets
            # that the worker splits and checksums before sealing.
            self.tun = TunDevice.create(
                self.ifname, queues=self.workers, multi_queue=True, vnet_hdr=True, exclusive=True
            )
            self.created = True
            self.tun.set_offload(tun_offload_flags(self.tun) if self.tun_offload else 0)
        except OSError as exc:
            raise GatewayError(f"cannot create TUN {self.ifname}: {exc}") from exc
        try:
            netlink.add_addresses(self.ifname, list(cfg.addresses))
            if self.tun_offload:
                netlink.set_gso_max_segs(self.ifname, 64)
            netlink.set_link_up(self.ifname, cfg.mtu)
            table = routing_table(self.config)
            if table != "off":
                prefixes = [p for peer in self.config.peers for p in peer.allowed_ips]
                netlink.add_routes(self.ifname, prefixes, table if isinstance(table, int) else None)
            self.udp4, self.udp6, self.port = open_udp_group(
                cfg.listen_port or 0, self.workers, fwmark=cfg.fwmark
            )
        except OSError as exc:
            self.close()
            raise GatewayError(f"cannot set up {self.ifname}: {exc}") from exc
        log.info(
            "interface %s up: %d queue(s), UDP port %d, %d peer(s)",
            self.ifname,
            self.workers,
            self.port,
            len(self.config.peers),
        )

    def rebind_udp(self, port: int) -> None:
        """Close the UDP group and open a new one on `port` (0: any free port)."""
        for s in self.udp4 + self.udp6:
            s.close()
        self.udp4, self.udp6, self.port = open_udp_group(
            port, self.workers, fwmark=self.config.interface.fwmark
        )

    def close(self) -> None:
        for s in self.udp4 + self.udp6:
            s.close()
        self.udp4, self.udp6 = [], []
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        if self.created and netlink.link_exists(self.ifname):
            self.created = False
            try:
                netlink.delete_link(self.ifname)
            except OSError:
                log.warning("could not remove interface %s", self.ifname)
