"""UapiServer under the real `wg`, over an in-memory backend with wireguard-go's semantics:
wg's requests must arrive as the right SetRequest and wg must print what the backend holds."""

from __future__ import annotations

import os
import random
import secrets
import selectors
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from errno import EADDRINUSE
from pathlib import Path
from socket import AF_UNIX

import pytest
from msgspec import UNSET

from shardwg.config.keys import decode_key, encode_key, generate_private_key
from shardwg.proto import crypto
from shardwg.uapi import DeviceView, PeerChange, PeerView, SetRequest
from shardwg.uapi.protocol import format_get
from shardwg.uapi.server import SOCKET_DIR, UapiInUse, UapiServer

PRIV, A, B, C, PSK = (decode_key(generate_private_key()) for _ in range(5))
b64 = encode_key
NOW = int(time.time()) - 30


class FakeBackend:
    """A DeviceView that set requests modify the way wireguard-go modifies its device."""

    def __init__(self, view: DeviceView) -> None:
        self.view, self.requests, self.fail, self.fail_get = view, list[SetRequest](), 0, False

    def uapi_get(self) -> DeviceView:
        if self.fail_get:
            raise RuntimeError("backend broke")
        return self.view

    def uapi_set(self, req: SetRequest) -> int:
        self.requests.append(req)
        if self.fail:
            return self.fail
        v = self.view
        for name in ("private_key", "listen_port", "fwmark"):
            if getattr(req, name) is not UNSET:
                setattr(v, name, getattr(req, name))
        if req.replace_peers:
            v.peers = []
        own = crypto.public_key(v.private_key) if v.private_key else None
        for ch in req.peers:
            peer = next((p for p in v.peers if p.public_key == ch.public_key), None)
            if ch.public_key == own or (peer is None and (ch.remove or ch.update_only)):
                continue
            if ch.remove:
                v.peers.remove(peer)  # type: ignore[arg-type]
                continue
            if peer is None:
                peer = PeerView(ch.public_key)
                v.peers.append(peer)
            for name in ("preshared_key", "endpoint", "persistent_keepalive"):
                if getattr(ch, name) is not UNSET:
                    setattr(peer, name, getattr(ch, name))
            if ch.replace_allowed_ips:
                peer.allowed_ips = []
            for ip in ch.allowed_ips_add:  # a prefix moves to its newest owner
                for other in v.peers:
                    other.allowed_ips = [x for x in other.allowed_ips if x != ip]
                peer.allowed_ips.append(ip)
        return 0


def initial_view() -> DeviceView:
    a = PeerView(A, PSK, "192.0.2.1:51820", NOW, 5, 1000, 2000, 25, ["10.0.0.2/32", "fd00::2/128"])
    return DeviceView(PRIV, 51820, 0, [a, PeerView(B)])


@contextmanager
def serving(directory: str, **kwargs: float) -> Iterator[tuple[str, FakeBackend, UapiServer]]:
    """A started server polled by a thread; stopped and its socket gone afterwards."""
    name = "swgu" + secrets.token_hex(3)  # socket names are global: never a real one
    backend = FakeBackend(initial_view())
    with UapiServer(name, backend, directory, **kwargs) as server:  # type: ignore[arg-type]
        stop = threading.Event()
        thread = threading.Thread(
            target=lambda: [server.poll(0.02) for _ in iter(stop.is_set, True)]
        )
        thread.start()
        try:
            yield name, backend, server
        finally:
            stop.set()
            thread.join(5)
    assert not thread.is_alive() and not os.path.exists(server.path)


@pytest.fixture
def served() -> Iterator[tuple[str, FakeBackend, UapiServer]]:
    if os.geteuid() != 0 or shutil.which("wg") is None:
        pytest.skip("needs root (for /var/run/wireguard) and the wg tool")
    with serving(SOCKET_DIR) as running:
        yield running


def wg(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["wg", *args], capture_output=True, text=True, timeout=10)
    assert (result.returncode == 0) == ok, result.stderr
    return result


def test_wg_show_dump_and_showconf_print_the_backend(served: tuple) -> None:
    name, backend, _ = served
    lines = wg("show", name, "dump").stdout.splitlines()
    pub = b64(crypto.public_key(PRIV))
    assert lines[0] == f"{b64(PRIV)}\t{pub}\t51820\toff"
    peer_a = f"{b64(A)}\t{b64(PSK)}\t192.0.2.1:51820\t10.0.0.2/32,fd00::2/128\t{NOW}\t1000"
    peer_b = f"{b64(B)}\t(none)\t(none)\t(none)\t0\t0\t0\toff"
    assert sorted(lines[1:]) == sorted([peer_a + "\t2000\t25", peer_b])
    conf = wg("showconf", name).stdout
    assert f"ListenPort = 51820\nPrivateKey = {b64(PRIV)}\n" in conf
    peer_a = f"[Peer]\nPublicKey = {b64(A)}\nPresharedKey = {b64(PSK)}\nAllowedIPs = 10.0.0.2/32, "
    assert peer_a + "fd00::2/128\nEndpoint = 192.0.2.1:51820\nPersistentKeepalive = 25\n" in conf
    assert f"[Peer]\nPublicKey = {b64(B)}\n" in conf
    pretty = wg("show", name).stdout
    for text in (f"public key: {pub}", "listening port: 51820", "preshared key: (hidden)"):
        assert text in pretty
    assert "transfer: 1000 B received, 1.95 KiB sent" in pretty
    assert name in wg("show", "interfaces").stdout.split()
    backend.view.fwmark = 0x1234
    assert wg("show", name, "dump").stdout.splitlines()[0].endswith("\t0x1234")


