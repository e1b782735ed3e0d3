"""A real `shardwg run` process in a test namespace; lives in shardwg.lab. Re-exports only."""

from shardwg.lab.gateway_proc import ShardwgGateway, peer_section

__all__ = ["ShardwgGateway", "peer_section"]
