"""Sealing: keep the released master key on local disk, readable only by the same TEE.

A sealed key file lets a restart after a crash unseal the key locally instead
of waiting for the key server. Where the key to seal with comes from:

* Gramine with SGX: HKDF of ``/dev/attestation/keys/_sgx_mrenclave``, the SGX
  sealing key of this enclave build on this CPU (never used directly, as
  Gramine's documentation warns);
* simulation and Gramine without SGX: a random key in ``PATH.simkey`` beside
  the sealed file (mode 0600). INSECURE: whoever reads both files has the key;
* confidential VMs (TDX, SEV-SNP): none; the key server is asked on every start.

File format, version 1 (integers big-endian)::

    magic "PLNSEAL\\0" | version u16 | platform u8-len str | purpose u8-len str |
    label u16-len str | sealing-key id 16 | salt 16 | nonce 12 |
    ciphertext length u32 | AES-256-GCM ciphertext and tag

The whole header is the AAD, so the platform kind, the purpose and the label
(the job id) cannot be changed. The sealing-key id (HKDF of the sealing key)
tells "sealed by another enclave or machine" apart from tampering.
"""

from __future__ import annotations

import os
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .. import _magic
from .._fsutil import create_secret_file, write_atomic
from ..crypto import KEY_SIZE, Aead, MasterKey, hkdf
from ..errors import (
    AttestationError,
    ConfigError,
    FormatError,
    IntegrityError,
    KeyFileError,
    WrongKeyError,
    storage_error,
)
from .devices import GramineAttestation
from .platform import Platform

__all__ = ["SEAL_MAGIC", "SealingKey", "seal_master_key", "unseal_master_key"]

SEAL_MAGIC = _magic.SEALED_KEY
SEAL_VERSION = 1
_MAX_SEALED_BYTES = 4096
_PURPOSE = "master-key"


@dataclass(frozen=True)
class SealingKey:
    """A platform's sealing key. ``secure`` is False for the simulation key file."""

    platform: str
    root: bytes
    source: str
    secure: bool

    @property
    def key_id(self) -> bytes:
        """16 bytes that identify the key without revealing it."""
        return hkdf(self.root, salt=None, info="plinius/v1/seal-key-id", length=16)

    @classmethod
    def for_platform(
        cls, platform: Platform, sealed_path: str | os.PathLike[str], *, create: bool
    ) -> SealingKey:
        """The sealing key for files sealed at ``sealed_path`` on ``platform``.

        ``create`` makes the simulation key file when it is missing (when
        sealing); unsealing never creates one.
        """
        if platform.kind == "gramine-sgx":
            if not platform.can_seal:
                raise AttestationError(f"this platform cannot seal: {platform.sealing}")
            ikm = GramineAttestation(platform.attestation_root).read_key("_sgx_mrenclave")
            root = hkdf(ikm, salt=None, info="plinius/v1/sealing-root/gramine-sgx-mrenclave")
            return cls(platform.kind, root, "SGX MRENCLAVE sealing key", True)
        if platform.kind in ("simulation", "gramine-nosgx"):
            simkey = Path(f"{os.fspath(sealed_path)}.simkey")
            return cls(
                platform.kind, _simulation_key(simkey, create), f"{simkey} (INSECURE)", False
            )
        raise AttestationError(f"this platform cannot seal: {platform.sealing}")


