"""What the container must provide: CAP_NET_ADMIN and an openable /dev/net/tun
(`--cap-add NET_ADMIN --device /dev/net/tun`), checked before anything is exec'd.
"""

from __future__ import annotations

import errno
import os
import stat

TUN_PATH = "/dev/net/tun"
CAP_NET_ADMIN = 12


def effective_capabilities(status_path: str = "/proc/self/status") -> int | None:
    """The CapEff bit mask of this process, None when it cannot be read."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_privileges(tun_path: str = TUN_PATH) -> list[str]:
    """Problems that would stop the gateway creating its interface; empty when none."""
    problems = []
    caps = effective_capabilities()
    if caps is not None and not caps >> CAP_NET_ADMIN & 1:
        problems.append(
            "missing capability CAP_NET_ADMIN (needed to create the TUN interface, add its "
            "addresses and routes and mark sockets): docker run --cap-add NET_ADMIN, compose "
            "cap_add: [NET_ADMIN], Kubernetes securityContext.capabilities.add: [NET_ADMIN], "
            "systemd AmbientCapabilities=CAP_NET_ADMIN"
        )
    try:
        st = os.stat(tun_path)
        if not stat.S_ISCHR(st.st_mode):
            raise OSError(errno.ENODEV, "not a character device")
        fd = os.open(tun_path, os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            how = "docker run --device /dev/net/tun, compose devices: [/dev/net/tun]"
        else:
            how = "the container's device rules must allow it (c 10:200 rwm)"
        problems.append(f"cannot open {tun_path}: {exc.strerror or exc}: {how}")
    return problems
