"""The two file interfaces through which a TEE hands out evidence and keys.

* Gramine's ``/dev/attestation`` pseudo-file system: ``attestation_type`` (read:
  ``dcap``, ``epid`` or ``none``), ``user_report_data`` (write 64 bytes),
  ``quote`` (read: an SGX quote over the last report data written), and
  ``keys/`` holding 16-byte keys such as ``_sgx_mrenclave`` (the SGX sealing
  key bound to the enclave's MRENCLAVE).
* The kernel's configfs-tsm (``/sys/kernel/config/tsm/report``, Linux 6.7+,
  ``Documentation/ABI/testing/configfs-tsm-report``): ``mkdir`` creates a report
  instance whose attributes are ``inblob`` (write up to 64 bytes), ``outblob``
  (read: the report over ``inblob``), ``auxblob`` (SEV-SNP certificates),
  ``provider`` (``tdx_guest`` or ``sev_guest``) and ``generation`` (incremented
  by every write, so a reader can tell that nobody else wrote in between).

Both roots are parameters (``PLINIUS_ATTESTATION_ROOT``, ``PLINIUS_TSM_ROOT``) so
tests can point them at trees laid out like the real ones. A plain directory
cannot reproduce a pseudo-file system's side effects (a quote computed on read,
attributes appearing on ``mkdir``); tests emulate those by overriding the
methods of these classes, which are the only places that touch the files.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from ..errors import AttestationError

__all__ = [
    "ATTESTATION_ROOT_ENV",
    "DEFAULT_ATTESTATION_ROOT",
    "DEFAULT_TSM_ROOT",
    "MAX_BLOB_SIZE",
    "TSM_ROOT_ENV",
    "ConfigfsTsm",
    "GramineAttestation",
    "resolve_roots",
]

ATTESTATION_ROOT_ENV = "PLINIUS_ATTESTATION_ROOT"
TSM_ROOT_ENV = "PLINIUS_TSM_ROOT"
DEFAULT_ATTESTATION_ROOT = Path("/dev/attestation")
DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
# Larger than any quote, report or certificate table we expect (the kernel
# caps outblob at 32 KiB); reading stops one byte past it to detect overflow.
MAX_BLOB_SIZE = 64 * 1024
_SMALL = 256

# Gramine's pseudo-files are not thread-safe: a write of user_report_data and
# the read of quote must not interleave with another thread's.
_GRAMINE_LOCK = threading.Lock()


def resolve_roots(
    attestation_root: str | os.PathLike[str] | None, tsm_root: str | os.PathLike[str] | None
) -> tuple[Path, Path]:
    """The two roots: the argument, else the environment variable, else the default."""
    a = attestation_root or os.environ.get(ATTESTATION_ROOT_ENV) or DEFAULT_ATTESTATION_ROOT
    t = tsm_root or os.environ.get(TSM_ROOT_ENV) or DEFAULT_TSM_ROOT
    return Path(a), Path(t)


def _read(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise AttestationError(f"cannot read {what} ({path}): {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise AttestationError(f"{what} ({path}) is larger than {limit} bytes; refusing it")
    return data


def _write(path: Path, data: bytes, what: str) -> None:
    try:
        # No O_CREAT: a pseudo-file that is not there means the interface is not there.
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AttestationError(f"cannot write {what} ({path}): {exc.strerror or exc}") from exc
    if written != len(data):
        raise AttestationError(f"short write to {what} ({path}): {written} of {len(data)} bytes")


class GramineAttestation:
    """Gramine's ``/dev/attestation`` interface rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def attestation_type(self) -> str | None:
        """``dcap``, ``epid``, ``none``; None when the pseudo-file does not exist."""
        path = self.root / "attestation_type"
        if not path.is_file():
            return None
        return _read(path, _SMALL, "Gramine attestation type").decode("ascii", "replace").strip()

    def has_keys(self) -> bool:
        """True when the ``keys/`` directory exists (every Gramine build has it)."""
        return (self.root / "keys").is_dir()

    def has_key(self, name: str) -> bool:
        """True when ``keys/NAME`` exists."""
        return (self.root / "keys" / name).is_file()

    def read_key(self, name: str) -> bytes:
        """The 16-byte key ``keys/NAME`` (for example ``_sgx_mrenclave``)."""
        data = _read(self.root / "keys" / name, _SMALL, f"Gramine key {name}")
        if len(data) != 16:
            raise AttestationError(
                f"Gramine key {name} holds {len(data)} bytes, not 16; is this really Gramine?"
            )
        return data

    def quote(self, report_data: bytes) -> bytes:
        """Write ``report_data`` (64 bytes) and read the quote Gramine made over it."""
        with _GRAMINE_LOCK:
            _write(self.root / "user_report_data", report_data, "Gramine user_report_data")
            return _read(self.root / "quote", MAX_BLOB_SIZE, "Gramine quote")


class ConfigfsTsm:
    """The kernel's configfs-tsm report interface rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def available(self) -> bool:
        """True when the report directory exists."""
        return self.root.is_dir()

    def create(self, name: str) -> None:
        """Create the report instance ``name`` (configfs fills in its attributes)."""
        try:
            os.mkdir(self.root / name, 0o700)
        except OSError as exc:
            hint = (
                "; run as root or give this user access to the tsm report directory"
                if exc.errno in (errno.EACCES, errno.EPERM)
                else ""
            )
            raise AttestationError(
                f"cannot create a configfs-tsm report in {self.root}: {exc.strerror or exc}{hint}"
            ) from exc

    def remove(self, name: str) -> None:
        """Remove the report instance ``name``."""
        try:
            os.rmdir(self.root / name)
        except OSError as exc:
            raise AttestationError(
                f"cannot remove configfs-tsm report {self.root / name}: {exc.strerror or exc}"
            ) from exc

    def exists(self, name: str, attr: str) -> bool:
        """True when the instance has the attribute ``attr``."""
        return (self.root / name / attr).is_file()

    def read(self, name: str, attr: str, limit: int = MAX_BLOB_SIZE) -> bytes:
        """Read the attribute ``attr`` of instance ``name`` (at most ``limit`` bytes)."""
        return _read(self.root / name / attr, limit, f"configfs-tsm {attr}")

    def write(self, name: str, attr: str, data: bytes) -> None:
        """Write the attribute ``attr`` of instance ``name``."""
        _write(self.root / name / attr, data, f"configfs-tsm {attr}")

    def generation(self, name: str) -> int:
        """The instance's write counter."""
        text = self.read(name, "generation", _SMALL).decode("ascii", "replace").strip()
        if not text.isdigit():
            raise AttestationError(f"configfs-tsm generation {text!r} is not a number")
        return int(text)

    def provider(self, name: str) -> str:
        """The instance's provider (``tdx_guest``, ``sev_guest``)."""
        return self.read(name, "provider", _SMALL).decode("ascii", "replace").strip()
