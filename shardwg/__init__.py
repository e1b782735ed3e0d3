"""shardwg: a userspace WireGuard gateway that shards peers over worker processes."""

__version__ = "0.1.0"
