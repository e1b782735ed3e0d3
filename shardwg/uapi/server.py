"""The UAPI Unix socket `/var/run/wireguard/<iface>.sock`, answered from a backend.

Non-blocking and driven from one thread, the supervisor's loop: call `poll()` on a timer
(idle clients expire there) or whenever `fileno()` is readable (the internal epoll fd, so
one registration covers the listener and every client). A misbehaving client can only
hurt itself: it gets an errno reply where one makes sense and is closed; nothing it sends
raises out of `poll()`, and memory per client is bounded by the parser's limits.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import socket
import stat
import time
from dataclasses import dataclass, field
from errno import EADDRINUSE, EEXIST, EIO
from typing import Protocol

from shardwg.uapi import DeviceView, SetRequest, UapiError
from shardwg.uapi.protocol import Event, RequestParser, format_errno, format_get, format_status

__all__ = ["UapiBackend", "UapiInUse", "UapiServer"]

log = logging.getLogger(__name__)

SOCKET_DIR = "/var/run/wireguard"
_RECV = 65536
_OUT_HIGH = 65536  # stop answering queued requests until the client reads this much
_ACCEPT_BATCH = 64
# The kernel's dev_valid_name(): the same name becomes our TUN interface.
_IFNAME = re.compile(r"(?!\.\.?\Z)[^/:\s\x00]{1,15}\Z")


class UapiBackend(Protocol):
    """What the device owner implements; errors are positive errno values (0 = ok)."""

    def uapi_get(self) -> DeviceView: ...

    def uapi_set(self, req: SetRequest) -> int: ...


class UapiInUse(OSError):
    """Another live process already answers on this interface's socket."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    last_active: float
    parser: RequestParser = field(default_factory=RequestParser)
    out: bytearray = field(default_factory=bytearray)
    closing: bool = False  # hang up once `out` is flushed (framing error or EOF)
    events: int = selectors.EVENT_READ


