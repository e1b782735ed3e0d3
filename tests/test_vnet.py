"""shardwg.io.vnet: the header layout and the big-integer checksum, against the plain reference
checksum of test_segment."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_segment import pseudo, ref_csum, ref_sum

from shardwg.io import tun, vnet


def test_header_layout_is_little_endian() -> None:
    buf = bytearray(14)
    vnet.build(buf, 2, 1, vnet.GSO_TCPV4, 0x0102, 0x0304, 0x0506, 0x0708)
    assert bytes(buf) == bytes.fromhex("0000" "0101" "0201" "0403" "0605" "0807" "0000")
    assert vnet.parse(buf, 2) == (1, 1, 0x102, 0x304, 0x506, 0x708)
    assert vnet.parse(vnet.ZERO_HDR) == (0,) * 6 and vnet.VNET_HDR_LEN == tun.VNET_HDR_LEN == 10


def test_constants_match_the_kernel_and_tun_module() -> None:
    assert (vnet.TUN_F_CSUM, vnet.TUN_F_TSO4, vnet.TUN_F_TSO6) == (
        tun.TUN_F_CSUM, tun.TUN_F_TSO4, tun.TUN_F_TSO6)  # fmt: skip
    assert (vnet.TUN_F_USO4, vnet.TUN_F_USO6) == (tun.TUN_F_USO4, tun.TUN_F_USO6)
    assert (vnet.GSO_NONE, vnet.GSO_TCPV4, vnet.GSO_UDP, vnet.GSO_TCPV6, vnet.GSO_UDP_L4) == (
        0, 1, 3, 4, 5)  # fmt: skip
    assert (vnet.GSO_ECN, vnet.VIRTIO_NET_HDR_F_NEEDS_CSUM) == (0x80, 1)


@pytest.mark.parametrize(
    "n", [0, 1, 2, 3, 20, 39, 1399, 1400, 2047, 2048, 2049, 4097, 9001, 65534, 65535]
)
def test_sum16_matches_reference(n: int) -> None:
    for data in (os.urandom(n), b"\xff" * n, bytes(n)):
        assert vnet.sum16(data) == ref_sum(data) % 0xFFFF
        assert vnet.sum16(memoryview(bytearray(data))) == vnet.sum16(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000))
def test_sum16_property(data: bytes) -> None:
    assert vnet.sum16(data) == ref_sum(data) % 0xFFFF
    c = vnet.finish(vnet.sum16(data))
    assert 1 <= c <= 0xFFFF
    if any(data):  # a nonzero sum plus its checksum folds to 0xFFFF (ones' complement zero)
        assert ref_sum(data + (b"\0" if len(data) % 2 else b"") + c.to_bytes(2, "big")) == 0xFFFF


def test_finish_and_fold_edges() -> None:
    assert vnet.finish(0) == 0xFFFF and vnet.finish(0xFFFF) == 0xFFFF and vnet.finish(1) == 0xFFFE
    assert vnet.fold(0) == 0xFFFF and vnet.fold(0x1_0001) == 2 and vnet.fold(5) == 5
    assert vnet.finish(vnet.sum16(b"\x12\x34\x56")) == ref_csum(b"\x12\x34\x56")


@pytest.mark.parametrize("size", [4, 16])
def test_pseudo_sum(size: int) -> None:
    src, dst = os.urandom(size), os.urandom(size)
    for proto, length in ((6, 1400), (17, 65535), (6, 0)):
        want = ref_sum(pseudo(src, dst, proto, length)) % 0xFFFF
        assert vnet.pseudo_sum(src + dst, proto, length) % 0xFFFF == want