def _simulation_key(path: Path, create: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if not create:
            raise WrongKeyError(
                f"the simulation sealing key {path} is missing, so the sealed key cannot be "
                "opened; delete the sealed key file to ask the key server again"
            ) from None
        return _create_simulation_key(path)
    except OSError as exc:
        raise KeyFileError(f"cannot open simulation sealing key {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise KeyFileError(
                f"simulation sealing key {path} must be a regular file with mode 0600"
            )
        data = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:
        raise KeyFileError(f"simulation sealing key {path} is not {KEY_SIZE} bytes")
    return data


def _create_simulation_key(path: Path) -> bytes:
    data = secrets.token_bytes(KEY_SIZE)
    create_secret_file(path, data, what="simulation sealing key")
    return data


def _header(platform: str, label: str, key_id: bytes, salt: bytes, nonce: bytes) -> bytes:
    p, pur, lab = platform.encode(), _PURPOSE.encode(), label.encode()
    return (
        SEAL_MAGIC
        + struct.pack(">HB", SEAL_VERSION, len(p))
        + p
        + struct.pack(">B", len(pur))
        + pur
        + struct.pack(">H", len(lab))
        + lab
        + key_id
        + salt
        + nonce
    )


def seal_master_key(
    platform: Platform, path: str | os.PathLike[str], master: MasterKey, *, job_id: str
) -> SealingKey:
    """Seal ``master`` for ``job_id`` to ``path`` (mode 0600, written atomically).

    Args:
        platform: the platform whose sealing key is used.
        path: the sealed key file (replaced if it exists).
        master: the key to seal.
        job_id: the job; bound in the header, checked when unsealing.

    Returns:
        The sealing key used (its ``source`` says where it came from).

    Raises:
        AttestationError: the platform cannot seal (a confidential VM).
        StorageError: the file cannot be written.
        KeyFileError: the simulation sealing key beside ``path`` is unusable.
    """
    p = Path(path)
    key = SealingKey.for_platform(platform, p, create=True)
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    header = _header(key.platform, job_id, key.key_id, salt, nonce)
    aead = Aead(hkdf(key.root, salt=salt, info="plinius/v1/seal/" + _PURPOSE))
    ct = aead.encrypt(nonce, master.raw_bytes(), header)
    write_atomic(p, header + struct.pack(">I", len(ct)) + ct, what="sealed key")
    return key


def unseal_master_key(
    platform: Platform, path: str | os.PathLike[str], *, job_id: str
) -> MasterKey:
    """Open the sealed key at ``path``.

    Args:
        platform: the platform whose sealing key is used.
        path: the sealed key file.
        job_id: the job it must have been sealed for.

    Returns:
        The master key.

    Raises:
        FormatError: not a plinius sealed key file (or another version).
        IntegrityError: it was tampered with.
        WrongKeyError: sealed on another platform, enclave or for another job,
            or the simulation sealing key is missing.
        StorageError: it cannot be read.
    """
    p = Path(path)
    try:
        if p.exists() and not p.is_file():  # a FIFO would block, a device never end
            raise FormatError(f"sealed key {p} is not a regular file")
        with open(p, "rb") as f:
            data = f.read(_MAX_SEALED_BYTES + 1)
    except OSError as exc:
        raise storage_error(exc, f"cannot read sealed key {p}") from exc
    if len(data) > _MAX_SEALED_BYTES:
        raise FormatError(f"{p} is too large to be a sealed key file")
    if not data.startswith(SEAL_MAGIC):
        raise FormatError(f"{p} is not a plinius sealed key file")
    r = _Cursor(data, p)
    r.take(len(SEAL_MAGIC))
    (version,) = struct.unpack(">H", r.take(2))
    if version != SEAL_VERSION:
        raise FormatError(f"sealed key {p} has format version {version}; this plinius reads 1")
    sealed_platform = r.text(1)
    purpose = r.text(1)
    label = r.text(2)
    key_id, salt, nonce = r.take(16), r.take(16), r.take(12)
    header = data[: r.off]
    (ct_len,) = struct.unpack(">I", r.take(4))
    ct = r.take(ct_len)
    if r.off != len(data):
        raise IntegrityError(f"sealed key {p} has trailing bytes: damaged or tampered with")
    if sealed_platform != platform.kind:
        raise WrongKeyError(
            f"sealed key {p} was sealed on platform {sealed_platform}, this is {platform.kind}; "
            "delete it to ask the key server again"
        )
    key = SealingKey.for_platform(platform, p, create=False)
    if key_id != key.key_id:
        raise WrongKeyError(
            f"sealed key {p} was sealed under another sealing key (another enclave build, "
            "machine or simulation key file); delete it to ask the key server again"
        )
    aead = Aead(hkdf(key.root, salt=salt, info="plinius/v1/seal/" + _PURPOSE))
    try:
        raw = aead.decrypt(nonce, ct, header)
    except IntegrityError as exc:
        raise IntegrityError(
            f"sealed key {p} failed authentication: it was tampered with or corrupted; "
            "delete it to ask the key server again"
        ) from exc
    if purpose != _PURPOSE or len(raw) != KEY_SIZE:
        raise FormatError(f"{p} does not hold a sealed master key")
    if label != job_id:
        raise ConfigError(
            f"sealed key {p} was released for job {label!r}, not {job_id!r}; "
            "use that job id or another --sealed-key path"
        )
    return MasterKey(raw)


class _Cursor:
    """Bounds-checked reads from a sealed file; a short file is damage, not a crash."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.off = data, path, 0

    def take(self, n: int) -> bytes:
        if self.off + n > len(self.data):
            raise IntegrityError(f"sealed key {self.path} is truncated: damaged or tampered with")
        out = self.data[self.off : self.off + n]
        self.off += n
        return out

    def text(self, width: int) -> str:
        (n,) = struct.unpack(">B" if width == 1 else ">H", self.take(width))
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"sealed key {self.path} is damaged or tampered with") from exc
