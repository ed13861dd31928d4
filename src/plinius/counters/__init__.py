"""Freshness counters: trusted monotonic counters that catch a rolled-back mirror file.

A host that keeps an old copy of a mirror file and puts it back defeats every
authentication tag: the old file is authentic. A counter kept where the host
cannot rewind it (a TPM NV counter, the data owner's key server) closes that
hole: each manifest records the counter value it expects, and the mirror
advances the counter to it after the commit.

Three counters implement the :class:`Counter` protocol, one module each:

* :class:`FileCounter` (here): a plain file; INSECURE, for simulation and tests;
* :class:`TPMCounter` (``plinius.counters.tpm``): a TPM 2.0 NV counter;
* :class:`KeyServerCounter` (``plinius.counters.keyserver``): the data owner's
  key server (its store is ``plinius.tee.counter_service``).

The last two are imported on first use (they need tpm2-pytss, or the key
server's protocol).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .._fsutil import write_atomic
from .._lazy import lazy_exports
from ..errors import FormatError

__all__ = ["Counter", "FileCounter", "KeyServerCounter", "TPMCounter"]

# A counter file holds at most 20 digits and a newline; anything longer is not one.
_MAX_FILE_BYTES = 64

_LAZY = {"KeyServerCounter": "keyserver", "TPMCounter": "tpm"}

if TYPE_CHECKING:  # pragma: no cover
    from .keyserver import KeyServerCounter
    from .tpm import TPMCounter


__getattr__ = lazy_exports(__name__, _LAZY)


@runtime_checkable
class Counter(Protocol):
    """A monotonic counter the host cannot rewind (unless ``trusted`` is False).

    ``wears`` is True for counters with limited write endurance (TPM NV
    indices); the mirror then advances them only every K commits or T seconds.
    ``trusted`` says whether the host can rewind it (False for the file counter).
    A counter may also set ``first_increment_may_jump = True`` (optional; a TPM
    NV index does) when its first increment can go from 0 to any value: the
    mirror then advances it once when it creates a mirror, to learn that base.
    A counter kept inside one machine (a TPM) sets ``machine_local = True``
    (optional): a mirror set across several machines refuses it, since the
    process that owns the set's counter may run on another machine after a restart.
    """

    wears: bool
    trusted: bool

    def read(self) -> int:
        """The current value.

        Returns:
            The value; 0 for a counter never advanced.

        Raises:
            PliniusError: the counter cannot be read or its answer is not trusted.
        """
        ...

    def increment(self) -> int:
        """Advance by one, durably.

        Returns:
            The new value.

        Raises:
            PliniusError: the counter cannot be advanced.
            RollbackError: the counter went back (trusted counters).
        """
        ...


class FileCounter:
    """A counter in a plain file. INSECURE: the host can rewrite it.

    For simulation and tests only; a real deployment uses a TPM NV counter or
    the key server. Updates are atomic (write a temp file, fsync, rename).

    Args:
        path: the counter file; created (mode 0644) by the first increment.
    """

    wears = False
    trusted = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> int:
        """The current value.

        Returns:
            The value; 0 if the file does not exist yet.

        Raises:
            FormatError: the file is unreadable, not a regular file (a FIFO,
                a directory: refused at once, never waited on) or holds no
                counter value.
        """
        try:
            # O_NONBLOCK: a FIFO in place of the counter file must not hang the
            # open (as MasterKey.load); then only a regular file is read.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise FormatError(
                f"counter file {self.path} is unreadable: {exc.strerror or exc}"
            ) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FormatError(
                    f"counter file {self.path} is not a regular file; give the path of a file"
                )
            raw = os.read(fd, _MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise FormatError(
                f"counter file {self.path} is unreadable: {exc.strerror or exc}"
            ) from exc
        finally:
            os.close(fd)
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise FormatError(f"counter file {self.path} does not hold a counter value") from exc
        # At most 20 digits (any 64-bit value): int() refuses very long digit strings.
        if not text.isdigit() or len(text) > 20:
            raise FormatError(f"counter file {self.path} does not hold a counter value")
        return int(text)

    def increment(self) -> int:
        """Advance by one, durably.

        Returns:
            The new value.

        Raises:
            FormatError: the file is unreadable or holds no counter value.
            StorageError: the new value cannot be written.
        """
        value = self.read() + 1
        write_atomic(self.path, f"{value}\n".encode("ascii"), what="counter file", mode=0o644)
        return value

    def __repr__(self) -> str:
        return f"FileCounter({str(self.path)!r})  # insecure: simulation only"
