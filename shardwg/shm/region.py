"""A POSIX shared memory region (posix_ipc.SharedMemory + mmap) with a small header.

Why a header: the region outlives a crashed supervisor in /dev/shm. The next
`create` must tell a leftover (creator dead: drop and replace) from a live gateway
on the same interface (refuse). The header at offset 0 records magic, layout
version, creator pid, the creator's start time (from /proc, so a recycled pid is
not mistaken for the creator) and the size. Layouts place their data at offsets
>= HEADER_SIZE.

Not safe against two processes creating the same name at the same instant (both
could judge a leftover stale): there is one supervisor per interface.

No secret lives here (shm/secrets.py keeps session keys and the cookie secret in an
anonymous mapping only the gateway's processes share): `shardwg show` maps this
region whole. Pages are still marked MADV_DONTDUMP; they are not mlocked.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

import posix_ipc

MAGIC = b"SHARDWG\x00"
VERSION = 1
HEADER_SIZE = 64  # one cache line; the fields below use the first 40 bytes
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, creator pid, size, creator start time
_MODE = 0o600
_HALF_CREATED_GRACE = 2.0  # seconds a header-less region may be a creator still starting up
_ZERO_CHUNK = 1 << 20
_IFNAMSIZ = 16


class RegionError(Exception):
    """The region exists but is not usable (foreign, wrong version, truncated)."""


class RegionBusy(RegionError):
    """A live process created the region: another gateway owns this name."""


def region_name(interface: str) -> str:
    """The shared memory name for one interface's gateway."""
    if not interface or len(interface) >= _IFNAMSIZ or any(c in interface for c in "/\0 \t\n"):
        raise ValueError(f"invalid interface name {interface!r}")
    return f"/shardwg-{interface}"


def _start_time(pid: int) -> int | None:
    """Start time of a live, non-zombie process in clock ticks; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # zombie or dead: it holds nothing any more
        return None
    return int(fields[19])  # field 22 of stat(5); fields[0] is field 3


def _creator_alive(pid: int, start: int) -> bool:
    return pid > 0 and _start_time(pid) == start


class SharedRegion:
    """A mapped region; `buf` is the whole mapping including the header."""

    def __init__(self, name: str, buf: mmap.mmap) -> None:
        self.name = name
        self.buf = buf
        self.size = len(buf)

    @classmethod
    def create(cls, name: str, size: int) -> SharedRegion:
        """Create a fresh zero-filled region, mode 0600, replacing a dead creator's leftover."""
        if size < HEADER_SIZE:
            raise ValueError(f"region size {size} smaller than its {HEADER_SIZE}-byte header")
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=_MODE, size=size)
        except posix_ipc.ExistentialError:
            _reclaim(name)  # raises RegionBusy / RegionError unless the leftover is stale
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=_MODE, size=size)
        try:
            if os.fstat(shm.fd).st_mode & 0o777 != _MODE:  # umask narrowed it
                os.fchmod(shm.fd, _MODE)
            if os.fstat(shm.fd).st_mode & 0o777 != _MODE:
                raise RegionError(f"{name}: cannot set mode {_MODE:o}")
            buf = mmap.mmap(shm.fd, size)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        shm.close_fd()
        _dontdump(buf)
        pid = os.getpid()
        _HEADER.pack_into(buf, 0, MAGIC, VERSION, pid, size, _start_time(pid) or 0)
        return cls(name, buf)

    @classmethod
    def attach(cls, name: str, readonly: bool = False) -> SharedRegion:
        """Map an existing region (readonly for observers such as `shardwg show`)."""
        shm = posix_ipc.SharedMemory(name, read_only=readonly)
        try:
            if shm.size < HEADER_SIZE:
                raise RegionError(f"{name}: {shm.size} bytes, too small for a shardwg region")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            buf = mmap.mmap(shm.fd, shm.size, prot=prot)
        finally:
            shm.close_fd()
        magic, version, _pid, size, _start = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != VERSION or size != len(buf):
            buf.close()
            raise RegionError(f"{name}: not a shardwg v{VERSION} region of this size")
        _dontdump(buf)
        return cls(name, buf)

    def creator(self) -> int:
        """Pid recorded by the creator."""
        return int(_HEADER.unpack_from(self.buf, 0)[2])

    def zero(self, offset: int = 0, length: int | None = None) -> None:
        """Make a range read as zeros (wipe key material before unlinking).

        Whole pages are punched out of the tmpfs file (MADV_REMOVE): their memory is freed,
        and pages never written are not touched, so wiping a sparse region costs what was
        used, not its size. Partial pages at the edges are overwritten.
        """
        end = self.size if length is None else offset + length
        if offset < 0 or end > self.size or end < offset:
            raise ValueError(f"range [{offset}, {end}) outside region of {self.size} bytes")
        page = mmap.PAGESIZE
        lo, hi = -(-offset // page) * page, end // page * page
        if hi > lo and hasattr(mmap, "MADV_REMOVE"):
            try:
                self.buf.madvise(mmap.MADV_REMOVE, lo, hi - lo)
            except OSError:  # not a tmpfs mapping: write the zeros
                lo = hi = end
        else:
            lo = hi = end
        self._write_zeros(offset, lo)
        self._write_zeros(hi, end)

    def _write_zeros(self, pos: int, end: int) -> None:
        chunk = bytes(min(_ZERO_CHUNK, max(0, end - pos)))
        while pos < end:
            n = min(len(chunk), end - pos)
            self.buf[pos : pos + n] = chunk[:n]  # a full-length slice is chunk itself
            pos += n

    def close(self) -> None:
        """Unmap. Raises BufferError while views (seqlock slots, counters) are alive."""
        if not self.buf.closed:
            self.buf.close()

    def unlink(self) -> None:
        """Remove the name from /dev/shm; mappings stay valid until closed."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dontdump(buf: mmap.mmap) -> None:
    if hasattr(mmap, "MADV_DONTDUMP"):
        buf.madvise(mmap.MADV_DONTDUMP)


def _reclaim(name: str) -> None:
    """Unlink `name` if its creator is dead; raise if it is alive or the region is foreign."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return  # vanished meanwhile
    try:
        st = os.fstat(shm.fd)
        head = os.pread(shm.fd, _HEADER.size, 0) if shm.size >= _HEADER.size else b""
    finally:
        shm.close_fd()
    if len(head) == _HEADER.size and head != bytes(_HEADER.size):
        magic, _version, pid, _size, start = _HEADER.unpack(head)
        if magic != MAGIC:
            raise RegionError(f"{name} exists and is not a shardwg region; not touching it")
        if _creator_alive(pid, start):
            raise RegionBusy(f"{name} is in use by live process {pid}")
    elif time.time() - st.st_ctime < _HALF_CREATED_GRACE:
        raise RegionBusy(f"{name} has no header yet; its creator may still be starting")
    # Stale: drop its pages before letting the name go. Truncating frees them in one call
    # whatever the size (a planted region can claim terabytes; mapping or zeroing it whole
    # would not be bounded), and nothing can read them afterwards. Regions of this layout
    # hold no key (shm/secrets.py); older ones did.
    try:
        old = posix_ipc.SharedMemory(name)
        try:
            os.ftruncate(old.fd, 0)
        finally:
            old.close_fd()
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass  # someone else removed it meanwhile
