"""Build the optional native batch kernel (shardwg.datapath._native) against the system OpenSSL.

Everything else about the package lives in pyproject.toml. The extension is optional: when it
cannot be built (no compiler, no OpenSSL headers) the install still succeeds and shardwg runs
the pure-Python data path, which is also the reference the native one is tested against.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = sorted(glob.glob("shardwg/datapath/native/*.c"))
EXTRA = ["-O2", "-std=c11", "-Wall", "-Wextra", "-fno-strict-aliasing"]
if os.environ.get("SHARDWG_NATIVE_SANITIZE"):
    EXTRA += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]


class OptionalBuildExt(build_ext):
    """Build the extension, but let the install go on without it when the build fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "pure Python"
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if os.environ.get("SHARDWG_NATIVE_REQUIRED"):
                raise
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(f"shardwg: native data path not built ({exc}); using pure Python", file=sys.stderr)


setup(
    ext_modules=[
        Extension(
            "shardwg.datapath._native",
            sources=SOURCES,
            depends=sorted(glob.glob("shardwg/datapath/native/*.h")),
            libraries=["crypto"],
            extra_compile_args=EXTRA,
            extra_link_args=["-fsanitize=address,undefined"]
            if os.environ.get("SHARDWG_NATIVE_SANITIZE")
            else [],
        )
    ]
    if SOURCES
    else [],
    cmdclass={"build_ext": OptionalBuildExt},
)
