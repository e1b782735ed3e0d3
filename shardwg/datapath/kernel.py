"""Which batch kernel runs: the native extension when it imports and SHARDWG_NATIVE is not 0,
else the pure-Python reference. Both export the same names, so callers never branch."""

from __future__ import annotations

import os
from typing import Any

from shardwg.datapath import seal_ref

NATIVE = False
NAME = "python"
Sealer: Any = seal_ref.Sealer
seal_run: Any = seal_ref.seal_run
OK, LIMIT = seal_ref.OK, seal_ref.LIMIT

if os.environ.get("SHARDWG_NATIVE", "1") != "0":
    try:
        from shardwg.datapath import _native  # type: ignore[attr-defined]
    except ImportError:  # not built: the pure-Python path, as documented
        pass
    else:
        NATIVE, NAME = True, "native"
        Sealer, seal_run = _native.Sealer, _native.seal_run
