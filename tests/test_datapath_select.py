"""Which data path runs, and how it is named to an operator."""

from __future__ import annotations

import pytest

from shardwg.datapath import open_ref, select


def test_native_zero_selects_the_reference() -> None:
    impl = select.choose("0")
    assert impl.name == "python" and impl.open_batch is open_ref.open_batch
    assert select.describe(impl) == "python (SHARDWG_NATIVE=0)"


def test_default_is_native_when_built() -> None:
    impl = select.choose("")
    if select.native_module() is None:
        assert impl.name == "python" and "not built" in impl.detail
        with pytest.raises(ImportError):
            select.choose("1")
    else:
        assert impl.name == "native" and impl.detail.startswith("OpenSSL ")
        assert select.choose("1").name == "native"
