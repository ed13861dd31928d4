"""Durable file updates: write a temporary file, fsync, rename, fsync the directory.

A rename replaces a file atomically, but it is durable only once the directory
itself is synced: until then a power cut could bring the old file back (for a
counter, an older and lower value). Every small state file plinius rewrites
(counters, sealed keys) goes through :func:`write_atomic`; every secret file
it creates once and never replaces (the master key, the key server's identity,
the simulation sealing key) through :func:`create_secret_file`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import PliniusError, storage_error

__all__ = ["create_secret_file", "drop_cached", "fsync_dir", "temp_prefix", "write_atomic"]

# Room a temporary name needs beside the final name's prefix: "." + "." + 8
# random characters (mkstemp's, or token_hex(4)) + ".tmp".
_TEMP_EXTRA = 14


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the directory entries of ``directory`` (a rename, a new file) durable.

    Args:
        directory: the directory to sync.

    Raises:
        OSError: the directory cannot be opened or synced.
    """
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def drop_cached(path: str | os.PathLike[str]) -> None:
    """Drop the page cache of a file already synced (its bytes on disk stay as they are).

    A file about to be superseded: freeing its cached pages just before its
    successor is written lets the kernel reuse them at once, as a truncating
    rewrite would (measured: writing a new 300 MB file beside a cached old one
    took 2-4x as long on the development VM). Best effort: errors and systems
    without ``posix_fadvise`` are ignored.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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

    Args:
        path: the file to replace (or create).
        data: its new contents.
        what: names the file in error messages, e.g. ``"counter state"``.
        mode: the permissions of the new file.

    Raises:
        StorageError: the file system refuses (disk full, read-only, ...); the
            temporary file is removed then and ``path`` is unchanged.
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


def create_secret_file(
    path: Path,
    data: bytes,
    *,
    what: str,
    if_exists: Callable[[], PliniusError] | None = None,
) -> None:
    """Create ``path`` holding ``data`` with mode 0600; never overwrite a file.

    The file is created with ``O_EXCL`` (an existing file, or a link planted in
    its place, is never written through) and mode 0600 from the start, so the
    secret is never readable by others, not even briefly. The contents are
    fsynced before returning, then the directory, so the new name survives a
    power cut too (a lost key loses the data encrypted under it).

    Args:
        path: the new file.
        data: the secret.
        what: names the file in error messages, e.g. ``"key file"``.
        if_exists: builds the error raised when ``path`` exists (None: a
            :class:`~plinius.errors.StorageError` saying so).

    Raises:
        PliniusError: ``if_exists()`` when ``path`` exists; it is left untouched.
        StorageError: the file cannot be created or written; a file this call
            created is removed again.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        if if_exists is not None:
            raise if_exists() from exc
        raise storage_error(exc, f"cannot create {what} {path}") from exc
    except OSError as exc:
        raise storage_error(exc, f"cannot create {what} {path}") from exc
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen 0600, but be explicit
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)  # ours: O_EXCL created it
        raise storage_error(exc, f"cannot write {what} {path}") from exc
    os.close(fd)
    # Best effort: some file systems cannot sync a directory; the contents are durable.
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)
