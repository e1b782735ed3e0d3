"""Observation: gateway status read from shared memory, `shardwg show`, Prometheus metrics."""
