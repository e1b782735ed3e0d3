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


def enable_tun_offloads(tun: TunDevice) -> int:
    """Ask for TSO4/6 + CSUM and USO4/6 (Linux >= 6.2), then TSO + CSUM alone, then nothing;
    returns the TUN_F_* flags the kernel took and logs the outcome once (never raises)."""
    refused: OSError | None = None
    for flags, what in ((TUN_F_TCP | TUN_F_UDP, "TSO4/TSO6/USO4/USO6 + checksum"),
                        (TUN_F_TCP, "TSO4/TSO6 + checksum (no USO in this kernel)")):  # fmt: skip
        try:
            tun.set_offload(flags)
        except OSError as exc:
            refused = exc
            continue
        log.info("TUN %s: offloads on: %s", tun.name, what)
        return flags
    try:
        tun.set_offload(0)
    except OSError:
        pass
    log.warning("TUN %s: the kernel refused TUN offloads (%s); reading one packet per read",
                tun.name, refused)  # fmt: skip
    return 0


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
    tun_offload: bool = False  # try TSO/USO + checksum offload (see enable_tun_offloads)
    offload_flags: int = 0  # what the kernel took
    created: bool = False  # we made the link: close() may delete it (never someone else's)

    def open(self) -> None:
        if netlink.link_exists(self.ifname):
            raise GatewayError(f"interface {self.ifname} already exists (another instance?)")
        cfg = self.config.interface
        try:
            # IFF_VNET_HDR. With tun_offload (the default with the native kernel, see
            # engine/supervisor.py) reads are up to 64 KiB TSO/USO super-packets that the
            # seal kernel cuts and checksums. Without it every offload is off: reads are plain
            # packets whose checksums the kernel finished (cheaper than finishing them in
            # Python: docs/performance.md). Writes may be coalesced TCP super-packets either way.
            self.tun = TunDevice.create(
                self.ifname, queues=self.workers, multi_queue=True, vnet_hdr=True, exclusive=True
            )
            self.created = True
            if self.tun_offload:
                self.offload_flags = enable_tun_offloads(self.tun)
            else:
                self.tun.set_offload(0)
        except OSError as exc:
            raise GatewayError(f"cannot create TUN {self.ifname}: {exc}") from exc
        try:
            netlink.add_addresses(self.ifname, list(cfg.addresses))
            if self.offload_flags:
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
