"""Which trusted execution environment plinius runs in, and what it can do there.

Detection order (the first that matches wins):

1. Gramine with SGX: ``/dev/attestation/attestation_type`` reads ``dcap``
   (or the SGX sealing key ``keys/_sgx_mrenclave`` exists while remote
   attestation is switched off in the manifest, which evidence collection
   then reports);
2. Gramine without SGX (``gramine-direct``): ``/dev/attestation/keys`` only;
3. a confidential VM through the kernel's configfs-tsm: a report instance's
   ``provider`` is ``tdx_guest`` (TDX) or ``sev_guest`` (SEV-SNP);
4. none of these: simulation, which protects nothing and says so.

Detection never falls back silently: an unknown configfs-tsm provider or an
unreadable interface is an :class:`~plinius.errors.AttestationError`.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import AttestationError
from .devices import ConfigfsTsm, GramineAttestation, resolve_roots

__all__ = ["KINDS", "Platform", "detect_platform"]

KINDS = ("gramine-sgx", "gramine-nosgx", "tdx", "sev-snp", "simulation")
_TSM_PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}


@dataclass(frozen=True)
class Platform:
    """A detected platform.

    ``kind`` is one of :data:`KINDS`. ``secure`` is False where nothing protects
    the key from the host (simulation, Gramine without SGX). ``can_seal`` says
    whether a released key can be sealed locally so that restarts need no key
    server; ``sealing`` says how (or why not).
    """

    kind: str
    description: str
    can_seal: bool
    secure: bool
    sealing: str
    attestation_root: Path
    tsm_root: Path
    attestation_type: str | None = None
    tsm_provider: str | None = None

    @property
    def simulated(self) -> bool:
        """True when evidence from this platform is simulated (not hardware-signed)."""
        return self.kind in ("simulation", "gramine-nosgx")


_INSECURE_SEAL = (
    "INSECURE simulation sealing key in a file beside the sealed key (PATH.simkey); "
    "whoever can read both files has the master key"
)


def detect_platform(
    attestation_root: str | os.PathLike[str] | None = None,
    tsm_root: str | os.PathLike[str] | None = None,
) -> Platform:
    """Detect the platform.

    ``attestation_root`` (default ``$PLINIUS_ATTESTATION_ROOT`` or
    ``/dev/attestation``) and ``tsm_root`` (default ``$PLINIUS_TSM_ROOT`` or
    ``/sys/kernel/config/tsm/report``) locate the two interfaces.
    """
    aroot, troot = resolve_roots(attestation_root, tsm_root)
    gramine = GramineAttestation(aroot)
    att_type = gramine.attestation_type()
    sgx_seal = gramine.has_key("_sgx_mrenclave")
    if att_type not in (None, "none") or sgx_seal:
        if att_type == "dcap":
            desc = "Gramine with Intel SGX; DCAP remote attestation"
        elif att_type in (None, "none"):
            desc = (
                "Gramine with Intel SGX, but remote attestation is off in the manifest "
                '(set sgx.remote_attestation = "dcap"): no evidence can be produced'
            )
        else:
            desc = f"Gramine with Intel SGX; attestation type {att_type!r} is not supported"
        return Platform(
            kind="gramine-sgx",
            description=desc,
            can_seal=sgx_seal,
            secure=True,
            sealing=(
                "SGX sealing key bound to MRENCLAVE (/dev/attestation/keys/_sgx_mrenclave)"
                if sgx_seal
                else "none: the SGX sealing key is missing; the key server is asked on every start"
            ),
            attestation_root=aroot,
            tsm_root=troot,
            attestation_type=att_type,
        )
    if gramine.has_keys():
        return Platform(
            kind="gramine-nosgx",
            description=(
                "Gramine WITHOUT SGX (gramine-direct): no hardware protection; "
                "evidence is simulated and the key is visible to the host"
            ),
            can_seal=True,
            secure=False,
            sealing=_INSECURE_SEAL,
            attestation_root=aroot,
            tsm_root=troot,
            attestation_type=att_type,
        )
    tsm = ConfigfsTsm(troot)
    if tsm.available():
        provider = probe_tsm_provider(tsm)
        kind = _TSM_PROVIDERS.get(provider)
        if kind is None:
            raise AttestationError(
                f"configfs-tsm provider {provider!r} is not supported "
                "(supported: tdx_guest, sev_guest)"
            )
        name = "Intel TDX" if kind == "tdx" else "AMD SEV-SNP"
        return Platform(
            kind=kind,
            description=f"confidential VM ({name}) through configfs-tsm ({provider})",
            can_seal=False,
            secure=True,
            sealing=(
                "none: a confidential VM has no sealing key here; "
                "the key server is asked again on every start"
            ),
            attestation_root=aroot,
            tsm_root=troot,
            tsm_provider=provider,
        )
    return Platform(
        kind="simulation",
        description=(
            "SIMULATION: no trusted execution environment found; nothing protects the key "
            "or the training state from this host, and evidence is simulated"
        ),
        can_seal=True,
        secure=False,
        sealing=_INSECURE_SEAL,
        attestation_root=aroot,
        tsm_root=troot,
    )


def probe_tsm_provider(tsm: ConfigfsTsm) -> str:
    """Create a throw-away report instance to read the provider, then remove it."""
    name = f"plinius-probe-{os.getpid()}-{secrets.token_hex(4)}"
    tsm.create(name)
    try:
        return tsm.provider(name)
    finally:
        tsm.remove(name)
