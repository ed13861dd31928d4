"""The mirror file: creating, opening, locking and identifying it; its manifests and commit word.

Byte layouts are in ``_format``; this module does the I/O on a region: write
generation 0 of a new mirror, check the superblock under the key, read the
committed manifest (the one the commit word names), seal and persist a new
manifest, and flip the commit word. :func:`describe_file` reads what the
plaintext header shows, without a key.
"""

from __future__ import annotations

import fcntl
import hmac
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _magic
from ..crypto import TAG_SIZE, Aead, MasterKey, aad, counter_nonce, hkdf
from ..errors import FormatError, IntegrityError, StorageError, WrongKeyError, storage_error
from ..pmem import Region, RegionLike
from . import _format as fmt

__all__ = [
    "FileLock",
    "MirrorHeader",
    "commit",
    "describe_file",
    "gen0_body_cap",
    "grow_to",
    "identify",
    "init_region",
    "initial_size",
    "open_file",
    "read_commit_word",
    "read_committed",
    "read_previous",
    "save_aead",
    "take_lock",
    "wipe_root",
    "write_manifest",
]

_DOMAIN_MANIFEST = 1  # nonce domain of the root (counter 0) and body (counter 1)


# ---------------------------------------------------------------- opening
def open_file(
    path: Path,
    *,
    readonly: bool,
    before_create: Callable[[], None],
    init: Callable[[RegionLike], None],
) -> tuple[RegionLike, FileLock]:
    """Open the mirror file at ``path`` (creating it atomically if missing) and lock it.

    Args:
        path: the mirror file.
        readonly: open read-only (a missing file is then an error) under a shared lock.
        before_create: called before a missing file is created (may refuse by raising).
        init: writes a new mirror into the region being created (see :func:`init_region`).

    Returns:
        The region and the lock (the caller releases it).

    Raises:
        StorageError: the file cannot be opened, is not a regular file, or is locked.
        IntegrityError: the file is empty.
        FormatError: the file is not a mirror (a sealed dataset, say).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise storage_error(exc, f"cannot open {path}") from exc
    if st is None:
        if readonly:
            raise StorageError(f"{path} does not exist; nothing to open read-only")
        before_create()
        region = Region.create(path, initial_size(), init=init)
    else:
        if not stat.S_ISREG(st.st_mode):
            # A directory, FIFO or device: refused before any open (a FIFO would block).
            raise StorageError(f"{path} is not a regular file; give the path of a mirror file")
        if st.st_size == 0:
            raise IntegrityError(
                f"{path} is empty: a mirror truncated to nothing, or not a mirror at all. "
                "plinius will not treat it as a new mirror (that would restart training); "
                "remove it yourself to start a new job"
            )
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError as exc:
            raise storage_error(exc, f"cannot read {path}") from exc
        if head == _magic.DATASET:
            raise FormatError(f"{path} is a sealed dataset, not a mirror")
        if head != fmt.MAGIC:
            raise FormatError(
                f"{path} is not a plinius mirror (it does not start with {fmt.MAGIC!r})"
            )
        # Nothing is pre-faulted yet: the file may be far longer than what its
        # committed manifest uses (a sparse hole appended to it costs nothing
        # until touched); the Mirror pre-faults what is in use (Region.populate).
        region = Region.open(path, readonly=readonly, populate=False)
    try:
        lock = take_lock(path, readonly)
    except BaseException:
        region.close()
        raise
    return region, lock


# ---------------------------------------------------------------- locking
# One writer at a time: two processes saving into one mirror would overwrite
# each other's uncommitted slots. Readers share.
#
# The lock must die with the process that took it. A flock() lock belongs to
# an open file description, which fork() shares: DataLoader workers forked
# while the mirror is open would hold the lock as long as they live, orphaned
# after a SIGKILL of their parent, and keep the restarted job out. POSIX
# record locks (lockf, F_SETLK) are per process and not inherited, but a
# process loses all of them on a file whenever it closes ANY descriptor of
# that file: Python's mmap keeps a dup of the region's descriptor and closes
# it at every remap (Region.grow) and at close, and describe_file, a backup
# copy or anything else that opens and closes the file in the process would
# silently drop a live writer's lock. So: flock, on a descriptor of its own
# that nothing else uses, and every child forked from Python (os.fork,
# multiprocessing, DataLoader workers) closes its copy at once (the at-fork
# hook below): the lock is its taker's alone. Children that exec never have
# it (the descriptor is close-on-exec). A fork made from C, bypassing
# Python's at-fork hooks, would still share it.
_held: set[FileLock] = set()  # the locks this process holds
_guard = threading.Lock()  # no fork while a lock is being taken or released


class FileLock:
    """A mirror file's lock: a flock on a descriptor of its own (see above).

    Attributes:
        fd: the descriptor; -1 once released, or in a forked child.
        forked: True in a child forked while the lock was held: it holds nothing.
    """

    __slots__ = ("fd", "forked")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.forked = False

    def release(self) -> None:
        """Unlock (by closing the descriptor); idempotent."""
        with _guard:
            fd, self.fd = self.fd, -1
            _held.discard(self)
            if fd >= 0:
                os.close(fd)  # under the guard: no child may inherit it meanwhile


def _before_fork() -> None:
    _guard.acquire()


def _after_fork_in_parent() -> None:
    _guard.release()


def _after_fork_in_child() -> None:
    # The child's copies refer to its parent's lock: closing them leaves the
    # lock to the parent, and lets it go when the parent dies.
    for lock in _held:
        fd, lock.fd, lock.forked = lock.fd, -1, True
        try:
            os.close(fd)
        except OSError:  # pragma: no cover - closed behind our back
            pass
    _held.clear()
    _guard.release()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)


def take_lock(path: Path, readonly: bool) -> FileLock:
    """Lock ``path``: shared when ``readonly``, else exclusive.

    Returns:
        The lock; :meth:`FileLock.release` it.

    Raises:
        StorageError: another process holds a conflicting lock (or this one,
            through another Mirror), or the file cannot be opened.
    """
    with _guard:
        try:
            # O_NONBLOCK: a FIFO put in the file's place never blocks here.
            # os.open makes the descriptor close-on-exec.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise storage_error(exc, f"cannot open {path}") from exc
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"{path} is in use by another process (it is locked); stop that process first"
            ) from exc
        lock = FileLock(fd)
        _held.add(lock)
    return lock


def initial_size() -> int:
    """The size of a new mirror file: the header pages and generation 0's two body slots."""
    return fmt.round_up(fmt.DATA_START + 2 * gen0_body_cap(), 4096)


