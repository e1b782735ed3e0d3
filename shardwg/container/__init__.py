"""The container entry point: environment config, capability checks, health, process handling."""
