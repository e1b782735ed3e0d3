"""POSIX shared memory: seqlocked per-peer slots and per-worker counters."""
