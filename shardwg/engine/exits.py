"""Exit codes a worker or the supervisor ends with, in one place both sides import.

A worker's code tells its supervisor whether to replace it: a configuration that
cannot work (EXIT_BOOT_FAILURE) stops the gateway instead of a restart storm.
"""

from __future__ import annotations

EXIT_CRASH = 70  # EX_SOFTWARE: a worker died of an unexpected exception; it is replaced
EXIT_BOOT_FAILURE = 3  # a worker's exit code: configuration cannot work, do not retry
EXIT_FOREIGN_QUEUE = 4  # the supervisor's: a foreign process attached a queue to our TUN
