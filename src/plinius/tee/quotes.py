"""Parsing of hardware attestation evidence: SGX DCAP quotes, TDX quotes, SEV-SNP reports.

Only the fields a key-release policy needs are extracted (measurements, debug
flags, report data). Parsing is *not* verification: nothing here checks a
signature. Hardware evidence is trusted only after a :mod:`~plinius.tee.verify`
verifier has checked its signature chain.

Layouts (all integers little-endian), from Intel's "SGX ECDSA Quote Library
API" / "TDX DCAP Quoting Library API" and AMD's "SEV-SNP Firmware ABI":

* quote header, 48 bytes: version u16 @0, attestation key type u16 @2, TEE type
  u32 @4 (v4/v5: 0 = SGX, 0x81 = TDX; reserved in v3), QE/PCE SVNs @8, QE vendor
  id 16 bytes @12, user data 20 bytes @28;
* v3/v4: the report body follows at 48; v5: a body type u16 and body size u32
  come first (type 1 = SGX, 2 = TD 1.0, 3 = TD 1.5), then the body;
* after the body, the signature data length u32 and the signature data;
* SGX report body, 384 bytes: attributes @48 (flags u64, bit 1 = DEBUG),
  MRENCLAVE @64, MRSIGNER @128, ISVPRODID u16 @256, ISVSVN u16 @258,
  REPORTDATA 64 bytes @320;
* TD report body 1.0, 584 bytes: TEE_TCB_SVN @0, MRSEAM @16, TD attributes u64
  @120 (bit 0 = DEBUG), MRTD @136, MRCONFIGID @184, MROWNER @232,
  MROWNERCONFIG @280, RTMR0-3 @328/376/424/472 (48 bytes each), REPORTDATA 64
  bytes @520; 1.5 adds TEE_TCB_SVN2 and MRSERVICETD (648 bytes);
* SEV-SNP attestation report, 1184 bytes: version u32 @0, guest SVN u32 @4,
  policy u64 @8 (bit 19 = DEBUG), VMPL u32 @0x30, REPORT_DATA @0x50,
  MEASUREMENT 48 bytes @0x90, HOST_DATA 32 bytes @0xC0, signature @0x2A0.

Every length and offset is checked before it is used; a malformed blob raises
:class:`~plinius.errors.AttestationError` naming the problem.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import AttestationError

__all__ = [
    "HEADER_SIZE",
    "MAX_QUOTE_SIZE",
    "SGX_REPORT_BODY_SIZE",
    "SNP_REPORT_SIZE",
    "TD10_REPORT_BODY_SIZE",
    "TD15_REPORT_BODY_SIZE",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "QuoteHeader",
    "SgxQuote",
    "SnpReport",
    "TdxQuote",
    "parse_intel_quote",
    "parse_sgx_quote",
    "parse_snp_report",
    "parse_tdx_quote",
]

HEADER_SIZE = 48
SGX_REPORT_BODY_SIZE = 384
TD10_REPORT_BODY_SIZE = 584
TD15_REPORT_BODY_SIZE = 648
SNP_REPORT_SIZE = 0x4A0
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
# The kernel caps a configfs-tsm outblob at 32 KiB; a DCAP quote with its PCK
# certificate chain is about 5 KiB. Anything larger is refused before parsing.
MAX_QUOTE_SIZE = 32 * 1024
# ECDSA-256-with-P-256 and ECDSA-384-with-P-384 attestation keys.
_ATT_KEY_TYPES = {2: 64, 3: 96}  # key type -> ECDSA signature size (r || s)
_V5_BODY_TYPES = {1: SGX_REPORT_BODY_SIZE, 2: TD10_REPORT_BODY_SIZE, 3: TD15_REPORT_BODY_SIZE}
_SGX_DEBUG = 1 << 1
_TD_DEBUG = 1 << 0
_SNP_POLICY_DEBUG = 1 << 19


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte header shared by SGX and TDX DCAP quotes."""

    version: int
    att_key_type: int
    tee_type: int
    qe_vendor_id: bytes


@dataclass(frozen=True)
class SgxQuote:
    """The fields of an SGX DCAP quote (version 3, 4 or 5) a policy needs."""

    header: QuoteHeader
    mrenclave: bytes
    mrsigner: bytes
    isv_prodid: int
    isv_svn: int
    attributes: int
    report_data: bytes
    signature_data: bytes

    @property
    def debug(self) -> bool:
        """True for a debug enclave, whose memory the host can read."""
        return bool(self.attributes & _SGX_DEBUG)


@dataclass(frozen=True)
class TdxQuote:
    """The fields of a TDX quote (version 4 or 5) a policy needs."""

    header: QuoteHeader
    tee_tcb_svn: bytes
    mrseam: bytes
    td_attributes: int
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    signature_data: bytes

    @property
    def debug(self) -> bool:
        """True for a debug TD, whose memory the host can read."""
        return bool(self.td_attributes & _TD_DEBUG)


@dataclass(frozen=True)
class SnpReport:
    """The fields of an AMD SEV-SNP attestation report a policy needs."""

    version: int
    guest_svn: int
    policy: int
    vmpl: int
    report_data: bytes
    measurement: bytes
    host_data: bytes

    @property
    def debug(self) -> bool:
        """True when the guest policy allows the host to debug the guest."""
        return bool(self.policy & _SNP_POLICY_DEBUG)


def _fail(what: str, msg: str) -> AttestationError:
    return AttestationError(f"malformed {what}: {msg}")


def _check_size(data: bytes, what: str) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes")
    if len(data) > MAX_QUOTE_SIZE:
        raise _fail(what, f"{len(data)} bytes, more than the {MAX_QUOTE_SIZE} allowed")