class UapiServer:
    """Listening socket for one interface; see the module docstring for how to drive it."""

    def __init__(
        self,
        interface: str,
        backend: UapiBackend,
        directory: str = SOCKET_DIR,
        *,
        max_clients: int = 64,
        idle_timeout: float = 30.0,
    ) -> None:
        if not _IFNAME.match(interface) or len(interface.encode()) > 15:
            raise ValueError(f"invalid interface name {interface!r}")
        self.interface = interface
        self.path = os.path.join(directory, interface + ".sock")
        self._directory = directory
        self._backend = backend
        self._max_clients = max_clients
        self._idle_timeout = idle_timeout
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._clients: set[_Client] = set()
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def start(self) -> None:
        """Bind the socket (owner-only); UapiInUse if a live server already answers there."""
        if self._listener is not None:
            raise RuntimeError("UAPI server already started")
        self._make_directory()
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window in which the socket is group/world-usable
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno == EADDRINUSE:  # another instance bound it since our check
                raise UapiInUse(exc.errno, "UAPI socket in use", self.path) from None
            raise
        finally:
            os.umask(old_umask)
        try:
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            sock.listen(_ACCEPT_BATCH)
            sock.setblocking(False)
            self._sel = selectors.DefaultSelector()
            self._sel.register(sock, selectors.EVENT_READ, None)
        except BaseException:
            sock.close()
            self._unlink_if_ours()
            raise
        self._listener = sock

    def _make_directory(self) -> None:
        """Create the socket directory 0755 (whatever the umask) if it is missing; one that
        exists is shared (wireguard-go makes it 0700) and is left in the state it is in."""
        try:
            os.mkdir(self._directory, 0o755)
        except FileExistsError:
            return
        except FileNotFoundError:
            os.makedirs(self._directory, mode=0o755, exist_ok=True)
        os.chmod(self._directory, 0o755)

    def _remove_stale(self) -> None:
        """Leave a live server alone; remove a socket nobody listens on (a crashed owner)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(EEXIST, "exists and is not a socket", self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            log.info("removing stale UAPI socket %s", self.path)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # e.g. a full backlog: someone is there
            raise UapiInUse(exc.errno, "UAPI socket busy", self.path) from None
        finally:
            probe.close()
        raise UapiInUse(EADDRINUSE, "another instance answers on this UAPI socket", self.path)

    def fileno(self) -> int:
        """An fd that is readable whenever `poll()` has work to do (epoll fd on Linux)."""
        if self._sel is None or self._listener is None:
            raise RuntimeError("UAPI server not started")
        fd = getattr(self._sel, "fileno", None)
        return int(fd()) if fd is not None else self._listener.fileno()

    def poll(self, timeout: float | None = 0.0) -> None:
        """Accept, read, answer and write what is ready, waiting up to `timeout` seconds."""
        if self._sel is None:
            raise RuntimeError("UAPI server not started")
        for key, mask in self._sel.select(timeout):
            if key.data is None:
                self._accept()
            elif key.data in self._clients:  # not evicted earlier in this round
                self._service(key.data, mask)
        now = time.monotonic()
        for client in [c for c in self._clients if now - c.last_active > self._idle_timeout]:
            self._drop(client)

    def close(self) -> None:
        """Hang up on everyone and remove the socket file if it is still the one we made."""
        for client in list(self._clients):
            self._drop(client)
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_if_ours()

    def __enter__(self) -> UapiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unlink_if_ours(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:  # a successor may own it now
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next poll
                log.warning("UAPI accept failed: %s", exc)
                return
            conn.setblocking(False)
            if len(self._clients) >= self._max_clients:  # make room: the stalest goes
                self._drop(min(self._clients, key=lambda c: c.last_active))
            client = _Client(conn, time.monotonic())
            self._clients.add(client)
            self._sel.register(conn, selectors.EVENT_READ, client)

    def _service(self, client: _Client, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not self._read(client):
                return
            self._pump(client)
        except Exception:  # a bug of ours must not take the owner's loop down
            log.exception("UAPI client failed; closing it")
            self._drop(client)

    def _read(self, client: _Client) -> bool:
        try:
            data = client.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self._drop(client)
            return False
        client.last_active = time.monotonic()
        if data:
            client.parser.feed(data)
        else:  # EOF: answer what is complete (half-close is fine), drop any partial request
            client.closing = True
        return True

    def _pump(self, client: _Client) -> None:
        """Answer queued requests while the reply backlog is small, then flush it."""
        while True:
            while len(client.out) < _OUT_HIGH and not client.parser.closed:
                event = client.parser.next_event()
                if event is None:
                    break
                client.out += self._answer(event)
            if client.parser.closed:
                client.closing = True
            if not client.out:
                break
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the client went away without reading
                self._drop(client)
                return
            del client.out[:sent]
            if sent:
                client.last_active = time.monotonic()
            if client.out:
                break
        if not client.out and client.closing:
            self._drop(client)
            return
        wanted = selectors.EVENT_WRITE if client.out else selectors.EVENT_READ
        if wanted != client.events and self._sel is not None:
            self._sel.modify(client.sock, wanted, client)
            client.events = wanted

    def _answer(self, event: Event) -> bytes:
        match event:
            case ("get", None):
                try:
                    return format_get(self._backend.uapi_get())
                except Exception:
                    log.exception("UAPI get failed")
                    return format_status(EIO, get=True)
            case ("set", SetRequest() as req):
                try:
                    rc = self._backend.uapi_set(req)
                except UapiError as exc:
                    rc = exc.errno
                except Exception:
                    log.exception("UAPI set failed")
                    rc = EIO
                return format_errno(0) if rc == 0 else format_status(rc)
            case ("error", int() as errno):
                log.info("UAPI request rejected: errno %d", errno)
                return format_status(errno)
        raise AssertionError(f"unexpected event {event!r}")

    def _drop(self, client: _Client) -> None:
        self._clients.discard(client)
        if self._sel is not None:
            try:
                self._sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()