def gen0_body_cap() -> int:
    """The capacity of each body slot of a new mirror (the empty state, and room)."""
    return fmt.round_up(
        len(fmt.encode_body({"t": "dict", "items": []}, [])) + TAG_SIZE + 1024, fmt.ALIGN
    )


def init_region(
    region: RegionLike,
    key: MasterKey,
    *,
    counter_expected: Callable[[], int],
    uses_counter: bool,
    counter_every: int,
    counter_interval_s: float,
    chunk_bytes: int,
) -> None:
    """Write a new mirror whose committed generation 0 is the empty state.

    Args:
        region: an all-zero region (grown to :func:`initial_size` if smaller).
        key: the master key.
        counter_expected: called once the superblock is durable: the counter
            value generation 0 expects (it may advance the counter).
        uses_counter: whether the mirror uses a freshness counter.
        counter_every: the counter's advance period in commits (0: not by count).
        counter_interval_s: its advance period in seconds (0.0: not by time).
        chunk_bytes: the AES-GCM piece size recorded in generation 0.
    """
    if region.size < initial_size():
        region.grow(initial_size())
    buf = region.buf
    region_id = os.urandom(16)
    mkey = key.derive("mirror", region_id)
    buf[: fmt.HEADER_LEN] = fmt.pack_superblock(region_id, key.fingerprint, time.time(), mkey)
    region.persist(0, fmt.HEADER_LEN)
    cap = gen0_body_cap()
    counter = counter_expected()
    root = fmt.Root(
        generation=0, step=None, saved_at=0.0, counter_expected=counter,
        uses_counter=uses_counter, counter_every=counter_every,
        counter_interval_s=counter_interval_s, body_off=fmt.DATA_START,
        body_len=0, body_other=fmt.DATA_START + cap, body_cap=cap, body_tag=b"",
        num_tensors=0, tensor_bytes=0, extent_end=region.size,
        chunk_bytes=chunk_bytes,
    )  # fmt: skip
    text = fmt.encode_body({"t": "dict", "items": []}, [])
    salt = os.urandom(16)
    aead = save_aead(mkey, salt)
    write_manifest(region, aead, region_id, root, 0, text, salt)
    # The commit word last: until it is valid, the region does not open.
    commit(region, 0, 0)


def grow_to(region: RegionLike, end: int) -> None:
    """Grow ``region`` (in 64 KiB steps) so that it reaches at least ``end``."""
    if end > region.size:
        region.grow(fmt.round_up(end, 1 << 16))