def _header(data: bytes, what: str) -> QuoteHeader:
    if len(data) < HEADER_SIZE:
        raise _fail(what, f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    version, key_type, tee_type = struct.unpack_from("<HHI", data, 0)
    if version not in (3, 4, 5):
        raise _fail(what, f"unsupported quote version {version} (supported: 3, 4, 5)")
    if key_type not in _ATT_KEY_TYPES:
        raise _fail(what, f"unsupported attestation key type {key_type}")
    if version == 3:
        tee_type = TEE_TYPE_SGX  # the field is reserved in v3, which is SGX only
    elif tee_type not in (TEE_TYPE_SGX, TEE_TYPE_TDX):
        raise _fail(what, f"unknown TEE type {tee_type:#x}")
    return QuoteHeader(version, key_type, tee_type, bytes(data[12:28]))


def _body(data: bytes, header: QuoteHeader, what: str) -> tuple[int, memoryview, bytes]:
    """Locate the report body; returns (body type, body, signature data)."""
    view = memoryview(bytes(data))
    off = HEADER_SIZE
    if header.version == 5:
        if len(view) < off + 6:
            raise _fail(what, "truncated before the body type and size")
        body_type, body_size = struct.unpack_from("<HI", view, off)
        off += 6
        expected = _V5_BODY_TYPES.get(body_type)
        if expected is None:
            raise _fail(what, f"unknown report body type {body_type}")
        if body_size != expected:
            raise _fail(what, f"body type {body_type} of {body_size} bytes, expected {expected}")
    elif header.tee_type == TEE_TYPE_TDX:
        body_type, body_size = 2, TD10_REPORT_BODY_SIZE
    else:
        body_type, body_size = 1, SGX_REPORT_BODY_SIZE
    if len(view) < off + body_size + 4:
        raise _fail(what, f"{len(view)} bytes, too short for a {body_size}-byte report body")
    body = view[off : off + body_size]
    off += body_size
    (sig_len,) = struct.unpack_from("<I", view, off)
    off += 4
    remaining = len(view) - off
    if sig_len > remaining:
        raise _fail(what, f"signature data of {sig_len} bytes, only {remaining} present")
    if sig_len != remaining:
        raise _fail(what, f"{remaining - sig_len} unexpected bytes after the signature data")
    # ECDSA signature over header and body, then the attestation public key.
    minimum = 2 * _ATT_KEY_TYPES[header.att_key_type]
    if sig_len < minimum:
        raise _fail(what, f"signature data of {sig_len} bytes, at least {minimum} needed")
    return body_type, body, bytes(view[off:])


def parse_sgx_quote(data: bytes) -> SgxQuote:
    """Parse an SGX DCAP quote (version 3, 4 or 5); raises AttestationError if malformed."""
    what = "SGX quote"
    _check_size(data, what)
    header = _header(data, what)
    if header.tee_type != TEE_TYPE_SGX:
        raise _fail(what, "this is a TDX quote")
    body_type, b, sig = _body(data, header, what)
    if body_type != 1:
        raise _fail(what, f"report body type {body_type} is not an SGX enclave report")
    (attributes,) = struct.unpack_from("<Q", b, 48)
    prodid, svn = struct.unpack_from("<HH", b, 256)
    return SgxQuote(
        header=header,
        mrenclave=bytes(b[64:96]),
        mrsigner=bytes(b[128:160]),
        isv_prodid=prodid,
        isv_svn=svn,
        attributes=attributes,
        report_data=bytes(b[320:384]),
        signature_data=sig,
    )


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parse a TDX quote (version 4 or 5); raises AttestationError if malformed."""
    what = "TDX quote"
    _check_size(data, what)
    header = _header(data, what)
    if header.tee_type != TEE_TYPE_TDX:
        raise _fail(what, "this is an SGX quote")
    body_type, b, sig = _body(data, header, what)
    if body_type not in (2, 3):
        raise _fail(what, f"report body type {body_type} is not a TD report")
    (td_attributes,) = struct.unpack_from("<Q", b, 120)
    rtmrs = tuple(bytes(b[328 + 48 * i : 376 + 48 * i]) for i in range(4))
    return TdxQuote(
        header=header,
        tee_tcb_svn=bytes(b[0:16]),
        mrseam=bytes(b[16:64]),
        td_attributes=td_attributes,
        mrtd=bytes(b[136:184]),
        mrconfigid=bytes(b[184:232]),
        mrowner=bytes(b[232:280]),
        mrownerconfig=bytes(b[280:328]),
        rtmrs=(rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]),
        report_data=bytes(b[520:584]),
        signature_data=sig,
    )


def parse_intel_quote(data: bytes) -> SgxQuote | TdxQuote:
    """Parse an SGX or TDX quote, whichever its header announces."""
    _check_size(data, "quote")
    header = _header(data, "quote")
    return parse_tdx_quote(data) if header.tee_type == TEE_TYPE_TDX else parse_sgx_quote(data)


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse an AMD SEV-SNP attestation report; raises AttestationError if malformed."""
    what = "SEV-SNP report"
    _check_size(data, what)
    if len(data) != SNP_REPORT_SIZE:
        raise _fail(what, f"{len(data)} bytes, expected {SNP_REPORT_SIZE}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0)
    if version < 2:
        raise _fail(what, f"report version {version} is not an SEV-SNP report (2 or later)")
    (vmpl,) = struct.unpack_from("<I", data, 0x30)
    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        vmpl=vmpl,
        report_data=bytes(data[0x50:0x90]),
        measurement=bytes(data[0x90:0xC0]),
        host_data=bytes(data[0xC0:0xE0]),
    )
