"""SharedRegion: permissions, stale-region recovery, busy detection, wiping, unlinking."""

from __future__ import annotations

import mmap
import os
import secrets
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator

import posix_ipc
import pytest

import shardwg.shm.region as region_mod
from shardwg.shm.region import (
    HEADER_SIZE,
    RegionBusy,
    RegionError,
    SharedRegion,
    region_name,
)

SIZE = 8192


@pytest.fixture
def name() -> Iterator[str]:
    n = f"/shardwg-test-{os.getpid()}-{secrets.token_hex(4)}-region"
    yield n
    try:
        posix_ipc.unlink_shared_memory(n)
    except posix_ipc.ExistentialError:
        pass


def _dev_shm(name: str) -> str:
    return "/dev/shm/" + name.lstrip("/")


def _child(code: str, name: str) -> subprocess.Popen[bytes]:
    """A separate process that creates the region; prints 'ready' once it has."""
    script = (
        "import sys\n"
        "from shardwg.shm.region import SharedRegion\n"
        "r = SharedRegion.create(sys.argv[1], 8192)\n"
        "r.buf[100:104] = b'KEYS'\n"
        "print('ready', flush=True)\n" + code
    )
    return subprocess.Popen([sys.executable, "-c", script, name], stdout=subprocess.PIPE)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)


def test_created_zeroed_with_header_and_attachable(name: str) -> None:
    r = SharedRegion.create(name, SIZE)
    assert r.size == SIZE and r.creator() == os.getpid()
    assert r.buf[:8] == b"SHARDWG\x00"
    assert r.buf[HEADER_SIZE:] == bytes(SIZE - HEADER_SIZE)
    other = SharedRegion.attach(name)
    other.buf[HEADER_SIZE] = 7
    assert r.buf[HEADER_SIZE] == 7  # one memory, two mappings
    ro = SharedRegion.attach(name, readonly=True)
    with pytest.raises(TypeError):
        ro.buf[HEADER_SIZE] = 1
    for x in (ro, other, r):
        x.close()


def test_mode_is_0600_even_under_hostile_umask(name: str) -> None:
    old = os.umask(0o277)  # would turn 0600 into 0400
    try:
        r = SharedRegion.create(name, SIZE)
    finally:
        os.umask(old)
    assert os.stat(_dev_shm(name)).st_mode & 0o777 == 0o600
    r.close()


def test_live_creator_in_this_process_is_busy(name: str) -> None:
    r = SharedRegion.create(name, SIZE)
    with pytest.raises(RegionBusy):
        SharedRegion.create(name, SIZE)
    r.close()


def test_live_creator_elsewhere_is_busy_then_stale_after_it_dies(name: str) -> None:
    proc = _child("import time; time.sleep(30)\n", name)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        with pytest.raises(RegionBusy):
            SharedRegion.create(name, SIZE)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    finally:
        _stop(proc)
    r = SharedRegion.create(name, SIZE)  # the leftover is reclaimed
    assert r.creator() == os.getpid()
    assert r.buf[100:104] == bytes(4)  # fresh, not the dead gateway's memory
    r.close()


def test_stale_region_from_exited_process_is_replaced(name: str) -> None:
    proc = _child("", name)  # creates and exits without unlinking
    try:
        assert proc.wait(timeout=10) == 0
    finally:
        _stop(proc)
    assert os.path.exists(_dev_shm(name))
    r = SharedRegion.create(name, SIZE)
    assert r.creator() == os.getpid()
    r.close()


def test_recycled_pid_with_other_start_time_is_stale(name: str) -> None:
    r = SharedRegion.create(name, SIZE)
    struct.pack_into("<Q", r.buf, 24, 1)  # creator pid is ours, start time is not
    r.close()
    SharedRegion.create(name, SIZE).close()


def test_foreign_region_is_left_alone(name: str) -> None:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=SIZE)
    os.pwrite(shm.fd, b"NOTOURS!" + bytes(24), 0)
    shm.close_fd()
    with pytest.raises(RegionError):
        SharedRegion.create(name, SIZE)
    with pytest.raises(RegionError):
        SharedRegion.attach(name)
    assert os.path.exists(_dev_shm(name))


def test_headerless_region_is_busy_while_young_then_stale(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=SIZE)
    shm.close_fd()
    with pytest.raises(RegionBusy):  # may be a creator between shm_open and its header
        SharedRegion.create(name, SIZE)
    monkeypatch.setattr(region_mod, "_HALF_CREATED_GRACE", -1.0)  # now it counts as old
    SharedRegion.create(name, SIZE).close()


def test_zero_wipes_range_and_everything(name: str) -> None:
    r = SharedRegion.create(name, SIZE)
    r.buf[HEADER_SIZE:] = b"\xaa" * (SIZE - HEADER_SIZE)
    r.zero(HEADER_SIZE + 10, 20)
    assert r.buf[HEADER_SIZE + 10 : HEADER_SIZE + 30] == bytes(20)
    assert r.buf[HEADER_SIZE + 9] == 0xAA and r.buf[HEADER_SIZE + 30] == 0xAA
    with pytest.raises(ValueError):
        r.zero(SIZE - 4, 8)
    r.zero()
    assert r.buf[:] == bytes(SIZE)
    r.close()


def test_zero_across_pages_keeps_the_edges(name: str) -> None:
    size = 16 * mmap.PAGESIZE
    r = SharedRegion.create(name, size)
    r.buf[HEADER_SIZE:] = b"\xaa" * (size - HEADER_SIZE)
    start, length = mmap.PAGESIZE - 100, 5 * mmap.PAGESIZE + 200
    r.zero(start, length)
    assert r.buf[start : start + length] == bytes(length)
    assert r.buf[start - 1] == 0xAA and r.buf[start + length] == 0xAA
    r.close()


def test_zeroing_a_sparse_region_allocates_nothing(name: str) -> None:
    """A region sized for 65,536 peers is mostly never written; wiping it at exit must not
    allocate those pages (it wrote zeros over all of it: 64 MiB of tmpfs here)."""
    size = 64 << 20
    r = SharedRegion.create(name, size)
    r.buf[size - 10 : size] = b"k" * 10  # key material in the last page only
    used = os.stat(_dev_shm(name)).st_blocks * 512
    assert used <= 64 * 1024
    r.zero()
    assert os.stat(_dev_shm(name)).st_blocks * 512 <= used
    assert r.buf[size - 10 : size] == bytes(10)
    r.close()


def test_unlink_removes_dev_shm_entry_and_tolerates_repeat(name: str) -> None:
    r = SharedRegion.create(name, SIZE)
    assert os.path.exists(_dev_shm(name))
    r.unlink()
    assert not os.path.exists(_dev_shm(name))
    r.unlink()
    r.buf[HEADER_SIZE] = 1  # the mapping outlives the name
    r.close()
    r.close()
    with pytest.raises(posix_ipc.ExistentialError):
        SharedRegion.attach(name)


def test_region_name() -> None:
    assert region_name("wg0") == "/shardwg-wg0"
    for bad in ("", "a/b", "x" * 16, "a b"):
        with pytest.raises(ValueError):
            region_name(bad)
