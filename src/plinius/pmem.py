"""Persistent-memory regions: a memory-mapped file with ``persist(offset, length)``.

Where a region lives decides what "persistent" means (see ``describe_path``):

* a DAX mount (ext4/xfs ``-o dax`` on real persistent memory) mapped with
  ``MAP_SYNC``, with libpmem (Debian ``libpmem1``) installed: stores are flushed
  from user space with ``pmem_persist`` and survive a power cut (``is_pmem``);
* ``/dev/shm`` (tmpfs): *emulated* PM. It lives in RAM: it survives the crash of
  the process, not a power cut. ``persist`` is an ``msync``, nearly free;
* any other file system: through the page cache, ``persist`` is an ``msync``
  that writes the pages back; durable, but at the speed of the disk.

Pages are pre-faulted when a region is created or opened (``MAP_POPULATE``),
because first-touch page faults cost more than AES-GCM on the same bytes. A
caller that knows which part of a file is in use opens it with
``populate=False`` and pre-faults that part with :meth:`Region.populate`: a
file may be far longer than what it holds (a sparse hole appended by
``truncate -s 1G`` costs nothing until touched; pre-faulted on tmpfs, it is
1 GiB of RAM).

This layer knows nothing about crypto or file formats.
:class:`plinius.testing.CrashSimRegion` has the same interface and produces
crash images for testing commit protocols.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

from ._fsutil import fsync_dir, temp_prefix
from .errors import StorageError, storage_error

__all__ = [
    "CACHE_LINE",
    "Mount",
    "Region",
    "RegionLike",
    "dax_option",
    "describe_path",
    "mount_of",
]

CACHE_LINE = 64
PAGE = mmap.PAGESIZE
# Linux mmap flags that Python's mmap module does not name on every version.
_MAP_SHARED_VALIDATE = 0x03
_MAP_SYNC = 0x80000
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
# madvise(MADV_POPULATE_READ) (Linux 5.14): pre-fault a range as MAP_POPULATE
# does a whole shared mapping (read faults: nothing is dirtied).
_MADV_POPULATE_READ = 22


class RegionLike(Protocol):
    """What the layers above need from a region (a :class:`Region` or a simulator)."""

    @property
    def size(self) -> int: ...
    @property
    def buf(self) -> memoryview: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def is_pmem(self) -> bool: ...
    def persist(self, offset: int, length: int) -> None: ...
    def grow(self, new_size: int) -> None: ...
    def close(self) -> None: ...


_libpmem: ctypes.CDLL | bool | None = False  # False: not looked up yet


def _load_libpmem() -> ctypes.CDLL | None:
    global _libpmem
    if _libpmem is False:
        name = ctypes.util.find_library("pmem")
        lib = None
        if name:
            try:
                lib = ctypes.CDLL(name)
                lib.pmem_persist.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                lib.pmem_persist.restype = None
            except (OSError, AttributeError):
                lib = None
        _libpmem = lib
    return _libpmem if isinstance(_libpmem, ctypes.CDLL) else None


class Mount(NamedTuple):
    """One line of ``/proc/mounts``: where a file system is mounted, and how."""

    point: str
    """The mount point (``\\040`` in ``/proc/mounts`` decoded to a space)."""
    fstype: str
    """The file system type, e.g. ``"ext4"`` or ``"tmpfs"``."""
    options: str
    """The mount options, comma-separated, e.g. ``"rw,relatime,dax=always"``."""
    device: str
    """The mounted device, e.g. ``"/dev/pmem0"`` (``"tmpfs"`` and the like for virtual ones)."""


def mount_of(path: str | os.PathLike[str]) -> Mount:
    """The mount that holds ``path`` (symbolic links resolved), from ``/proc/mounts``.

    The one parser of ``/proc/mounts`` in plinius: the longest mount point that
    contains the path wins, the last one mounted on a tie.

    Args:
        path: a file or directory; it need not exist.

    Returns:
        The mount; ``Mount("/", "unknown", "", "")`` if ``/proc/mounts`` cannot
        be read (not Linux) or names no mount for ``path``.
    """
    target = os.path.realpath(path)
    best = Mount("/", "unknown", "", "")
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best.point
                ):
                    best = Mount(mnt, parts[2], parts[3], parts[0])
    except OSError:
        pass
    return best


def dax_option(opts: str) -> str | None:
    """Whether mount options enable DAX, and how.

    Older kernels show a bare ``dax``; newer ext4 and xfs show ``dax=always``,
    ``dax=inode`` (per-file attribute) or ``dax=never``.

    Args:
        opts: the options of a mount (:attr:`Mount.options`).

    Returns:
        ``"always"`` or ``"inode"`` if DAX is on, else None.
    """
    for opt in opts.split(","):
        if opt == "dax":
            return "always"
        if opt.startswith("dax=") and opt[4:] in ("always", "inode"):
            return opt[4:]
    return None


def describe_path(path: str | os.PathLike[str]) -> str:
    """How persistent a region at ``path`` is, in words (for reports and ``inspect``).

    Args:
        path: a file or directory; its mount (from ``/proc/mounts``) decides.

    Returns:
        One line, e.g. ``"tmpfs /dev/shm: emulated persistent memory in RAM
        (survives a process crash, not a power cut)"``.
    """
    p = Path(path)
    probe = p if p.is_dir() else p.parent
    mnt, fstype, opts, _ = mount_of(probe)
    dax = dax_option(opts)
    if dax is not None:
        lib = "with libpmem" if _load_libpmem() else "without libpmem (msync)"
        scope = " for files with the DAX attribute" if dax == "inode" else ""
        return f"DAX mount {mnt} ({fstype}): real persistent memory{scope}, {lib}"
    if fstype == "tmpfs":
        return (
            f"tmpfs {mnt}: emulated persistent memory in RAM "
            "(survives a process crash, not a power cut)"
        )
    return f"{fstype} {mnt}: page cache, persisted with msync (durable at disk speed)"


class Region:
    """A memory-mapped file with explicit persistence.

    Use :meth:`create` or :meth:`open`; ``buf`` is a memoryview of the whole
    mapping (read-only for a read-only region). ``grow`` remaps: views taken
    from ``buf`` before it still refer to the old mapping and must be dropped.

    Example::

        with Region.create("/dev/shm/r", 1 << 20) as r:
            r.buf[:5] = b"hello"
            r.persist(0, 5)  # durable as the medium allows (describe_path)
    """

    def __init__(
        self, path: Path, fd: int, size: int, readonly: bool, populate: bool = True
    ) -> None:
        self._path = path
        self._fd = fd
        self._readonly = readonly
        self._mm: mmap.mmap | None = None
        self._buf: memoryview | None = None
        self._old: list[mmap.mmap] = []
        self._is_pmem = False
        self._base = 0
        self._populated = 0  # [0, _populated) is pre-faulted
        self._map(size, populate)

    # -- construction -------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        size: int,
        init: Callable[[Region], None] | None = None,
        *,
        overwrite: bool = False,
    ) -> Region:
        """Create a region of ``size`` bytes at ``path``, atomically.

        The file is built under a temporary name in the same directory, ``init``
        fills it, everything is persisted, and only then does it appear under
        ``path``: a crash while creating never leaves a half-made file there.

        Args:
            path: the file to create (mode 0600).
            size: bytes, allocated now (a full disk fails here, not on a later store).
            init: fills the new region before it gets its name.
            overwrite: replace an existing ``path`` (refused otherwise).

        Returns:
            The open, writable region.

        Raises:
            StorageError: ``path`` exists, its directory is missing, or the
                file system refused (disk full, permissions); nothing is left behind.
        """
        if size <= 0:
            raise ValueError("a region needs a positive size")
        p = Path(path)
        d = p.parent
        if not d.is_dir():
            raise StorageError(f"cannot create {p}: directory {d} does not exist; create it first")
        if p.exists() and not overwrite:
            raise StorageError(f"cannot create {p}: it already exists")
        try:
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(p), suffix=".tmp", dir=d)
        except OSError as exc:
            raise storage_error(exc, f"cannot create a file in {d}") from exc
        tmp_path = Path(tmp)
        region: Region | None = None
        try:
            try:
                os.fchmod(fd, 0o600)
                _allocate(fd, size)
            except OSError as exc:
                raise storage_error(exc, f"cannot allocate {size} bytes for {p}") from exc
            region = cls(p, fd, size, readonly=False)
            if init is not None:
                init(region)
            region.persist(0, size)
            try:
                os.fsync(fd)
                if overwrite:
                    os.replace(tmp_path, p)
                else:
                    _link_exclusive(tmp_path, p)
                fsync_dir(d)
            except OSError as exc:
                raise storage_error(exc, f"cannot create {p}") from exc
        except BaseException:
            # Remove the temporary file whatever closing does: a failed create
            # must leave nothing behind in the directory.
            try:
                if region is not None:
                    region.close()
                else:
                    os.close(fd)
            finally:
                tmp_path.unlink(missing_ok=True)
            raise
        return region

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, readonly: bool = False, populate: bool = True
    ) -> Region:
        """Map an existing file.

        Args:
            path: a regular, non-empty file (a FIFO or device is refused, never opened blocking).
            readonly: map it without write access (``persist`` then raises).
            populate: pre-fault the whole file now. False: nothing is pre-faulted
                (pages fault in when first touched) until :meth:`populate` says
                what is in use; for a file whose size its contents do not vouch for.

        Returns:
            The open region.

        Raises:
            StorageError: missing, not a regular file, empty, or not accessible.
        """
        p = Path(path)
        # O_NONBLOCK: opening a FIFO read-only would otherwise block forever;
        # it has no effect on the regular files that pass the check below.
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NONBLOCK
        try:
            fd = os.open(p, flags)
        except OSError as exc:
            raise storage_error(exc, f"cannot open {p}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"cannot open {p}: not a regular file; give the path of a file")
            size = st.st_size
            if size == 0:
                raise StorageError(f"{p} is empty; it cannot be mapped")
            return cls(p, fd, size, readonly, populate)
        except BaseException:
            os.close(fd)
            raise

    # -- mapping ------------------------------------------------------
    def _map(self, size: int, populate: bool) -> None:
        """Map ``size`` bytes; pre-fault all of them if ``populate``."""
        prot = mmap.PROT_READ | (0 if self._readonly else mmap.PROT_WRITE)
        pop = _MAP_POPULATE if populate else 0
        mm = None
        is_pmem = False
        lib = _load_libpmem()
        if not self._readonly and lib is not None:
            # MAP_SYNC is accepted only on a DAX file: then stores reach PM once
            # flushed from the CPU caches, and pmem_persist is enough.
            try:
                mm = mmap.mmap(
                    self._fd, size, flags=_MAP_SHARED_VALIDATE | _MAP_SYNC | pop, prot=prot
                )
                is_pmem = True
            except OSError:
                mm = None
        if mm is None:
            try:
                mm = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED | pop, prot=prot)
            except OSError as exc:
                raise storage_error(exc, f"cannot map {self._path}") from exc
        self._mm = mm
        self._buf = memoryview(mm)
        self._is_pmem = is_pmem
        self._populated = size if populate else 0
        if is_pmem:
            self._base = ctypes.addressof(ctypes.c_char.from_buffer(mm))

    def populate(self, end: int) -> None:
        """Pre-fault ``[0, end)`` (what is not yet), so that first touches cost no page faults.

        For a region opened with ``populate=False``: the caller names the part
        of the file in use; the rest faults in when first touched, if ever.

        Args:
            end: the end of the range; clipped to the region's size.
        """
        mm = self._mm
        if mm is None:
            raise StorageError(f"region {self._path} is closed")
        end = min(end, len(mm))
        start = self._populated - self._populated % PAGE
        if end <= self._populated:
            return
        _prefault(mm, start, end - start)
        self._populated = end

    @property
    def populated(self) -> int:
        """How much of the region, from its start, is pre-faulted."""
        return self._populated

    @property
    def path(self) -> Path:
        """The file behind the region."""
        return self._path

    @property
    def size(self) -> int:
        """The mapped size in bytes (the file size)."""
        return len(self.buf)

    @property
    def buf(self) -> memoryview:
        """A memoryview of the whole mapping (read-only for a read-only region)."""
        if self._buf is None:
            raise StorageError(f"region {self._path} is closed")
        return self._buf if not self._readonly else self._buf.toreadonly()

    @property
    def readonly(self) -> bool:
        """Whether the region was opened read-only."""
        return self._readonly

    @property
    def is_pmem(self) -> bool:
        """True when mapped with MAP_SYNC and persisted with libpmem (real PM)."""
        return self._is_pmem

    def persist(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` durable (as durable as the medium)."""
        if self._readonly:
            raise StorageError(f"region {self._path} is read-only; it cannot be persisted")
        if self._mm is None:
            raise StorageError(f"region {self._path} is closed")
        size = len(self._mm)
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"persist range {offset}+{length} outside region of {size}")
        if length == 0:
            return
        if self._is_pmem:
            lib = _load_libpmem()
            assert lib is not None
            lib.pmem_persist(self._base + offset, length)
            return
        start = offset - offset % PAGE
        try:
            self._mm.flush(start, offset + length - start)
        except OSError as exc:
            raise storage_error(exc, f"cannot persist {self._path}") from exc

    def grow(self, new_size: int) -> None:
        """Extend the file to ``new_size`` bytes and remap it.

        The new bytes read as zeros. The file size change is fsynced before the
        new mapping is used, so later persists of the new range are meaningful.
        """
        if self._readonly:
            raise StorageError(f"region {self._path} is read-only; it cannot grow")
        if new_size <= self.size:
            return
        try:
            _allocate(self._fd, new_size)
            os.fsync(self._fd)
        except OSError as exc:
            raise storage_error(exc, f"cannot grow {self._path} to {new_size} bytes") from exc
        old_mm, old_buf = self._mm, self._buf
        populated, old_size = self._populated, self.size
        # A fully pre-faulted region stays so (the new bytes are about to be
        # written); else what was pre-faulted is again, in the new mapping.
        self._map(new_size, populate=populated >= old_size)
        if populated < old_size:
            self.populate(populated)
        # Views into the old mapping may still be alive in callers; the mapping
        # is closed now if nothing refers to it, else when the last view dies.
        if old_buf is not None:
            # BufferError: a C extension still holds the old view's buffer; it
            # keeps the old mapping alive until it lets go, which is safe.
            with contextlib.suppress(BufferError):
                old_buf.release()
        if old_mm is not None:
            try:
                old_mm.close()
            except BufferError:
                self._old.append(old_mm)

    def close(self) -> None:
        """Unmap and close. Does not persist: persist what must be durable first."""
        # Views still held by callers keep their mapping alive (mmap refuses to
        # unmap exported memory), so this can neither fail nor leave a view
        # pointing at unmapped memory; the mapping goes when the last view does.
        if self._buf is not None:
            with contextlib.suppress(BufferError):
                self._buf.release()
            self._buf = None
        for mm in [self._mm, *self._old]:
            if mm is not None:
                with contextlib.suppress(BufferError, ValueError):
                    mm.close()
        self._mm = None
        self._old = []
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self._readonly else "rw"
        return f"Region({str(self._path)!r}, size={self.size if self._buf else 0}, {mode})"


