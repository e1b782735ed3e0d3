"""`python -m shardwg.container`: the container image's ENTRYPOINT and HEALTHCHECK."""

import sys

from shardwg.container.entrypoint import main

sys.exit(main())