def test_wg_set_peer_and_remove(served: tuple) -> None:
    name, backend, _ = served
    args = ("allowed-ips", "10.0.0.3/32", "endpoint", "127.0.0.1:51820", "persistent-keepalive")
    wg("set", name, "peer", b64(C), *args, "25")
    change = PeerChange(C, endpoint="127.0.0.1:51820", persistent_keepalive=25,
                        replace_allowed_ips=True, allowed_ips_add=["10.0.0.3/32"])  # fmt: skip
    assert backend.requests[-1] == SetRequest(peers=[change])
    line = f"{b64(C)}\t(none)\t127.0.0.1:51820\t10.0.0.3/32\t0\t0\t0\t25"
    assert line in wg("show", name, "dump").stdout.splitlines()
    wg("set", name, "peer", b64(C), "remove")
    assert backend.requests[-1] == SetRequest(peers=[PeerChange(C, remove=True)])
    assert b64(C) not in wg("show", name, "dump").stdout
    wg("set", name, "peer", b64(A), "preshared-key", "/dev/null")  # zeros: no psk any more
    assert backend.requests[-1].peers == [PeerChange(A, preshared_key=None)]
    assert "PresharedKey" not in wg("showconf", name).stdout


def test_wg_set_private_key_and_listen_port(served: tuple, tmp_path: Path) -> None:
    name, backend, _ = served
    new = decode_key(generate_private_key())
    (key_file := tmp_path / "key").write_text(b64(new) + "\n")
    wg("set", name, "private-key", str(key_file), "listen-port", "40000")
    assert backend.requests[-1] == SetRequest(private_key=new, listen_port=40000)
    first = wg("show", name, "dump").stdout.splitlines()[0]
    assert first == f"{b64(new)}\t{b64(crypto.public_key(new))}\t40000\toff"


def test_wg_syncconf(served: tuple, tmp_path: Path) -> None:
    name, backend, _ = served
    conf = tmp_path / "wg.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {b64(PRIV)}\nListenPort = 51821\n\n"
        f"[Peer]\nPublicKey = {b64(A)}\nAllowedIPs = 10.0.1.0/24\n\n"
        f"[Peer]\nPublicKey = {b64(C)}\nEndpoint = [::1]:5555\nAllowedIPs = 10.0.0.2/32\n"
    )
    wg("syncconf", name, str(conf))
    req = backend.requests[-1]
    assert (req.private_key, req.listen_port, req.fwmark) == (PRIV, 51821, 0)
    assert not req.replace_peers  # the device had peers: wg diffs instead
    # wg prepends removals; each file peer replaces its allowed IPs
    assert [p.public_key for p in req.peers] == [B, A, C] and req.peers[0].remove
    a, c = req.peers[1:]
    assert (a.replace_allowed_ips, a.allowed_ips_add) == (True, ["10.0.1.0/24"])
    # newer wg also clears the psk and keepalive the file leaves out; 1.0.20210914 does not
    assert a.preshared_key in (UNSET, None) and a.persistent_keepalive in (UNSET, 0)
    assert c == PeerChange(C, endpoint="[::1]:5555", replace_allowed_ips=True,
                           allowed_ips_add=["10.0.0.2/32"])  # fmt: skip
    got = {p.public_key: p.allowed_ips for p in backend.view.peers}
    assert got == {A: ["10.0.1.0/24"], C: ["10.0.0.2/32"]}
    conf.write_text(f"[Interface]\nPrivateKey = {b64(PRIV)}\n")
    wg("syncconf", name, str(conf))  # no peers in the file: wg just replaces them all
    # and, like setconf, it resets what the file omits: listen_port=0 means "pick one"
    expected = SetRequest(private_key=PRIV, listen_port=0, fwmark=0, replace_peers=True)
    assert backend.requests[-1] == expected
    assert backend.view.peers == []


def test_wg_reports_backend_errors(served: tuple) -> None:
    name, backend, _ = served
    backend.fail = EADDRINUSE
    assert "Address already in use" in wg("set", name, "listen-port", "1", ok=False).stderr
    backend.fail_get = True
    assert "Input/output error" in wg("show", name, ok=False).stderr


def test_socket_is_owner_only_and_single_instance(served: tuple) -> None:
    name, backend, server = served
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    with pytest.raises(UapiInUse):
        UapiServer(name, FakeBackend(DeviceView())).start()
    assert os.path.exists(server.path) and wg("show", name, "dump").stdout


