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

__all__ = ["fsync_dir", "write_atomic"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the directory entries of ``directory`` (a rename, a new file) durable."""
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_atomic(path: Path, data: bytes, *, what: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole.

    ``what`` names the file in the :class:`~plinius.errors.StorageError` raised
    when the file system refuses (disk full, read-only, ...); the temporary
    file is removed then.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
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
