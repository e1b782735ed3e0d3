"""The sharded engine: supervisor, workers, their boot, live changes, control messages."""
