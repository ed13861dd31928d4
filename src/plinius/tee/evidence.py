"""Evidence over 64 bytes of report data, from whichever platform plinius runs on.

* Gramine with SGX: write ``user_report_data``, read ``quote`` (an SGX DCAP quote);
* configfs-tsm: make a report instance, write ``inblob``, read ``outblob`` (a TDX
  quote or an SEV-SNP report) and check ``generation`` so a concurrent writer
  cannot slip its report data in between;
* simulation (and Gramine without SGX): a structure marked as simulated that
  carries the report data and a measurement of the installed plinius code.
  Anyone can forge it; a key server accepts it only with ``allow_simulation``.

The collector checks that the evidence really carries the report data it asked
for, so a race with another attester is an error here, not a refusal later.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto import aad
from ..errors import AttestationError
from ._wire import decode_hex
from .devices import ConfigfsTsm, GramineAttestation
from .platform import Platform
from .quotes import (
    MAX_QUOTE_SIZE,
    SgxQuote,
    SnpReport,
    TdxQuote,
    parse_sgx_quote,
    parse_snp_report,
    parse_tdx_quote,
)

__all__ = [
    "EVIDENCE_KINDS",
    "REPORT_DATA_SIZE",
    "Evidence",
    "SimulatedReport",
    "collect_evidence",
    "parse_evidence",
    "simulation_measurement",
]

REPORT_DATA_SIZE = 64
EVIDENCE_KINDS = ("simulation", "sgx-dcap", "tdx", "sev-snp")
_PLATFORM_KINDS = ("gramine-sgx", "gramine-nosgx", "tdx", "sev-snp", "simulation")
_MEASURED_SUFFIXES = (".py", ".cfg")


@functools.cache
def simulation_measurement() -> bytes:
    """SHA-256 over the installed plinius package's source files.

    The files (``*.py`` and the bundled ``*.cfg``) are taken in sorted order of
    their paths relative to the package; each contributes its path and its
    contents, length-prefixed. Computed once per process: it describes the code
    this process loaded, even if the files change later.
    """
    pkg = Path(__file__).resolve().parent.parent
    files = sorted(
        (p.relative_to(pkg).as_posix(), p)
        for p in pkg.rglob("*")
        if p.suffix in _MEASURED_SUFFIXES and "__pycache__" not in p.parts and p.is_file()
    )
    h = hashlib.sha256(b"plinius/v1/simulation-measurement\0")
    for rel, path in files:
        h.update(aad(rel, path.read_bytes()))
    return h.digest()


@dataclass(frozen=True)
class SimulatedReport:
    """What simulated evidence claims: not signed by anything."""

    platform: str
    measurement: bytes
    report_data: bytes
    debug: bool = False


@dataclass(frozen=True)
class Evidence:
    """Evidence as sent to the key server.

    ``kind`` is one of :data:`EVIDENCE_KINDS`; ``platform`` the platform kind
    that produced it. Hardware evidence carries its quote or report in ``blob``
    (and SEV-SNP certificates in ``auxblob``); simulated evidence carries
    ``report_data`` and ``measurement`` directly.
    """

    kind: str
    platform: str
    blob: bytes = b""
    auxblob: bytes = b""
    report_data: bytes = b""
    measurement: bytes = b""

    @property
    def simulated(self) -> bool:
        """True for simulated evidence."""
        return self.kind == "simulation"

    def to_json(self) -> dict[str, Any]:
        """The JSON object sent in a key-release request."""
        if self.simulated:
            return {
                "kind": self.kind,
                "simulated": True,
                "platform": self.platform,
                "report_data": self.report_data.hex(),
                "measurement": self.measurement.hex(),
            }
        out: dict[str, Any] = {
            "kind": self.kind,
            "platform": self.platform,
            "quote": base64.b64encode(self.blob).decode("ascii"),
        }
        if self.auxblob:
            out["auxblob"] = base64.b64encode(self.auxblob).decode("ascii")
        return out

    @classmethod
    def from_json(cls, obj: object) -> Evidence:
        """Validate and decode the evidence object of a request.

        Args:
            obj: the ``evidence`` field as received (any JSON value).

        Returns:
            The evidence.

        Raises:
            AttestationError: an unknown kind or platform, unexpected fields,
                or a field that is not exact hex (or base64) of its size.
        """
        if not isinstance(obj, dict):
            raise AttestationError("evidence must be a JSON object")
        kind = obj.get("kind")
        platform = obj.get("platform")
        if kind not in EVIDENCE_KINDS:
            raise AttestationError(f"unknown evidence kind {kind!r}")
        if platform not in _PLATFORM_KINDS:
            raise AttestationError(f"unknown platform {platform!r}")
        if kind == "simulation":
            _only(obj, {"kind", "simulated", "platform", "report_data", "measurement"})
            if obj.get("simulated") is not True:
                raise AttestationError("simulated evidence must say so ('simulated': true)")
            if platform not in ("simulation", "gramine-nosgx"):
                raise AttestationError(f"platform {platform} does not produce simulated evidence")
            return cls(
                kind=kind,
                platform=platform,
                report_data=_hex(obj.get("report_data"), "report_data", REPORT_DATA_SIZE),
                measurement=_hex(obj.get("measurement"), "measurement", 32),
            )
        _only(obj, {"kind", "platform", "quote", "auxblob"})
        expected = {"sgx-dcap": "gramine-sgx", "tdx": "tdx", "sev-snp": "sev-snp"}[kind]
        if platform != expected:
            raise AttestationError(f"{kind} evidence cannot come from platform {platform}")
        return cls(
            kind=kind,
            platform=platform,
            blob=_b64(obj.get("quote"), "quote"),
            auxblob=_b64(obj.get("auxblob", ""), "auxblob"),
        )


def _only(obj: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise AttestationError(f"unexpected evidence fields: {', '.join(extra)}")


def _hex(value: object, name: str, size: int) -> bytes:
    return decode_hex(value, size, name=name, error=AttestationError, prefix="evidence field ")


def _b64(value: object, name: str) -> bytes:
    # 4/3 of the largest blob accepted, so oversized input is refused before decoding.
    if not isinstance(value, str) or len(value) > (MAX_QUOTE_SIZE * 4) // 3 + 4:
        raise AttestationError(
            f"evidence field {name} must be base64 of at most {MAX_QUOTE_SIZE} bytes"
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AttestationError(f"evidence field {name} is not valid base64") from exc


def parse_evidence(evidence: Evidence) -> SgxQuote | TdxQuote | SnpReport | SimulatedReport:
    """The claims in ``evidence``, parsed but *not* verified.

    Args:
        evidence: as received.

    Returns:
        The parsed quote or report.

    Raises:
        AttestationError: the quote or report is malformed.
    """
    if evidence.kind == "simulation":
        return SimulatedReport(evidence.platform, evidence.measurement, evidence.report_data)
    if evidence.kind == "sgx-dcap":
        return parse_sgx_quote(evidence.blob)
    if evidence.kind == "tdx":
        return parse_tdx_quote(evidence.blob)
    if evidence.kind == "sev-snp":
        return parse_snp_report(evidence.blob)
    raise AttestationError(f"unknown evidence kind {evidence.kind!r}")


def collect_evidence(platform: Platform, report_data: bytes) -> Evidence:
    """Evidence from ``platform`` that carries ``report_data``.

    Args:
        platform: where plinius runs (see :func:`.platform.detect_platform`).
        report_data: exactly 64 bytes to bind (see :func:`.protocol.report_data_binding`).

    Returns:
        The evidence, checked to carry ``report_data``.

    Raises:
        ValueError: ``report_data`` is not 64 bytes (a bug in the caller).
        AttestationError: the platform cannot attest, or its evidence does not
            carry ``report_data`` (another attester raced this one).
    """
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report data is exactly {REPORT_DATA_SIZE} bytes")
    report_data = bytes(report_data)
    if platform.kind in ("simulation", "gramine-nosgx"):
        return Evidence(
            kind="simulation",
            platform=platform.kind,
            report_data=report_data,
            measurement=simulation_measurement(),
        )
    if platform.kind == "gramine-sgx":
        return _collect_gramine(platform, report_data)
    if platform.kind in ("tdx", "sev-snp"):
        return _collect_tsm(platform, report_data)
    raise AttestationError(f"unknown platform kind {platform.kind!r}")


def _collect_gramine(platform: Platform, report_data: bytes) -> Evidence:
    gramine = GramineAttestation(platform.attestation_root)
    att_type = gramine.attestation_type()
    if att_type != "dcap":
        raise AttestationError(
            f"Gramine attestation type is {att_type or 'missing'}, not dcap: "
            'set sgx.remote_attestation = "dcap" in the manifest'
        )
    quote = gramine.quote(report_data)
    parsed = parse_sgx_quote(quote)
    if parsed.report_data != report_data:
        raise AttestationError(
            "the Gramine quote does not carry the report data just written; another "
            "thread may be attesting at the same time; try again"
        )
    return Evidence(kind="sgx-dcap", platform=platform.kind, blob=quote)


def _collect_tsm(platform: Platform, report_data: bytes) -> Evidence:
    tsm = ConfigfsTsm(platform.tsm_root)
    # One instance per request, as the ABI recommends; the generation check
    # still catches anyone who writes to it between our inblob and outblob.
    name = f"plinius-{os.getpid()}-{secrets.token_hex(4)}"
    tsm.create(name)
    try:
        provider = tsm.provider(name)
        before = tsm.generation(name)
        tsm.write(name, "inblob", report_data)
        blob = tsm.read(name, "outblob")
        aux = b""
        if provider == "sev_guest" and tsm.exists(name, "auxblob"):
            aux = tsm.read(name, "auxblob")
        after = tsm.generation(name)
    finally:
        tsm.remove(name)
    if after != before + 1:
        raise AttestationError(
            f"configfs-tsm report {name} was written by someone else while it was being "
            f"generated (generation {before} -> {after}, expected {before + 1}); try again"
        )
    if not blob:
        raise AttestationError("configfs-tsm returned an empty report")
    parsed: TdxQuote | SnpReport
    if provider == "tdx_guest" and platform.kind == "tdx":
        parsed = parse_tdx_quote(blob)
        kind = "tdx"
    elif provider == "sev_guest" and platform.kind == "sev-snp":
        parsed = parse_snp_report(blob)
        kind = "sev-snp"
    else:
        raise AttestationError(
            f"configfs-tsm provider {provider!r} does not match platform {platform.kind}"
        )
    if parsed.report_data != report_data:
        raise AttestationError("the configfs-tsm report does not carry the report data written")
    return Evidence(kind=kind, platform=platform.kind, blob=blob, auxblob=aux)