# ---------------------------------------------------------------- identifying
def identify(region: RegionLike, key: MasterKey, label: str) -> tuple[fmt.Superblock, bytes]:
    """Check the superblock and that ``key`` is the mirror's; derive the mirror key.

    Args:
        region: the mirror's region.
        key: the master key.
        label: how errors name the mirror.

    Returns:
        The superblock and the mirror key (``HKDF(master, region id, "mirror")``).

    Raises:
        FormatError: not a mirror, or another format version.
        IntegrityError: truncated, or the superblock is damaged or fails authentication.
        WrongKeyError: the mirror was written under another master key.
    """
    buf = region.buf
    if region.size < fmt.DATA_START:
        if bytes(buf[:8]) != fmt.MAGIC:
            raise FormatError(f"{label} is not a plinius mirror")
        raise IntegrityError(f"{label} is truncated ({region.size} bytes)")
    page0 = buf[: fmt.DATA_START]
    sb = fmt.unpack_superblock(page0, label)
    if not hmac.compare_digest(sb.fingerprint, key.fingerprint):
        raise WrongKeyError(
            f"{label} was written under another master key (key fingerprint "
            f"{sb.fingerprint.hex()}, yours is {key.fingerprint.hex()}); use the key "
            "it was created with"
        )
    mkey = key.derive("mirror", sb.region_id)
    fmt.check_superblock_mac(page0, sb, mkey, label)
    return sb, mkey


def save_aead(mirror_key: bytes, salt: bytes) -> Aead:
    """The AEAD of one save (its manifest and tensors), from the save's random ``salt``."""
    return Aead(hkdf(mirror_key, salt=salt, info="plinius/v1/mirror/save"))


# ---------------------------------------------------------------- manifests
def read_commit_word(region: RegionLike) -> int:
    """The commit word, read as one aligned 8-byte value."""
    return int(np.frombuffer(region.buf, dtype="<u8", count=1, offset=fmt.COMMIT_OFFSET)[0])


def read_committed(
    region: RegionLike, mirror_key: bytes, region_id: bytes, label: str
) -> fmt.Manifest:
    """Read and authenticate the manifest the commit word names.

    Args:
        region: the mirror's region.
        mirror_key: the mirror key (from :func:`identify`).
        region_id: the region's id (bound into the manifest's AAD).
        label: how errors name the mirror.

    Returns:
        The committed manifest.

    Raises:
        IntegrityError: the commit word, root or body is damaged, fails
            authentication, or is inconsistent; the file is truncated. Never a
            fallback to an older manifest: that would let an attacker roll back.
    """
    gen, slot = fmt.unpack_commit(read_commit_word(region))
    return _read_manifest(region, mirror_key, region_id, label, gen, slot, "committed manifest")


def read_previous(
    region: RegionLike, mirror_key: bytes, region_id: bytes, label: str, current: fmt.Manifest
) -> fmt.Manifest | None:
    """The manifest of the generation before ``current``, if its root is still intact.

    A mirror that keeps its previous generation (a process of a multi-process
    job) leaves it in the other root slot until its next save. It is read only
    when every process agrees to go back to it; any doubt (wiped, torn by a
    crash during the next save, replaced) means "not held", never a guess.

    Returns:
        The authenticated previous manifest, or ``None`` when it is not held.
    """
    gen, slot = current.root.generation - 1, 1 - current.slot
    off = fmt.ROOT_OFFSETS[slot]
    if gen < 0 or not any(region.buf[off : off + 64]):
        return None
    try:
        return _read_manifest(region, mirror_key, region_id, label, gen, slot, "previous manifest")
    except IntegrityError:
        return None


def _read_manifest(
    region: RegionLike,
    mirror_key: bytes,
    region_id: bytes,
    label: str,
    gen: int,
    slot: int,
    what: str,
) -> fmt.Manifest:
    """Read and authenticate the manifest of generation ``gen`` whose root is in ``slot``."""
    buf = region.buf
    off = fmt.ROOT_OFFSETS[slot]
    salt = bytes(buf[off : off + fmt.ROOT_SALT])
    n = int.from_bytes(buf[off + 16 : off + 20], "little")
    if n != fmt.ROOT_PLAIN_SIZE + TAG_SIZE:
        raise IntegrityError(
            f"the {what} of {label} (generation {gen}, slot {slot}) is "
            "damaged: the mirror was tampered with or corrupted; restore it from a trusted copy"
        )
    aead = save_aead(mirror_key, salt)
    try:
        plain = aead.decrypt(
            counter_nonce(0, _DOMAIN_MANIFEST),
            buf[off + 20 : off + 20 + n],
            aad("plinius/v1/mirror/root", region_id, slot, gen),
        )
    except IntegrityError as exc:
        raise IntegrityError(
            f"the {what} of {label} (generation {gen}, slot {slot}) fails "
            "authentication: the mirror was tampered with or corrupted; restore it from a "
            "trusted copy"
        ) from exc
    root = fmt.unpack_root(plain)
    if root.generation != gen:
        raise IntegrityError(f"the {what} names another generation")
    if root.extent_end > region.size:
        raise IntegrityError(
            f"{label} is truncated: the {what} needs {root.extent_end} bytes, "
            f"the file has {region.size}; restore it from a trusted copy"
        )
    body = buf[root.body_off : root.body_off + root.body_len]
    if not hmac.compare_digest(bytes(body[-TAG_SIZE:]), root.body_tag):
        raise IntegrityError(f"the manifest body of {label} was replaced or damaged")
    try:
        text = aead.decrypt(
            counter_nonce(1, _DOMAIN_MANIFEST),
            body,
            aad("plinius/v1/mirror/body", region_id, gen),
        )
    except IntegrityError as exc:
        raise IntegrityError(f"the manifest body of {label} fails authentication") from exc
    skeleton, entries = fmt.decode_body(text, root, label)
    return fmt.Manifest(root, slot, skeleton, entries, salt)


