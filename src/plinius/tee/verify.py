"""Signature-chain verification of hardware evidence, through a pluggable verifier.

Parsing a quote (:mod:`.quotes`) proves nothing: anyone can write the bytes.
A quote is trusted only after a verifier has checked its signature chain up to
the vendor's root (Intel's for SGX and TDX, AMD's for SEV-SNP) and reported the
platform's TCB status. plinius ships no such verifier of its own; it plugs in:

* ``dcap-qvl`` (``pip install dcap-qvl``): Intel SGX and TDX quotes, with
  collateral fetched from a PCCS (``--pccs-url``; default Intel's PCS);
* any object with ``name`` and ``verify(kind, blob, auxblob)``, named on the
  command line as ``module:factory``.

Without a verifier, hardware evidence is refused with a clear error, never
accepted unverified. Simulated evidence needs no verifier: it is accepted only
where the policy sets ``allow_simulation = true``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import AttestationError, ConfigError

__all__ = ["DcapQvlVerifier", "QuoteVerifier", "VerificationResult", "load_verifier"]


@dataclass(frozen=True)
class VerificationResult:
    """A verifier's verdict on a quote whose signature chain checked out."""

    verifier: str
    tcb_status: str
    advisory_ids: tuple[str, ...] = ()


@runtime_checkable
class QuoteVerifier(Protocol):
    """Checks the signature chain of hardware evidence.

    ``verify`` raises :class:`~plinius.errors.AttestationError` when the chain
    does not verify, and otherwise returns the TCB status; the key server's
    policy decides which statuses it accepts.
    """

    name: str

    def verify(self, kind: str, blob: bytes, auxblob: bytes) -> VerificationResult: ...


class DcapQvlVerifier:
    """Verifies SGX and TDX quotes with the optional ``dcap-qvl`` package.

    Collateral (TCB info, QE identity, CRLs) comes from ``pccs_url``, by
    default Intel's own PCS (passed explicitly: the package's own default is a
    third party's PCCS). Not exercised against real hardware or the real
    package in plinius' own tests (neither is available there); see docs/TEE.md.
    """

    name = "dcap-qvl"
    INTEL_PCS_URL = "https://api.trustedservices.intel.com"

    def __init__(self, pccs_url: str | None = None) -> None:
        try:
            self._qvl: Any = importlib.import_module("dcap_qvl")
        except ImportError as exc:
            raise ConfigError(
                "the dcap-qvl verifier needs the dcap-qvl package: pip install dcap-qvl"
            ) from exc
        self.pccs_url = pccs_url or self.INTEL_PCS_URL

    def verify(self, kind: str, blob: bytes, auxblob: bytes) -> VerificationResult:
        """Verify an SGX or TDX quote; SEV-SNP reports are not supported by dcap-qvl."""
        if kind not in ("sgx-dcap", "tdx"):
            raise AttestationError(f"the dcap-qvl verifier cannot verify {kind} evidence")
        try:
            result = self._qvl.get_collateral_and_verify(blob, self.pccs_url)
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result))
        except Exception as exc:  # the package raises its own exception types
            raise AttestationError(f"quote verification failed (dcap-qvl): {exc}") from exc
        status = str(getattr(result, "status", ""))
        if not status:
            raise AttestationError("dcap-qvl returned no TCB status")
        advisories = tuple(str(a) for a in (getattr(result, "advisory_ids", None) or ()))
        return VerificationResult(self.name, status, advisories)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def load_verifier(spec: str | None, *, pccs_url: str | None = None) -> QuoteVerifier | None:
    """A verifier from a command-line spec: None or ``none``, ``dcap-qvl``, ``module:factory``."""
    if spec is None or spec == "none":
        return None
    if spec == "dcap-qvl":
        return DcapQvlVerifier(pccs_url)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"unknown verifier {spec!r}: use 'none', 'dcap-qvl' or 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load verifier {spec!r}: {exc}") from exc
    try:
        verifier = factory()
    except Exception as exc:  # whatever a third-party factory raises
        raise ConfigError(f"verifier factory {spec} failed: {exc}") from exc
    if not isinstance(verifier, QuoteVerifier):
        raise ConfigError(f"{spec} did not return a verifier (with name and verify())")
    return verifier


def require_verified(
    verifier: QuoteVerifier | None, kind: str, blob: bytes, auxblob: bytes
) -> VerificationResult:
    """Run ``verifier`` on hardware evidence; refuse when there is none."""
    if verifier is None:
        raise AttestationError(
            f"{kind} evidence cannot be verified: this key server has no quote verifier "
            "(start it with --verifier dcap-qvl or --verifier module:factory); "
            "hardware evidence is never accepted unverified"
        )
    result = verifier.verify(kind, blob, auxblob)
    if not isinstance(result, VerificationResult):
        raise AttestationError(f"verifier {verifier.name} returned no verdict")
    return result
