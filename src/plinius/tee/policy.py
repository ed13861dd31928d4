"""The key server's release policy, a TOML file written by the data owner.

::

    allow_simulation = false          # required: simulated evidence is forgeable
    allow_debug = false               # optional: debug enclaves/TDs/guests expose memory
    accepted_tcb_status = ["UpToDate"]  # optional: verifier TCB statuses to accept

    [sgx]                             # Gramine with SGX (DCAP quotes)
    mrenclave = ["<64 hex>", ...]     # at least one of mrenclave / mrsigner
    mrsigner = ["<64 hex>", ...]
    isv_prodid = 1                    # optional
    min_isv_svn = 0                   # optional

    [tdx]                             # Intel TDX confidential VMs
    mrtd = ["<96 hex>", ...]          # required
    rtmr0 = ["<96 hex>", ...]         # optional, rtmr0 .. rtmr3

    [sev-snp]                         # AMD SEV-SNP confidential VMs
    measurement = ["<96 hex>", ...]   # required

    [simulation]                      # only with allow_simulation = true
    measurement = ["<64 hex>", ...]   # optional: pin the plinius code measured

A platform without a table is refused. Every list is an allow-list: evidence
must match one of its values. Unknown keys are errors (a typo must not widen
or silently change a policy).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AttestationError, ConfigError
from .evidence import SimulatedReport
from .quotes import SgxQuote, SnpReport, TdxQuote
from .verify import VerificationResult

__all__ = ["Policy", "SgxPolicy", "SimulationPolicy", "SnpPolicy", "TdxPolicy"]

_MAX_POLICY_BYTES = 1 << 20


@dataclass(frozen=True)
class SgxPolicy:
    """Allowed SGX enclaves."""

    mrenclave: frozenset[bytes] | None
    mrsigner: frozenset[bytes] | None
    isv_prodid: int | None
    min_isv_svn: int | None


@dataclass(frozen=True)
class TdxPolicy:
    """Allowed TDX TDs: MRTD and, optionally, the runtime measurement registers."""

    mrtd: frozenset[bytes]
    rtmrs: tuple[frozenset[bytes] | None, ...]


@dataclass(frozen=True)
class SnpPolicy:
    """Allowed SEV-SNP guests."""

    measurement: frozenset[bytes]


@dataclass(frozen=True)
class SimulationPolicy:
    """Allowed simulated evidence (None: any plinius code)."""

    measurement: frozenset[bytes] | None


@dataclass(frozen=True)
class Policy:
    """A parsed release policy; :meth:`check` decides on one piece of evidence."""

    allow_simulation: bool
    allow_debug: bool
    accepted_tcb_status: frozenset[str]
    sgx: SgxPolicy | None = None
    tdx: TdxPolicy | None = None
    sev_snp: SnpPolicy | None = None
    simulation: SimulationPolicy | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and validate a policy file; ConfigError naming the problem."""
        p = Path(path)
        try:
            if p.exists() and not p.is_file() and not p.is_dir():  # a FIFO would block
                raise ConfigError(f"policy {p} is not a regular file")
            with open(p, "rb") as f:
                raw = f.read(_MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read policy {p}: {exc.strerror or exc}") from exc
        if len(raw) > _MAX_POLICY_BYTES:
            raise ConfigError(f"policy {p} is larger than {_MAX_POLICY_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"policy {p} is not UTF-8 text") from exc
        return cls.parse(text, source=str(p))

    @classmethod
    def parse(cls, text: str, source: str = "<policy>") -> Policy:
        """Parse policy TOML text; ConfigError naming the problem."""
        try:
            doc = tomllib.loads(text)
        except ValueError as exc:  # TOMLDecodeError, or an integer of too many digits
            raise ConfigError(f"policy {source} is not valid TOML: {exc}") from exc
        r = _Reader(doc, source, "")
        r.only(
            {"allow_simulation", "allow_debug", "accepted_tcb_status"}
            | {"sgx", "tdx", "sev-snp", "simulation"}
        )
        if "allow_simulation" not in doc:
            raise ConfigError(
                f"policy {source}: allow_simulation is missing; set it to true or false explicitly"
            )
        allow_sim = r.boolean("allow_simulation")
        policy = cls(
            allow_simulation=allow_sim,
            allow_debug=r.boolean("allow_debug", False),
            accepted_tcb_status=frozenset(r.strings("accepted_tcb_status") or ["UpToDate"]),
            sgx=_sgx(r.table("sgx")),
            tdx=_tdx(r.table("tdx")),
            sev_snp=_snp(r.table("sev-snp")),
            simulation=_sim(r.table("simulation")),
        )
        if policy.simulation is not None and not allow_sim:
            raise ConfigError(
                f"policy {source}: a [simulation] table needs allow_simulation = true"
            )
        return policy

    def check(
        self,
        claims: SgxQuote | TdxQuote | SnpReport | SimulatedReport,
        verification: VerificationResult | None,
    ) -> str:
        """Accept ``claims`` or raise AttestationError with the reason.

        ``verification`` is the verifier's verdict for hardware evidence (None
        for simulated evidence). Returns a short description for the audit log.
        """
        if isinstance(claims, SimulatedReport):
            if not self.allow_simulation:
                raise AttestationError(
                    "simulated evidence refused: the policy does not set allow_simulation = true"
                )
            sim = self.simulation or SimulationPolicy(None)
            _allowed(sim.measurement, claims.measurement, "simulation measurement")
            return f"simulation measurement {claims.measurement.hex()}"
        if verification is None:
            raise AttestationError("hardware evidence was not verified")
        if verification.tcb_status not in self.accepted_tcb_status:
            raise AttestationError(
                f"TCB status {verification.tcb_status!r} is not accepted by the policy "
                f"(accepted: {', '.join(sorted(self.accepted_tcb_status))})"
            )
        if claims.debug and not self.allow_debug:
            raise AttestationError("evidence from a debug enclave/VM refused (allow_debug = false)")
        if isinstance(claims, SgxQuote):
            sgx = self._table(self.sgx, "sgx")
            _allowed(sgx.mrenclave, claims.mrenclave, "MRENCLAVE")
            _allowed(sgx.mrsigner, claims.mrsigner, "MRSIGNER")
            if sgx.isv_prodid is not None and claims.isv_prodid != sgx.isv_prodid:
                raise AttestationError(
                    f"ISV product id {claims.isv_prodid} is not the allowed {sgx.isv_prodid}"
                )
            if sgx.min_isv_svn is not None and claims.isv_svn < sgx.min_isv_svn:
                raise AttestationError(
                    f"ISV SVN {claims.isv_svn} is below the minimum {sgx.min_isv_svn}"
                )
            return f"sgx mrenclave {claims.mrenclave.hex()} mrsigner {claims.mrsigner.hex()}"
        if isinstance(claims, TdxQuote):
            tdx = self._table(self.tdx, "tdx")
            _allowed(tdx.mrtd, claims.mrtd, "MRTD")
            for i, allowed in enumerate(tdx.rtmrs):
                _allowed(allowed, claims.rtmrs[i], f"RTMR{i}")
            return f"tdx mrtd {claims.mrtd.hex()}"
        snp = self._table(self.sev_snp, "sev-snp")
        _allowed(snp.measurement, claims.measurement, "SEV-SNP measurement")
        return f"sev-snp measurement {claims.measurement.hex()}"

    @staticmethod
    def _table(table: Any, name: str) -> Any:
        if table is None:
            raise AttestationError(f"the policy has no [{name}] table: {name} evidence is refused")
        return table


def _allowed(allowed: frozenset[bytes] | None, value: bytes, what: str) -> None:
    if allowed is not None and value not in allowed:
        raise AttestationError(f"{what} {value.hex()} is not allowed by the policy")


class _Reader:
    """Typed access to one TOML table, with errors naming the key."""

    def __init__(self, doc: dict[str, Any], source: str, prefix: str) -> None:
        self.doc, self.source, self.prefix = doc, source, prefix

    def _err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"policy {self.source}: {self.prefix}{key} {msg}")

    def only(self, allowed: set[str]) -> None:
        for key in self.doc:
            if key not in allowed:
                raise self._err(key, f"is not a known key (known: {', '.join(sorted(allowed))})")

    def boolean(self, key: str, default: bool | None = None) -> bool:
        value = self.doc.get(key, default)
        if not isinstance(value, bool):
            raise self._err(key, "must be true or false")
        return value

    def integer(self, key: str, bits: int) -> int | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
            raise self._err(key, f"must be an integer from 0 to {(1 << bits) - 1}")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self._err(key, "must be a non-empty list of strings")
        return value

    def hexes(self, key: str, size: int) -> frozenset[bytes] | None:
        values = self.strings(key)
        if values is None:
            return None
        out = set()
        for v in values:
            try:
                b = bytes.fromhex(v)
            except ValueError:
                b = b""
            if len(b) != size:
                raise self._err(key, f"has {v!r}, which is not {size} bytes in hex")
            out.add(b)
        return frozenset(out)

    def table(self, key: str) -> _Reader | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._err(key, "must be a table ([" + key + "])")
        return _Reader(value, self.source, f"[{key}] ")


def _sgx(r: _Reader | None) -> SgxPolicy | None:
    if r is None:
        return None
    r.only({"mrenclave", "mrsigner", "isv_prodid", "min_isv_svn"})
    p = SgxPolicy(
        mrenclave=r.hexes("mrenclave", 32),
        mrsigner=r.hexes("mrsigner", 32),
        isv_prodid=r.integer("isv_prodid", 16),
        min_isv_svn=r.integer("min_isv_svn", 16),
    )
    if p.mrenclave is None and p.mrsigner is None:
        raise ConfigError(f"policy {r.source}: [sgx] needs mrenclave or mrsigner (or both)")
    return p


def _tdx(r: _Reader | None) -> TdxPolicy | None:
    if r is None:
        return None
    r.only({"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"})
    mrtd = r.hexes("mrtd", 48)
    if mrtd is None:
        raise ConfigError(f"policy {r.source}: [tdx] needs mrtd")
    return TdxPolicy(mrtd, tuple(r.hexes(f"rtmr{i}", 48) for i in range(4)))


def _snp(r: _Reader | None) -> SnpPolicy | None:
    if r is None:
        return None
    r.only({"measurement"})
    m = r.hexes("measurement", 48)
    if m is None:
        raise ConfigError(f"policy {r.source}: [sev-snp] needs measurement")
    return SnpPolicy(m)


def _sim(r: _Reader | None) -> SimulationPolicy | None:
    if r is None:
        return None
    r.only({"measurement"})
    return SimulationPolicy(r.hexes("measurement", 32))
