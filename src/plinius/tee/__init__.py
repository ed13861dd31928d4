"""Trusted execution: platform detection, evidence, attested key release, sealing.

Inside the TEE, :func:`obtain_master_key` is all a training job needs: it
unseals the key when a sealed copy exists, and otherwise proves what is
running to the data owner's key server and seals what it receives::

    from plinius.tee import detect_platform, obtain_master_key

    print(detect_platform().description)
    key, how = obtain_master_key(url, server_pubkey_hex, job_id="job-1",
                                 sealed_key_path="job-1.sealed")

The data owner runs the key server (``plinius keyserver``; :class:`KeyServer`)
with a TOML :class:`Policy`. Modules, in the order data flows: ``_wire``
(below all others: refusals, the one strict hex decoder, the HTTP client), ``devices``
(the /dev/attestation and configfs-tsm files), ``platform`` (detection),
``quotes`` (parsing), ``evidence`` (collection), ``verify`` (pluggable quote
verifiers), ``policy``, ``protocol`` (messages, key wrapping, signatures),
``keyserver``, ``client``, ``sealing``; ``counter_service`` (the key server's
per-job freshness counters; their client is :class:`plinius.counters.KeyServerCounter`).
See docs/TEE.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .client import obtain_master_key, request_master_key
from .evidence import Evidence, collect_evidence, simulation_measurement
from .platform import KINDS, Platform, detect_platform
from .policy import Policy
from .quotes import (
    SgxQuote,
    SnpReport,
    TdxQuote,
    parse_sgx_quote,
    parse_snp_report,
    parse_tdx_quote,
)
from .sealing import seal_master_key, unseal_master_key
from .verify import QuoteVerifier, VerificationResult, load_verifier

__all__ = [
    "Evidence",
    "KINDS",
    "KeyServer",
    "Platform",
    "Policy",
    "QuoteVerifier",
    "SgxQuote",
    "SnpReport",
    "TdxQuote",
    "VerificationResult",
    "collect_evidence",
    "detect_platform",
    "load_verifier",
    "obtain_master_key",
    "parse_sgx_quote",
    "parse_snp_report",
    "parse_tdx_quote",
    "request_master_key",
    "seal_master_key",
    "serve",
    "simulation_measurement",
    "unseal_master_key",
]

# The server side needs starlette and uvicorn; the client inside a TEE does not.
_LAZY = {"KeyServer": "keyserver", "serve": "keyserver"}

if TYPE_CHECKING:  # pragma: no cover
    from .keyserver import KeyServer, serve


__getattr__ = lazy_exports(__name__, _LAZY)
