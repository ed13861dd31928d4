"""Keys and authenticated encryption (AES-256-GCM) into caller-owned buffers.

This layer knows nothing about files except the master key file itself.

Key hierarchy: a 32-byte :class:`MasterKey` owned by the data owner; every
purpose key is derived from it with HKDF-SHA256, domain-separated by an
``info`` string (``"plinius/v1/" + purpose``) and salted with a per-object
random value (a region id, a dataset id, a per-save salt).

Nonce policy: AES-GCM nonces here are *counters* (tensor index, chunk index),
never random. That is safe only because every key used with counter nonces is
fresh: the mirror derives a new key for every save from a random 16-byte salt
kept in that save's manifest, and a sealed dataset derives one key per field
from a random dataset id. A (key, nonce) pair therefore never repeats, even if a
crash makes a generation number be written twice.
"""

from __future__ import annotations

import hmac
import operator
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._fsutil import create_secret_file
from .errors import IntegrityError, KeyFileError

__all__ = [
    "KEY_SIZE",
    "MAX_AEAD_BYTES",
    "NONCE_SIZE",
    "TAG_SIZE",
    "Aead",
    "MasterKey",
    "aad",
    "counter_nonce",
    "hkdf",
]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
FINGERPRINT_SIZE = 16
# cryptography caps one AES-GCM call at 2**31 - 1 bytes; callers chunk above this.
MAX_AEAD_BYTES = (1 << 31) - 1

Buffer = bytes | bytearray | memoryview
AadField = bytes | str | int | bool | None | tuple[int, ...] | list[int]


def hkdf(ikm: bytes, *, salt: bytes | None, info: str | bytes, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``ikm`` with ``salt`` and a purpose ``info``.

    Args:
        ikm: the input key material.
        salt: None or empty means HashLen zero bytes, as the RFC says.
        info: the purpose; a ``str`` is UTF-8 encoded, ``bytes`` are used as they are.
        length: the number of bytes to derive.

    Returns:
        ``length`` bytes.
    """
    info_bytes = info.encode("utf-8") if isinstance(info, str) else bytes(info)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info_bytes).derive(ikm)


class MasterKey:
    """The data owner's 32-byte master key.

    The key bytes never appear in a ``repr``, a log line or an exception
    message. Store it with :meth:`save` (mode 0600, never overwrites) and read it
    back with :meth:`load`::

        key = MasterKey.generate()
        key.save("owner.key")
        key = MasterKey.load("owner.key")

    Args:
        key: exactly 32 bytes.

    Raises:
        KeyFileError: ``key`` is not 32 bytes.
    """

    __slots__ = ("_fingerprint", "_key")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
            raise KeyFileError(f"a master key is exactly {KEY_SIZE} bytes")
        self._key = bytes(key)
        self._fingerprint = hkdf(
            self._key, salt=None, info="plinius/v1/fingerprint", length=FINGERPRINT_SIZE
        )

    @classmethod
    def generate(cls) -> MasterKey:
        """A new random key from the operating system's CSPRNG.

        Returns:
            The key.
        """
        return cls(os.urandom(KEY_SIZE))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MasterKey:
        """Read a key file written by :meth:`save` (or ``plinius keygen``).

        Args:
            path: the key file.

        Returns:
            The key.

        Raises:
            KeyFileError: the file is missing, unreadable, not a regular file,
                not 32 bytes, or readable or writable by the group or others
                (a key that others can read is no secret).
        """
        p = Path(path)
        try:
            # O_NONBLOCK: a FIFO in place of the key file must not hang the open.
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise KeyFileError(
                f"key file {p} does not exist; create one with 'plinius keygen {p}'"
            ) from exc
        except OSError as exc:
            raise KeyFileError(f"cannot open key file {p}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {p} is not a regular file")
            if st.st_mode & 0o077:
                raise KeyFileError(
                    f"key file {p} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run 'chmod 600 {p}'"
                )
            data = os.read(fd, KEY_SIZE + 1)
        finally:
            os.close(fd)
        if len(data) != KEY_SIZE:
            # Only KEY_SIZE + 1 bytes were read: report the real size of a longer file.
            n = len(data) if len(data) <= KEY_SIZE else max(st.st_size, len(data))
            raise KeyFileError(
                f"key file {p} holds {n} bytes, not {KEY_SIZE}; it is not a plinius master key"
            )
        return cls(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key to a new file with mode 0600; never overwrites a file.

        Args:
            path: the new key file; its contents and name are fsynced.

        Raises:
            KeyFileError: ``path`` exists.
            StorageError: the file cannot be created or written.
        """
        p = Path(path)
        create_secret_file(
            p,
            self._key,
            what="key file",
            if_exists=lambda: KeyFileError(
                f"{p} already exists; refusing to overwrite a key file "
                "(choose another path, or remove the old key if it is truly unused)"
            ),
        )

    @property
    def fingerprint(self) -> bytes:
        """A 16-byte value derived with HKDF; identifies the key, safe to store."""
        return self._fingerprint

    def derive(self, purpose: str, salt: bytes, length: int = KEY_SIZE) -> bytes:
        """A purpose key: HKDF(master, salt, info="plinius/v1/" + purpose).

        Args:
            purpose: what the key is for; ``"fingerprint"`` is reserved.
            salt: separates keys of one purpose (a file id, a job id).
            length: the number of bytes.

        Returns:
            ``length`` bytes.

        Raises:
            ValueError: ``purpose`` is ``"fingerprint"``.
        """
        if purpose == "fingerprint":
            raise ValueError("'fingerprint' is reserved")
        return hkdf(self._key, salt=salt, info="plinius/v1/" + purpose, length=length)

    def aead(self, purpose: str, salt: bytes) -> Aead:
        """An :class:`Aead` under the purpose key for ``purpose`` and ``salt``.

        Args:
            purpose: see :meth:`derive`.
            salt: see :meth:`derive`.

        Returns:
            The cipher.
        """
        return Aead(self.derive(purpose, salt))

    def raw_bytes(self) -> bytes:
        """The key bytes themselves, for key wrapping and sealing only."""
        return self._key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"MasterKey(fingerprint={self._fingerprint.hex()})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:  # never let the key be pickled by accident
        raise TypeError("MasterKey cannot be pickled")


def counter_nonce(counter: int, domain: int = 0) -> bytes:
    """A 12-byte nonce: 4-byte ``domain`` then 8-byte ``counter``, big-endian.

    Only for keys that are fresh per object (see the module docstring).

    Args:
        counter: 0 to 2**64 - 1.
        domain: 0 to 2**32 - 1.

    Returns:
        The 12-byte nonce.

    Raises:
        ValueError: either is out of range.
    """
    if not (0 <= counter < 1 << 64 and 0 <= domain < 1 << 32):
        raise ValueError("nonce counter or domain out of range")
    return struct.pack(">IQ", domain, counter)


def aad(*fields: AadField) -> bytes:
    """Unambiguous associated data from typed fields.

    Each field is a type tag, an 8-byte length and its bytes, so
    ``aad("ab", "c") != aad("a", "bc")`` and ``aad(1) != aad("1") != aad(b"1")``.
    Integers (also NumPy integer scalars) must fit in 128 signed bits; tuple
    and list elements (shapes) must be integers in 64 signed bits, so a float
    or a string in a shape is refused, never silently truncated.

    Args:
        *fields: None, bool, int, str, bytes-like, or a tuple or list of ints.

    Returns:
        The encoding.

    Raises:
        TypeError: a field of another type, or a non-integer in a shape.
        OverflowError: an integer too large for its encoding.
    """
    out = bytearray()
    for f in fields:
        if f is None:
            tag, body = b"n", b""
        elif isinstance(f, bool):
            tag, body = b"b", b"\x01" if f else b"\x00"
        elif isinstance(f, int):
            tag, body = b"i", f.to_bytes(16, "big", signed=True)
        elif isinstance(f, str):
            tag, body = b"s", f.encode("utf-8")
        elif isinstance(f, bytes | bytearray | memoryview):
            tag, body = b"y", bytes(f)
        elif isinstance(f, tuple | list):
            # operator.index, not int(): int(1.5) == int("1") == 1 would make
            # (1.5,), ("1",) and (1,) encode alike.
            tag, body = b"t", b"".join(_index(x).to_bytes(8, "big", signed=True) for x in f)
        elif hasattr(f, "__index__"):
            tag, body = b"i", _index(f).to_bytes(16, "big", signed=True)  # e.g. numpy.int64
        else:
            raise TypeError(f"unsupported AAD field type {type(f).__name__}")
        out += tag + struct.pack(">Q", len(body)) + body
    return bytes(out)


def _index(x: object) -> int:
    try:
        return operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"AAD integers and shapes take integers, not {type(x).__name__}") from None


