"""The supervisor's end of one worker's control stream: a queue that never blocks.

The supervisor loop also runs the heartbeat watchdog, the UAPI and /metrics, so it must
never wait for a worker. Frames are appended to a per-worker queue and written as far as
the socket takes them, now and on later turns (the loop watches queues that hold bytes
for writability). A worker that stops reading (SIGSTOP, a hang) only grows its own
queue; once it has not drained for STALL_LIMIT the watchdog replaces the worker, and the
replacement boots from the whole current configuration, so the queue is dropped with it.
"""

from __future__ import annotations

import socket

from shardwg.engine import control

STALL_LIMIT = 3.0  # seconds a queue may hold bytes without any of them being taken


class ControlLink:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.queue = bytearray()
        self.stalled_since: float | None = None  # when the queue last made no progress
        self.broken = False  # the worker's end is gone (it died: the reaper replaces it)

    def send(self, data: bytes, now: float) -> None:
        """Queue one encoded message (`control.encode`) and write what the socket takes;
        never blocks."""
        if self.broken:
            return
        self.queue += control.frame_bytes(data)
        self.flush(now)

    def flush(self, now: float) -> None:
        """Write as much of the queue as the socket takes without blocking."""
        queue = self.queue
        moved = False
        while queue:
            try:
                n = self.sock.send(queue)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.broken = True
                queue.clear()
                break
            del queue[:n]
            moved = True
        if not queue:
            self.stalled_since = None
        elif moved or self.stalled_since is None:
            self.stalled_since = now

    def stalled_for(self, now: float) -> float:
        return 0.0 if self.stalled_since is None else now - self.stalled_since

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.queue.clear()
        self.sock.close()