def write_manifest(
    region: RegionLike,
    aead: Aead,
    region_id: bytes,
    root: fmt.Root,
    slot: int,
    text: bytes,
    salt: bytes,
) -> None:
    """Seal and persist the body, then the root; ``aead`` is the save's key (from ``salt``)."""
    n = len(text) + TAG_SIZE
    if n > root.body_cap:
        raise AssertionError("manifest body outgrew its planned slot")  # pragma: no cover
    buf = region.buf
    off = root.body_off
    aead.encrypt_into(
        counter_nonce(1, _DOMAIN_MANIFEST),
        text,
        aad("plinius/v1/mirror/body", region_id, root.generation),
        buf[off : off + n],
    )
    root.body_len = n
    root.body_tag = bytes(buf[off + n - TAG_SIZE : off + n])
    region.persist(off, n)
    sealed = aead.encrypt(
        counter_nonce(0, _DOMAIN_MANIFEST),
        fmt.pack_root(root),
        aad("plinius/v1/mirror/root", region_id, slot, root.generation),
    )
    roff = fmt.ROOT_OFFSETS[slot]
    record = salt + len(sealed).to_bytes(4, "little") + sealed
    buf[roff : roff + len(record)] = record
    region.persist(roff, len(record))


def commit(region: RegionLike, gen: int, slot: int) -> None:
    """Make generation ``gen`` (its root in ``slot``) the committed one, durably."""
    # The commit point: ONE aligned 8-byte store (a numpy uint64 element),
    # never a byte-wise write that a crash could tear.
    word = np.frombuffer(region.buf, dtype="<u8", count=1, offset=fmt.COMMIT_OFFSET)
    word[0] = fmt.pack_commit(gen, slot)
    del word
    region.persist(fmt.COMMIT_OFFSET, 8)


def wipe_root(region: RegionLike, slot: int) -> None:
    """Zero the root record in ``slot`` (the superseded one), durably."""
    old = fmt.ROOT_OFFSETS[slot]
    region.buf[old : old + 64] = bytes(64)
    region.persist(old, 64)


# ---------------------------------------------------------------- describing
@dataclass(frozen=True)
class MirrorHeader:
    """What a mirror file's plaintext header shows (read without the key).

    Attributes:
        path: the file.
        file_bytes: its size.
        format_version: the mirror format version.
        region_id: the region's random id.
        fingerprint: the master key's fingerprint (names the key it needs).
        created_at: when the mirror was created (seconds since the epoch).
        generation: the committed generation (0: nothing saved yet).
        slot: the manifest slot the commit word names.
    """

    path: Path
    file_bytes: int
    format_version: int
    region_id: bytes
    fingerprint: bytes
    created_at: float
    generation: int
    slot: int


def describe_file(path: str | os.PathLike[str]) -> MirrorHeader:
    """Read a mirror file's plaintext header: superblock and commit word.

    The superblock's checksum and the commit word's check are verified; nothing
    is authenticated (that needs the key: open a ``Mirror`` and ``verify()``).

    Args:
        path: the mirror file.

    Returns:
        The header's fields.

    Raises:
        OSError: the file cannot be read.
        FormatError: the file is not a mirror, or has another format version.
        IntegrityError: the header is truncated or damaged, or the commit word fails its check.
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        page0 = f.read(fmt.DATA_START)
    sb = fmt.unpack_superblock(page0, str(p))
    word = int.from_bytes(page0[fmt.COMMIT_OFFSET : fmt.COMMIT_OFFSET + 8], "little")
    gen, slot = fmt.unpack_commit(word)
    return MirrorHeader(p, size, sb.version, sb.region_id, sb.fingerprint, sb.created_at, gen, slot)
