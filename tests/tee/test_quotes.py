"""Quote parsing against synthetic quotes built per the documented layouts.

The quotes come from ``tests/fixtures/tee_support.py``, which follows Intel's SGX
ECDSA / TDX DCAP quote layouts and AMD's SEV-SNP report layout field by field.
"""

from __future__ import annotations

import struct

import pytest

from plinius.errors import AttestationError
from plinius.tee.quotes import (
    MAX_QUOTE_SIZE,
    parse_intel_quote,
    parse_sgx_quote,
    parse_snp_report,
    parse_tdx_quote,
)
from tests.fixtures import tee_support as ts

RD = bytes(range(64))


@pytest.mark.parametrize("version", [3, 4, 5])
def test_sgx_quote_fields(version: int) -> None:
    q = ts.sgx_quote(
        version,
        mrenclave=b"\xa1" * 32,
        mrsigner=b"\xb2" * 32,
        isv_prodid=0x1234,
        isv_svn=0x0506,
        report_data=RD,
    )
    p = parse_sgx_quote(q)
    assert (p.header.version, p.header.att_key_type) == (version, 2)
    assert p.mrenclave == b"\xa1" * 32 and p.mrsigner == b"\xb2" * 32
    assert (p.isv_prodid, p.isv_svn) == (0x1234, 0x0506)
    assert p.report_data == RD and not p.debug
    assert p.signature_data == ts.signature_data()
    assert parse_intel_quote(q) == p


def test_sgx_offsets_are_the_documented_ones() -> None:
    # Independent of the builder: place bytes at header + documented offsets by hand.
    q = bytearray(ts.sgx_quote(3))
    q[48 + 64] = 0xE1  # MRENCLAVE[0]
    q[48 + 128 + 31] = 0xE2  # MRSIGNER[31]
    q[48 + 256 : 48 + 260] = struct.pack("<HH", 7, 9)
    q[48 + 320 + 63] = 0xE3  # REPORTDATA[63]
    p = parse_sgx_quote(bytes(q))
    assert p.mrenclave[0] == 0xE1 and p.mrsigner[31] == 0xE2
    assert (p.isv_prodid, p.isv_svn) == (7, 9) and p.report_data[63] == 0xE3


def test_sgx_debug_flag() -> None:
    assert parse_sgx_quote(ts.sgx_quote(debug=True)).debug


@pytest.mark.parametrize(("version", "td15"), [(4, False), (5, False), (5, True)])
def test_tdx_quote_fields(version: int, td15: bool) -> None:
    rtmrs = tuple(bytes([0x60 + i]) * 48 for i in range(4))
    q = ts.tdx_quote(version, td15, mrtd=b"\x77" * 48, rtmrs=rtmrs, report_data=RD)
    p = parse_tdx_quote(q)
    assert p.header.tee_type == 0x81
    assert p.mrtd == b"\x77" * 48 and p.rtmrs == rtmrs and p.report_data == RD
    assert p.mrseam == b"\x0a" * 48 and p.mrconfigid == b"\x0c" * 48
    assert not p.debug
    assert parse_intel_quote(q) == p


def test_tdx_offsets_are_the_documented_ones() -> None:
    q = bytearray(ts.tdx_quote(4))
    q[48 + 136] = 0xD1  # MRTD[0]
    q[48 + 472 + 47] = 0xD2  # RTMR3[47]
    q[48 + 520] = 0xD3  # REPORTDATA[0]
    q[48 + 120] |= 1  # TD attributes: DEBUG
    p = parse_tdx_quote(bytes(q))
    assert p.mrtd[0] == 0xD1 and p.rtmrs[3][47] == 0xD2 and p.report_data[0] == 0xD3
    assert p.debug


def test_snp_report_fields() -> None:
    p = parse_snp_report(ts.snp_report(measurement=b"\x88" * 48, report_data=RD))
    assert p.measurement == b"\x88" * 48 and p.report_data == RD
    assert (p.version, p.guest_svn, p.vmpl) == (2, 7, 0) and not p.debug
    assert parse_snp_report(ts.snp_report(debug=True)).debug


@pytest.mark.parametrize(
    "blob",
    [ts.sgx_quote(3), ts.sgx_quote(5), ts.tdx_quote(4), ts.tdx_quote(5, True)],
    ids=["sgx3", "sgx5", "tdx4", "tdx5"],
)
def test_every_truncation_is_refused(blob: bytes) -> None:
    for n in range(len(blob)):
        with pytest.raises(AttestationError, match="malformed"):
            parse_intel_quote(blob[:n])


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(AttestationError, match="unexpected bytes"):
        parse_sgx_quote(ts.sgx_quote() + b"\0")


def _patch(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (_patch(ts.sgx_quote(), 0, "<H", 2), "unsupported quote version 2"),
        (_patch(ts.sgx_quote(), 2, "<H", 9), "attestation key type 9"),
        (_patch(ts.sgx_quote(4), 4, "<I", 0x42), "unknown TEE type"),
        (_patch(ts.sgx_quote(), 48 + 384, "<I", 10**6), "signature data of 1000000 bytes"),
        (ts.header(3, 0) + ts.sgx_body() + struct.pack("<I", 8) + bytes(8), "at least 128"),
        (_patch(ts.tdx_quote(5), 48, "<H", 9), "unknown report body type 9"),
        (_patch(ts.tdx_quote(5), 50, "<I", 100), "of 100 bytes, expected 584"),
    ],
    ids=["version", "keytype", "teetype", "siglen-large", "siglen-small", "bodytype", "bodysize"],
)
def test_inconsistent_fields_are_refused(blob: bytes, match: str) -> None:
    with pytest.raises(AttestationError, match=match):
        parse_intel_quote(blob)


def test_kind_confusion_is_refused() -> None:
    with pytest.raises(AttestationError, match="TDX quote"):
        parse_sgx_quote(ts.tdx_quote())
    with pytest.raises(AttestationError, match="SGX quote"):
        parse_tdx_quote(ts.sgx_quote(4))
    # A v5 quote claiming TDX but carrying an SGX body.
    with pytest.raises(AttestationError, match="not a TD report"):
        parse_tdx_quote(ts.quote(5, 0x81, ts.sgx_body(), 1))


def test_oversized_blobs_are_refused_before_parsing() -> None:
    with pytest.raises(AttestationError, match="more than"):
        parse_intel_quote(ts.sgx_quote() + bytes(MAX_QUOTE_SIZE))


def test_bad_snp_reports_are_refused() -> None:
    with pytest.raises(AttestationError, match="expected 1184"):
        parse_snp_report(ts.snp_report()[:-1])
    with pytest.raises(AttestationError, match="version 1"):
        parse_snp_report(ts.snp_report(version=1))
