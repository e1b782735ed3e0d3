"""The sans-IO WireGuard core: bytes and `now` in, bytes and actions out.

Nothing in this package touches sockets, clocks, processes or shared memory;
the I/O layers (`shardwg.io`, `shardwg.shm`, the worker) wrap it.
"""
