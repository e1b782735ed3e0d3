"""The container entry point (`python -m shardwg.container`): environment config, capability
checks, health, the gateway's command line; entrypoint.py puts them in order."""