def test_socket_directory_ours_0755_a_found_one_left_as_it_is(tmp_path: Path) -> None:
    """The socket directory is shared (wireguard-go creates it 0700 under its umask): shardwg
    only answers for one it creates itself, which is 0755 whatever the umask; a directory it
    finds is served from and left in the state it was found in."""
    made = tmp_path / "made" / "wireguard"
    old_umask = os.umask(0o077)
    try:
        with UapiServer("swgd1", FakeBackend(DeviceView()), str(made)) as server:
            assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o755
    found = tmp_path / "found"
    found.mkdir(mode=0o700)
    os.chmod(found, 0o700)
    with UapiServer("swgd2", FakeBackend(DeviceView()), str(found)) as server:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(found).st_mode) == 0o700


def test_stale_socket_replaced_foreign_file_kept(tmp_path: Path) -> None:
    dead = socket.socket(AF_UNIX)
    dead.bind(str(tmp_path / "swgu1.sock"))
    dead.close()  # the file stays, nobody listens: a crashed owner
    with UapiServer("swgu1", FakeBackend(DeviceView()), str(tmp_path)) as server:
        assert stat.S_ISSOCK(os.stat(server.path).st_mode)
    (tmp_path / "swgu2.sock").write_text("not a socket")
    with pytest.raises(FileExistsError):
        UapiServer("swgu2", FakeBackend(DeviceView()), str(tmp_path)).start()
    with pytest.raises(ValueError):
        UapiServer("a/b", FakeBackend(DeviceView()), str(tmp_path))
    (first := UapiServer("swgu3", FakeBackend(DeviceView()), str(tmp_path))).start()
    os.unlink(first.path)
    with UapiServer("swgu3", FakeBackend(DeviceView()), str(tmp_path)) as second:
        first.close()
        assert os.path.exists(second.path)  # close() spares a successor's socket


def test_owner_loop_can_wait_on_fileno(tmp_path: Path) -> None:
    backend = FakeBackend(initial_view())
    with UapiServer("swgu4", backend, str(tmp_path)) as server, socket.socket(AF_UNIX) as client:
        outer = selectors.DefaultSelector()  # the supervisor's loop
        outer.register(server.fileno(), selectors.EVENT_READ)
        client.connect(server.path)
        assert outer.select(2)  # a pending connection shows through the one fd
        server.poll(0)
        client.sendall(b"get=1\n\n")
        assert outer.select(2)
        server.poll(0)
        assert client.recv(65536) == format_get(backend.view)
        assert outer.select(0) == []  # answered: nothing left to do


def _exchange(path: str, data: bytes, read: bool = True) -> bytes:
    with socket.socket(AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        try:
            sock.sendall(data)
            if not read:
                return b""
            sock.shutdown(socket.SHUT_WR)  # our EOF: the server answers, then hangs up
            return b"".join(iter(lambda: sock.recv(65536), b""))
        except OSError:  # hung up on for garbage while we were still sending
            return b""


def test_several_requests_on_one_connection(tmp_path: Path) -> None:
    with serving(str(tmp_path)) as (_, backend, server):
        get, path = format_get(backend.view), server.path
        reply = _exchange(path, b"get=1\n\nset=1\nfwmark=7\n\nset=1\nfwmark=x\n\nget=1\n\n")
        assert reply == get + b"errno=0\n\nerrno=-22\n\n" + format_get(backend.view)
        assert backend.view.fwmark == 7
        assert _exchange(path, b"bogus\nget=1\n\n") == b"errno=-71\n\n"  # then hung up
        assert _exchange(path, b"set=1\n" + b"x" * 10000) == b"errno=-90\n\n"


def test_garbage_clients_leave_the_server_answering(served: tuple) -> None:
    name, backend, server = served
    rng = random.Random(7)
    valid = [b"get=1\n\n", b"set=1\nfwmark=9\npublic_key=" + A.hex().encode() + b"\n\n"]
    for _ in range(300):
        request = rng.choice(valid)
        truncated, junk = request[: rng.randrange(len(request))], request + b"\x00junk"
        data = rng.choice([rng.randbytes(rng.randrange(1, 300)), truncated, junk])
        reply = _exchange(server.path, data, read=rng.random() < 0.7)
        assert reply == b"" or reply.endswith(b"\n\n")
    assert _exchange(server.path, b"get=1\n\n") == format_get(backend.view)
    assert wg("show", name, "dump").stdout.splitlines()[0].startswith(b64(PRIV))
    deadline = time.monotonic() + 5
    while server.client_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.client_count == 0


def test_idle_and_excess_clients_are_dropped(tmp_path: Path) -> None:
    with serving(str(tmp_path), idle_timeout=0.3, max_clients=2) as (_, _, server):
        socks = [socket.socket(AF_UNIX) for _ in range(3)]
        for sock in socks:
            sock.settimeout(3)
            sock.connect(server.path)
            time.sleep(0.05)
        assert socks[0].recv(10) == b""  # evicted for the third
        assert socks[1].recv(10) == b"" and socks[2].recv(10) == b""  # idle
        for sock in socks:
            sock.close()
