"""Endpoint resolution: config `host:port` -> the socket address tuple our UDP sockets use.

IPv4 endpoints are `(ip, port)` (sent on the IPv4 socket), IPv6 ones
`(ip, port, flowinfo, scope_id)` (IPv6 socket), matching what `recvfrom` returns
so roaming compares like with like.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from shardwg.config.model import Endpoint


class EndpointError(Exception):
    pass


def resolve(endpoint: Endpoint, prefer_ipv6: bool = False) -> Any:
    """Resolve a config endpoint (literal or host name) to a socket address."""
    try:
        ip = ipaddress.ip_address(endpoint.host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 4:
            return (str(ip), endpoint.port)
        return (str(ip), endpoint.port, 0, 0)
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        where = f"{endpoint.host}:{endpoint.port}"
        raise EndpointError(f"cannot resolve endpoint {where}: {exc}") from exc
    infos.sort(key=lambda i: (i[0] == socket.AF_INET6) != prefer_ipv6)
    family, _, _, _, sockaddr = infos[0]
    if family == socket.AF_INET6:
        return (sockaddr[0], sockaddr[1], 0, 0)
    return (sockaddr[0], sockaddr[1])


def format_endpoint(addr: Any) -> str:
    """`1.2.3.4:51820` or `[fd00::1]:51820`, as wg prints them."""
    if addr is None:
        return ""
    if len(addr) == 4:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"
