"""Durable file updates: write a temporary file, fsync, rename, fsync the directory.

A rename replaces a file atomically, but it is durable only once the directory
itself is synced: until then a power cut could bring the old file back (for a
counter, an older and lower value). Every small state file plinius rewrites
(counters, sealed keys) goes through :func:`write_atomic`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from .errors import storage_error

__all__ = ["fsync_dir", "temp_prefix", "write_atomic"]

# Room a temporary name needs beside the final name's prefix: "." + "." + 8
# random characters (mkstemp's, or token_hex(4)) + ".tmp".
_TEMP_EXTRA = 14


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the directory entries of ``directory`` (a rename, a new file) durable."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def temp_prefix(path: Path) -> str:
    """The hidden prefix of a temporary file for ``path``, in ``path``'s directory.

    ``"." + name + "."``, with the name cut (at a byte, as the file system
    counts) so that prefix, 8 random characters and ``".tmp"`` stay within the
    directory's NAME_MAX: a legal 250-character final name must not fail
    because its temporary name is too long.

    Args:
        path: the final file.

    Returns:
        The prefix; add 8 random characters and ``".tmp"``.
    """
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    raw = os.fsencode(path.name)[: max(1, name_max - _TEMP_EXTRA)]
    return f".{os.fsdecode(raw)}."


def write_atomic(path: Path, data: bytes, *, what: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole.

    ``what`` names the file in the :class:`~plinius.errors.StorageError` raised
    when the file system refuses (disk full, read-only, ...); the temporary
    file is removed then.
    """
    tmp = path.with_name(f"{temp_prefix(path)}{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # Rename only once the contents are durable, then make the rename durable.
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise storage_error(exc, f"cannot write {what} {path}") from exc
