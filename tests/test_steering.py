"""Reuseport steering: the program in a tiny interpreter, then for real on loopback."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import cbpf_model
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from shardwg.io import steering as st
from shardwg.proto.index import SPREAD_INDEX_BIT, make_index
from shardwg.proto.spread import receiver_worker

N = 4


def _run(workers: int, payload: bytes) -> int:
    """Interpret the program as the kernel's classic BPF would; a reuseport program sees the
    datagram from the first byte of the UDP payload."""
    try:
        return cbpf_model.run(st.program(workers), b"", payload)
    except cbpf_model.Aborted:
        return 0  # the kernel aborts a run on an out-of-bounds load with 0


def transport(worker: int, size: int = 32) -> bytes:
    return b"\x04\0\0\0" + make_index(worker, 0xABCDEF).to_bytes(4, "little") + bytes(size - 8)


def cookie_reply(worker: int) -> bytes:
    return b"\x03\0\0\0" + make_index(worker, 0x123456).to_bytes(4, "little") + bytes(56)


def response(worker: int) -> bytes:
    # The sender index at offset 4 names another worker: only offset 8 may count.
    receiver = make_index(worker, 0x654321).to_bytes(4, "little")
    return b"\x02\0\0\0" + bytes([7, 7, 7, 7]) + receiver + bytes(80)


def initiation() -> bytes:
    return b"\x01\0\0\0" + bytes([2, 0, 0, 0]) + bytes(140)


def test_program_decisions() -> None:
    for w in range(N):
        assert _run(N, transport(w)) == w
        assert _run(N, transport(w, 1500)) == w
        assert _run(N, cookie_reply(w)) == w
        assert _run(N, response(w)) == w
    fb = st.FALLBACK
    assert _run(N, initiation()) == fb
    assert _run(N, transport(N)) == fb and _run(N, transport(255)) == fb  # id >= N: hash
    assert _run(N, transport(2)[:31]) == fb  # runts never default to socket 0
    assert _run(N, b"\x04") == fb and _run(N, b"") == fb
    assert _run(N, b"\x04\0\x01\0" + transport(2)[4:]) == fb  # reserved bytes must be zero
    assert _run(N, b"\x05\0\0\0" + transport(2)[4:]) == fb
    assert _run(1, transport(0)) == 0 and _run(1, transport(1)) == fb
    assert _run(256, transport(255)) == 255


def test_program_encoding() -> None:
    code = st.build_program(N)
    assert len(code) == 8 * len(st.program(N))
    assert code[:8] == bytes([0x80, 0, 0, 0, 0, 0, 0, 0])  # ld len (native u16 code)
    for bad in (0, 257):
        with pytest.raises(ValueError):
            st.build_program(bad)


# ---------------------------------------------------------------- on loopback


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def group(request: pytest.FixtureRequest) -> Iterator[tuple[list[socket.socket], tuple[str, int]]]:
    family = request.param
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    socks: list[socket.socket] = []
    try:
        for _ in range(N):  # join order = slot order
            s = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, socks[0].getsockname()[1] if len(socks) > 1 else 0))
        st.attach(socks[2], N)  # any member: the program belongs to the group
        yield socks, (host, socks[0].getsockname()[1])
    finally:
        for s in socks:
            s.close()


def _where(socks: list[socket.socket], dst: tuple[str, int], data: bytes, tx: socket.socket) -> int:
    """Send one datagram and return the slot of the socket that got it."""
    tx.sendto(data, dst)
    ready, _, _ = select.select([s for s in socks if s.fileno() >= 0], [], [], 2.0)
    assert len(ready) == 1, f"datagram landed on {len(ready)} sockets"
    assert ready[0].recv(4096) == data
    return socks.index(ready[0])


def _senders(family: int, n: int) -> list[socket.socket]:
    return [socket.socket(family, socket.SOCK_DGRAM) for _ in range(n)]


def test_kernel_steers_by_index_byte(group: tuple[list[socket.socket], tuple[str, int]]) -> None:
    socks, dst = group
    senders = _senders(socks[0].family, 8)
    try:
        for tx in senders:  # many source ports: the hash alone could not do this
            for w in range(N):
                assert _where(socks, dst, transport(w), tx) == w
                assert _where(socks, dst, cookie_reply(w), tx) == w
                assert _where(socks, dst, response(w), tx) == w
    finally:
        for tx in senders:
            tx.close()


def test_kernel_hashes_initiations_and_junk(
    group: tuple[list[socket.socket], tuple[str, int]],
) -> None:
    socks, dst = group
    senders = _senders(socks[0].family, 32)
    try:
        home = [_where(socks, dst, initiation(), tx) for tx in senders]
        assert len(set(home)) > 1  # spread by the 4-tuple hash (32 sources on 4 sockets)
        for tx, h in zip(senders, home, strict=True):
            assert _where(socks, dst, initiation(), tx) == h  # one endpoint, one socket
            # Fallbacks follow the same hash: id >= N, runts, reserved bytes set.
            assert _where(socks, dst, transport(N + 1), tx) == h
            assert _where(socks, dst, transport(3)[:20], tx) == h
            assert _where(socks, dst, b"\x04\x01\0\0" + transport(1)[4:], tx) == h
    finally:
        for tx in senders:
            tx.close()


def test_closing_a_socket_moves_the_last_into_its_slot(
    group: tuple[list[socket.socket], tuple[str, int]],
) -> None:
    socks, dst = group
    tx = socket.socket(socks[0].family, socket.SOCK_DGRAM)
    try:
        keeper = socks[1].dup()  # what the supervisor does: the slot survives the worker
        socks[1].close()
        assert _where([socks[0], keeper, socks[2], socks[3]], dst, transport(1), tx) == 1
        keeper.close()  # now the socket really leaves the group
        live = [socks[0], socks[3], socks[2]]  # kernel: old #3 moved into slot 1
        assert _where(live, dst, transport(0), tx) == 0
        assert _where(live, dst, transport(1), tx) == 1  # id 1 -> old socket #3
        assert _where(live, dst, transport(2), tx) == 2
        h = _where(live, dst, initiation(), tx)
        assert _where(live, dst, transport(3), tx) == h  # 3 >= num_socks: hash fallback
    finally:
        tx.close()


def test_detach_restores_plain_hashing(
    group: tuple[list[socket.socket], tuple[str, int]],
) -> None:
    socks, dst = group
    st.detach(socks[0])
    senders = _senders(socks[0].family, 16)
    try:
        got = {_where(socks, dst, transport(0), tx) for tx in senders}
        assert got != {0}  # without the program, worker 0's packets scatter
    finally:
        for tx in senders:
            tx.close()


@given(payload=st_.binary(max_size=96), workers=st_.integers(1, 256), head=st_.integers(0, 6))
@settings(max_examples=400, deadline=None)
def test_program_matches_its_contract(payload: bytes, workers: int, head: int) -> None:
    if head and len(payload) >= 4:  # bias towards real headers: type 1-5, reserved zero
        payload = bytes([head, 0, 0, 0]) + payload[4:]
    want = st.FALLBACK
    if len(payload) >= 32 and payload[1:4] == b"\0\0\0":
        offset = {4: 4, 3: 4, 2: 8}.get(payload[0])
        if offset is not None and payload[offset] < workers:
            want = payload[offset]
    assert _run(workers, payload) == want


# ---------------------------------------------------------------- spread peers


def spread_transport(worker: int, counter: int, flagged: bool = True) -> bytes:
    index = make_index(worker, 0xABCDEF) & ~SPREAD_INDEX_BIT
    index |= SPREAD_INDEX_BIT if flagged else 0
    return b"\x04\0\0\0" + index.to_bytes(4, "little") + counter.to_bytes(8, "little") + bytes(16)


def _run_spread(workers: int, payload: bytes) -> int:
    try:
        return cbpf_model.run(st.program(workers, spread=True), b"", payload)
    except cbpf_model.Aborted:
        return 0


@given(payload=st_.binary(max_size=96), workers=st_.integers(1, 256), head=st_.integers(0, 6))
@settings(max_examples=400, deadline=None)
def test_spread_program_matches_its_contract(payload: bytes, workers: int, head: int) -> None:
    """Spread-flagged transport goes by counter block; everything else as `program`."""
    if head and len(payload) >= 4:
        payload = bytes([head, 0, 0, 0]) + payload[4:]
    want = _run(workers, payload)
    if len(payload) >= 32 and payload[:4] == b"\x04\0\0\0" and payload[5] & 1:
        counter = int.from_bytes(payload[8:16], "little")
        want = (((counter >> 8) & 0xFFFFFFFF) >> 2) % workers
    assert _run_spread(workers, payload) == want


@given(counter=st_.integers(0, (1 << 34) - 1), workers=st_.integers(1, 256),
       owner=st_.integers(0, 255))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_spread_program_agrees_with_the_sender_blocks(counter: int, workers: int,
                                                      owner: int) -> None:  # fmt: skip
    assert _run_spread(workers, spread_transport(owner, counter)) == receiver_worker(
        counter, workers
    )
    unflagged = _run_spread(workers, spread_transport(owner, counter, flagged=False))
    assert unflagged == (owner if owner < workers else st.FALLBACK)


def test_kernel_steers_spread_transport_by_counter() -> None:
    """The kernel runs the spread program as the model does (ALU, JSET, MOD included)."""
    socks: list[socket.socket] = []
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", socks[0].getsockname()[1] if len(socks) > 1 else 0))
        st.attach(socks[1], 3, spread=True)
        dst = ("127.0.0.1", socks[0].getsockname()[1])
        for counter in (0, 1023, 1024, 2048, 5 * 1024 + 7, (1 << 33) + 3 * 1024, 77777):
            want = receiver_worker(counter, 3)
            assert _where(socks, dst, spread_transport(0, counter), tx) == want, counter
        assert _where(socks, dst, spread_transport(2, 4096, flagged=False), tx) == 2
    finally:
        tx.close()
        for s in socks:
            s.close()
