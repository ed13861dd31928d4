"""The durable tier: a copy of the committed mirror on disk, to survive a reboot.

/dev/shm (and a DRAM-backed emulated PM) does not survive a reboot or a power
cut. :class:`DurableCopy` keeps a second copy of the mirror file in a
directory on disk, every N steps or T seconds; :func:`restore_durable` puts
it back where the PM mirror was when that is gone.

Design (docs/ARCHITECTURE.md, "The durable tier"):

* **A copy is one committed generation.** The mirror keeps saving while a
  copy is written, and each save overwrites the *other* slot of every pair, the
  save after it these ones: reading the live file in the background would mix
  generations. So the copy is taken in the training thread right after a
  commit (no save in flight: :meth:`Mirror.copy_committed` joins it), as a
  memcpy of the committed file bytes ``[0, end of the extents in use)`` into
  a reusable buffer; only writing that buffer to disk runs in the background.
* **Never on the training path, never unbounded.** One writer thread, one
  buffer: when the previous copy is still being written the new one is
  skipped (and due again at the next commit), never queued.
* **Atomic.** The buffer goes to a temporary file in the directory, is
  extended to the mirror's file size (zeros: free space), fsynced, renamed over
  ``DIR/NAME`` and the directory fsynced. A crash or a kill at any point leaves
  the previous copy or the new one, whole (a temporary file may be left).
* **Still encrypted, a valid mirror.** The bytes are the mirror's own (same
  key, same region id), so ``plinius inspect`` reads the copy and a restore
  authenticates it like any mirror.
* **Losing the copy never stops training.** A failure (full disk, directory
  gone or read-only) is reported once through ``on_error`` and the next copy
  is tried as planned; the PM mirror is untouched by it.
* **Restore.** Only when the PM mirror is missing: a PM mirror that exists is
  newer than any copy made from it and always wins. The copy is checked (key,
  authentication, freshness counter) before it is copied into place, atomically.
* **Freshness counter.** With a counter, a copy older than the last counter
  advance *is* a rollback and is refused (:class:`~plinius.errors.RollbackError`,
  saying so); there is no override. A copy is accepted when no counter advance
  happened after the generation it holds (``counter_every``/``counter_interval_s``
  longer than the copy period, and the reboot before the next advance).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._fsutil import fsync_dir, temp_prefix
from ..counters import Counter
from ..crypto import MasterKey
from ..errors import ConfigError, PliniusError, RollbackError, StorageError, storage_error

if TYPE_CHECKING:
    from . import CommittedCopy, Mirror, MirrorInfo

__all__ = ["DurableCopy", "restore_durable"]

_STALE = re.compile(r"[0-9a-f]{8}\.tmp")  # what _write_file adds to temp_prefix()


def _write_file(path: Path, data: memoryview, size: int) -> None:
    """Write ``data`` then zeros up to ``size`` bytes to ``path`` atomically (temp, fsync, rename).

    Raises:
        OSError: the file system refused; the temporary file is removed.
    """
    tmp = path.with_name(f"{temp_prefix(path)}{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = data
            while view:
                view = view[os.write(fd, view) :]
            # The free tail past the extents in use: a hole, read as zeros.
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Rename only once the contents are durable, then make the rename durable.
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


class DurableCopy:
    """Keeps a durable copy of a mirror's committed generation in a directory on disk.

    ::

        with Mirror("/dev/shm/job.plm", key) as mirror, \\
                DurableCopy("/var/lib/plinius", "job.plm", every=100) as durable:
            fit(..., mirror=mirror, durable=durable)

    :func:`~plinius.train.fit` calls :meth:`after_commit` after each commit; a
    copy is taken when ``every`` steps (or ``interval_s`` seconds) passed since
    the last one, and at the job's last step. Call :meth:`close` (or use
    ``with``) to wait for the copy being written.

    Args:
        directory: an existing, writable directory on durable storage.
        name: the copy's file name in it (the CLI uses the mirror's).
        every: copy after this many steps since the last copy (None: not by steps).
        interval_s: copy when this many seconds passed since the last copy
            (None: not by time).
        on_error: called once, from the writer thread, with the first failure
            (later ones are counted in :attr:`failures` only); None: ignored.

    Raises:
        ConfigError: ``directory`` is missing, not a directory or not writable,
            ``name`` is not a plain file name, or neither ``every`` nor
            ``interval_s`` is given (or one is not positive).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        name: str,
        *,
        every: int | None = None,
        interval_s: float | None = None,
        on_error: Callable[[PliniusError], None] | None = None,
    ) -> None:
        d = Path(directory)
        if every is not None and (type(every) is not int or every < 1):
            raise ConfigError("the durable copy's every must be a positive number of steps")
        if interval_s is not None and not (interval_s > 0):
            raise ConfigError("the durable copy's interval_s must be a positive number of seconds")
        if every is None and interval_s is None:
            raise ConfigError("give the durable copy a period: every N steps or interval_s seconds")
        if not name or name in (".", "..") or os.sep in name:
            raise ConfigError(f"the durable copy's name must be a file name, not {name!r}")
        if not d.is_dir():
            what = "is not a directory" if d.exists() else "does not exist"
            raise ConfigError(f"the durable directory {d} {what}; create it first")
        if not os.access(d, os.W_OK | os.X_OK):
            raise ConfigError(f"the durable directory {d} is not writable; give a writable one")
        self.path = d / name
        # A copy killed mid-write leaves its temporary file (never the copy
        # itself half-written): remove those of this copy's name.
        prefix = temp_prefix(self.path)
        for stale in d.glob(f"{glob.escape(prefix)}*.tmp"):
            if _STALE.fullmatch(stale.name[len(prefix) :]):
                with contextlib.suppress(OSError):
                    stale.unlink()
        self.every = every
        self.interval_s = interval_s
        self.copies = 0  # written to disk
        self.skipped = 0  # due while the previous copy was still being written
        self.failures = 0
        self._on_error = on_error
        self._reported = False
        self._buf: np.ndarray[Any, Any] | None = None
        self._last_step: int | None = None
        self._last_t = time.monotonic()
        self._writer: ThreadPoolExecutor | None = None
        self._writing: Future[None] | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start_at(self, step: int | None) -> None:
        """Count the period from ``step`` (the step a job resumed after)."""
        self._last_step = step
        self._last_t = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether a copy is due after the commit of ``step``."""
        if self.every is not None and step - (self._last_step or 0) >= self.every:
            return True
        return self.interval_s is not None and time.monotonic() - self._last_t >= self.interval_s

    def after_commit(self, mirror: Mirror, step: int, *, force: bool = False) -> bool:
        """Take a copy of ``mirror``'s committed generation if one is due (or ``force``).

        Call right after a commit, in the thread that saves: the memcpy runs
        here, the write to disk in the background.

        Args:
            mirror: the mirror just committed.
            step: the step it committed.
            force: copy even if not due, after waiting for the previous one
                (the job's last step).

        Returns:
            Whether a copy was started (False: not due, or the previous one
            is still being written).
        """
        if self._closed or not (force or self.due(step)):
            return False
        if self._writing is not None and not self._writing.done():
            if not force:
                self.skipped += 1
                return False
            self.wait()  # the last step's copy is never skipped
        copy = mirror.copy_committed(self._buf)
        self._buf = copy.buffer
        self._last_step = step
        self._last_t = time.monotonic()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="plinius-durable")
        self._writing = self._writer.submit(self._write, copy)
        return True

    def wait(self) -> None:
        """Wait for the copy being written, if any (its failure is reported, never raised)."""
        w = self._writing
        if w is not None:
            w.result()

    def close(self) -> None:
        """Wait for the copy being written, then stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def __enter__(self) -> DurableCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DurableCopy({str(self.path)!r}, every={self.every}, interval_s={self.interval_s})"

    def _write(self, copy: CommittedCopy) -> None:
        try:
            data = copy.buffer.data.cast("B")[: copy.nbytes]
            try:
                _write_file(self.path, data, copy.file_size)
            except OSError as exc:
                raise storage_error(
                    exc,
                    f"cannot write the durable copy {self.path} (step {copy.step}); training "
                    "goes on and the mirror in persistent memory is intact",
                ) from exc
        except PliniusError as exc:
            with self._lock:
                self.failures += 1
                first = not self._reported
                self._reported = True
            if first and self._on_error is not None:
                self._on_error(exc)
            return
        with self._lock:
            self.copies += 1


def restore_durable(
    copy_path: str | os.PathLike[str],
    mirror_path: str | os.PathLike[str],
    key: MasterKey,
    *,
    counter: Counter | None = None,
) -> MirrorInfo:
    """Put a durable copy back where the PM mirror was (after a reboot lost it).

    The copy is opened read-only and checked first (key, manifest, the
    freshness counter when given), then copied to a temporary file beside
    ``mirror_path``, fsynced and linked into place: a crash leaves no mirror or
    the whole copy. Nothing is done if ``mirror_path`` exists (the PM mirror is
    newer than any copy made from it).

    Args:
        copy_path: the durable copy.
        mirror_path: where the PM mirror belongs (must not exist).
        key: the master key.
        counter: the job's freshness counter, or None.

    Returns:
        What the copy holds (its step and save time): the steps after it are lost.

    Raises:
        StorageError: ``mirror_path`` exists (or appeared meanwhile), or a
            file cannot be read or written.
        RollbackError: with a counter, the copy is older than the counter
            allows: committed generations after it were lost with the PM mirror.
        PliniusError: the copy is not an authentic mirror under ``key``.
    """
    from . import Mirror

    src, dst = Path(copy_path), Path(mirror_path)
    if dst.exists():
        raise StorageError(f"{dst} exists; the mirror in persistent memory wins over {src}")
    try:
        with Mirror(src, key, readonly=True, counter=counter) as m:
            info = m.info()
    except RollbackError as exc:
        raise RollbackError(
            f"the durable copy {src} is older than the freshness counter allows: generations "
            "committed after it were lost with the mirror in persistent memory, and with a "
            "counter an older copy is refused as a rollback. Recover the PM mirror if it still "
            "exists; otherwise the job cannot resume under this counter: start it anew with a "
            "new mirror and a new counter (docs/ARCHITECTURE.md, The durable tier)"
        ) from exc
    d = dst.parent
    if not d.is_dir():
        raise StorageError(f"cannot restore {dst}: directory {d} does not exist; create it first")
    tmp = dst.with_name(f"{temp_prefix(dst)}{os.urandom(4).hex()}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            os.fchmod(fout.fileno(), 0o600)
            while chunk := fin.read(16 << 20):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        try:
            os.link(tmp, dst)  # never over a mirror that appeared meanwhile
        except FileExistsError:
            raise StorageError(
                f"{dst} appeared while the durable copy was restored; it wins: rerun"
            ) from None
        fsync_dir(d)
    except OSError as exc:
        raise storage_error(exc, f"cannot restore {dst} from {src}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return info
