"""`python -m shardwg` is the `shardwg` command."""

import sys

from shardwg.cli import main

sys.exit(main())
