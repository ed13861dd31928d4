"""The exception tree of plinius.

Every error plinius raises on purpose is a :class:`PliniusError`; the CLI turns
each into one line and a non-zero exit code. Low-level errors (``OSError``,
cryptography's ``InvalidTag``, ``struct.error``) are translated where they cross
into plinius, with ``raise ... from exc``::

    PliniusError
    ├── IntegrityError        authentication failed: tampered, corrupted, truncated
    ├── WrongKeyError         written under another master key (key fingerprint)
    ├── FormatError           not a plinius file, unsupported version, bad layout
    ├── StateMismatchError    saved state does not fit the target objects
    ├── RollbackError         older than the trusted freshness counter allows
    ├── KeyFileError          a key file that is missing, malformed or too open
    ├── StorageError          the file system refused (missing dir, disk full, ...)
    ├── ConfigError           bad arguments, model configs, policies, CLI input
    │   └── DarknetConfigError  a Darknet .cfg that cannot be built (names the line)
    ├── DatasetIndexError     also an IndexError, as the sequence protocol expects
    └── AttestationError      evidence missing, refused by policy, or unverifiable
        └── KeyReleaseError   the key server refused or answered something invalid
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "ConfigError",
    "DarknetConfigError",
    "DatasetIndexError",
    "FormatError",
    "IntegrityError",
    "KeyFileError",
    "KeyReleaseError",
    "PliniusError",
    "RollbackError",
    "StateMismatchError",
    "StorageError",
    "WrongKeyError",
]


class PliniusError(Exception):
    """Root of every error plinius raises on purpose."""


class IntegrityError(PliniusError):
    """Authentication failed: the data was tampered with, corrupted or truncated."""


class WrongKeyError(PliniusError):
    """The file was written under another master key (checked by key fingerprint)."""


class FormatError(PliniusError):
    """Not a plinius file, an unsupported format version, or an inconsistent layout."""


class StateMismatchError(PliniusError):
    """The saved state does not fit the objects it is being restored into."""


class RollbackError(PliniusError):
    """The state is older than the trusted monotonic counter allows."""


class KeyFileError(PliniusError):
    """A key file is missing, has the wrong size, or is readable by others."""


class StorageError(PliniusError):
    """The file system refused an operation (missing directory, disk full, ...)."""


class ConfigError(PliniusError):
    """Invalid arguments, configuration, policy or model description."""


class DarknetConfigError(ConfigError):
    """A Darknet ``.cfg`` file that cannot be parsed or built; names the line."""


class DatasetIndexError(PliniusError, IndexError):
    """An index out of range for a dataset (also an ``IndexError``)."""


class AttestationError(PliniusError):
    """Evidence is missing, does not match the policy, or cannot be verified."""


class KeyReleaseError(AttestationError):
    """The key server refused the request or sent an invalid response."""


def storage_error(exc: OSError, what: str) -> StorageError:
    """Translate an ``OSError`` raised while doing ``what`` into a :class:`StorageError`."""
    import errno

    hint = {
        errno.ENOENT: "check that the path and its directory exist",
        errno.ENOSPC: "free some space or choose another directory",
        errno.EDQUOT: "free some space or choose another directory",
        errno.EACCES: "check the file permissions",
        errno.EPERM: "check the file permissions",
        errno.EROFS: "the file system is read-only; choose another directory",
        errno.EEXIST: "choose another path or remove the existing file",
        errno.EISDIR: "give a file path, not a directory",
    }.get(exc.errno or 0, "check the path and the file system")
    reason = exc.strerror or str(exc)
    return StorageError(f"{what}: {reason}; {hint}")