def _prefault(mm: mmap.mmap, start: int, length: int) -> None:
    """Pre-fault ``[start, start + length)`` of ``mm`` (``start`` page-aligned)."""
    while True:
        try:
            mm.madvise(_MADV_POPULATE_READ, start, length)
            return
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            if exc.errno != errno.EINVAL:
                # ENOMEM, EFAULT, EHWPOISON: as MAP_POPULATE, pre-faulting is
                # best effort; a store there faults (and fails) on its own.
                return
            break
    # Before Linux 5.14: read one byte of every page.
    view = memoryview(mm)
    try:
        view[start : start + length : PAGE].tobytes()
    finally:
        view.release()


def _allocate(fd: int, size: int) -> None:
    """Reserve blocks for ``size`` bytes so a full disk fails now, not on a store."""
    cur = os.fstat(fd).st_size
    if size <= cur:
        return
    try:
        os.posix_fallocate(fd, cur, size - cur)
    except OSError as exc:
        # Some file systems cannot fallocate; a sparse file still works there.
        if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL
            raise
        os.ftruncate(fd, size)


def _link_exclusive(src: Path, dst: Path) -> None:
    """Give ``src`` the name ``dst`` only if ``dst`` does not exist, atomically."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        # File systems without hard links: check, then rename (a small race).
        if dst.exists():
            raise FileExistsError(17, "File exists", str(dst)) from None
        os.rename(src, dst)
        return
    src.unlink()
