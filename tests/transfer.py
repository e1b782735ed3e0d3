"""TCP transfers with end-to-end sha256 between namespaces; lives in shardwg.lab. Re-exports."""

from shardwg.lab.transfer import Transfer, TransferResult

__all__ = ["Transfer", "TransferResult"]
