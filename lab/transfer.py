"""TCP transfers between namespaces, checked end to end with sha256.

Both ends are small Python programs run with this interpreter: the sender hashes seeded random
bytes as it sends them, the receiver hashes what arrives, and the two digests must match.
"""

from __future__ import annotations

import select
import subprocess
import sys
from typing import NamedTuple

from lab.netns import LabError, Namespace

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


class TransferResult(NamedTuple):
    """What one transfer did; a tuple so `sent, received, n, secs = tr.run()` keeps working."""

    sent_sha256: str
    received_sha256: str
    received_bytes: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.sent_sha256 == self.received_sha256

    @property
    def mbit_s(self) -> float:
        return self.received_bytes * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


class Transfer:
    """A receiver in `server_ns`; `run()` sends `size` seeded random bytes from `client_ns`.

    For concurrent transfers, start_client() each one, then finish() each one."""

    def __init__(self, server_ns: Namespace, client_ns: Namespace, addr: str, port: int,
                 size: int, seed: int = 7, timeout: float = 120) -> None:  # fmt: skip
        self.client_ns, self.addr, self.port = client_ns, addr, port
        self.size, self.seed, self.timeout = size, seed, timeout
        self.server = server_ns.popen(
            [sys.executable, "-c", _SERVER, addr, str(port), str(timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        line = ""
        if select.select([self.server.stdout], [], [], 15)[0]:
            line = self.server.stdout.readline()
        if "listening" not in line:
            raise LabError(f"receiver on {addr}:{port} did not start: {line!r}{self._err()}")

    def _err(self) -> str:
        """The receiver's stderr once it has exited, for error messages."""
        if self.server.poll() is None or self.server.stderr is None:
            return ""
        return "\n" + self.server.stderr.read()

    def start_client(self) -> subprocess.Popen[str]:
        return self.client_ns.popen(
            [sys.executable, "-c", _CLIENT, self.addr, str(self.port), str(self.size),
             str(self.seed), str(self.timeout)],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self, client: subprocess.Popen[str]) -> TransferResult:
        """Wait for both ends: (sent sha256, received sha256, received bytes, seconds)."""
        out, err = client.communicate(timeout=self.timeout + 15)
        rout, rerr = self.server.communicate(timeout=15)
        try:
            sent_hash, seconds = out.split()
            n, recv_hash = rout.split()
        except ValueError:
            raise LabError(
                f"transfer to {self.addr}:{self.port} failed:\n"
                f"sender rc={client.returncode}: {out.strip()} {err.strip()}\n"
                f"receiver rc={self.server.returncode}: {rout.strip()} {rerr.strip()}"
            ) from None
        return TransferResult(sent_hash, recv_hash, int(n), float(seconds))

    def run(self) -> TransferResult:
        return self.finish(self.start_client())
