"""Fuzz targets, seed corpus and runner for shardwg's attacker-facing parsers (see README)."""