class Aead:
    """AES-256-GCM under one key, encrypting into caller-owned buffers.

    ``encrypt_into`` writes ``len(src) + 16`` bytes (ciphertext, then the tag)
    into ``dst``; ``decrypt_into`` reads them back into ``dst`` of ``len(src) - 16``
    bytes. Neither allocates per call; the GIL is released while they run.
    Authentication failure raises :class:`IntegrityError`. Note that
    ``decrypt_into`` has written unauthenticated plaintext into ``dst`` by the
    time it fails: callers must not use ``dst`` after an error.

    Args:
        key: 32 bytes.

    Raises:
        ValueError: ``key`` is not 32 bytes.
    """

    __slots__ = ("_aes",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._aes = AESGCM(key)

    def encrypt_into(self, nonce: bytes, src: Buffer, aad: bytes, dst: Buffer) -> None:
        """Encrypt ``src`` into ``dst`` (``len(src) + 16`` bytes: ciphertext and tag)."""
        self._aes.encrypt_into(nonce, src, aad, dst)

    def decrypt_into(self, nonce: bytes, src: Buffer, aad: bytes, dst: Buffer) -> None:
        """Authenticate and decrypt ``src`` (ciphertext and tag) into ``dst``.

        Raises:
            IntegrityError: authentication failed; ``dst`` holds garbage then.
        """
        try:
            self._aes.decrypt_into(nonce, src, aad, dst)
        except InvalidTag as exc:
            raise IntegrityError("authentication failed") from exc

    def encrypt(self, nonce: bytes, data: Buffer, aad: bytes) -> bytes:
        """Encrypt a small buffer; returns ciphertext and tag."""
        return self._aes.encrypt(nonce, data, aad)

    def decrypt(self, nonce: bytes, data: Buffer, aad: bytes) -> bytes:
        """Authenticate and decrypt a small buffer (ciphertext and tag).

        Returns:
            The plaintext.

        Raises:
            IntegrityError: authentication failed.
        """
        try:
            return self._aes.decrypt(nonce, data, aad)
        except InvalidTag as exc:
            raise IntegrityError("authentication failed") from exc

    def __repr__(self) -> str:
        return "Aead(<key hidden>)"


def iter_chunks(total: int, chunk: int) -> Iterable[tuple[int, int]]:
    """``(offset, length)`` pairs covering ``total`` bytes in pieces of ``chunk``."""
    off = 0
    while off < total:
        n = min(chunk, total - off)
        yield off, n
        off += n
