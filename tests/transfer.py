"""TCP transfers with end-to-end sha256 between two test namespaces."""

from __future__ import annotations

import subprocess
import sys

from netns import Namespace

_SERVER = r"""
import hashlib, socket, sys
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(timeout)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(timeout)
h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""

_CLIENT = r"""
import hashlib, random, socket, sys, time
addr, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seed, timeout = int(sys.argv[4]), float(sys.argv[5])
data = random.Random(seed).randbytes(size)
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((addr, port), timeout=timeout)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
t0 = time.monotonic()
s.sendall(data); s.shutdown(socket.SHUT_WR)
s.recv(1); s.close()
print(hashlib.sha256(data).hexdigest(), time.monotonic() - t0, flush=True)
"""


class Transfer:
    """A receiver in `server_ns`; `run()` sends `size` seeded random bytes from `client_ns`."""

    def __init__(self, server_ns: Namespace, client_ns: Namespace, addr: str, port: int,
                 size: int, seed: int = 7, timeout: float = 120) -> None:  # fmt: skip
        self.client_ns, self.addr, self.port = client_ns, addr, port
        self.size, self.seed, self.timeout = size, seed, timeout
        self.server = server_ns.popen(
            [sys.executable, "-c", _SERVER, addr, str(port), str(timeout)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"receiver did not start: {line!r}")

    def start_client(self) -> subprocess.Popen[str]:
        return self.client_ns.popen(
            [sys.executable, "-c", _CLIENT, self.addr, str(self.port), str(self.size),
             str(self.seed), str(self.timeout)],  # fmt: skip
            stdout=subprocess.PIPE,
            text=True,
        )

    def finish(self, client: subprocess.Popen[str]) -> tuple[str, str, int, float]:
        """(sent sha256, received sha256, received bytes, seconds)."""
        out, _ = client.communicate(timeout=self.timeout + 15)
        sent_hash, seconds = out.split()
        rout, _ = self.server.communicate(timeout=15)
        n, recv_hash = rout.split()
        return sent_hash, recv_hash, int(n), float(seconds)

    def run(self) -> tuple[str, str, int, float]:
        return self.finish(self.start_client())
