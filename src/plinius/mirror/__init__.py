"""The encrypted, crash-consistent mirror of the training state in persistent memory.

::

    state = {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState(), "epoch": 3}
    with Mirror("/dev/shm/job.plm", key) as mirror:
        step = mirror.restore(state)          # None if never saved; else loads in place
        mirror.save(state, step=step)         # returns once committed and persisted
        pending = mirror.save_async(state, step=step)
        ...                                   # forward/backward may run meanwhile
        pending.wait()                        # before the next optimizer.step()

The state is flattened into tensors and a JSON skeleton (``_state``); each save
encrypts every tensor straight from its memory into the region, into the slot
of its pair that the committed manifest does not reference, persists, writes
the sealed manifest, persists, then flips the commit word (one aligned 8-byte
store) and persists it. The format is in ``_layout`` and docs/FORMAT.md.

**The save_async rule.** ``save_async`` copies at once everything a forward
pass may change (module buffers such as BatchNorm statistics, tensors outside
modules and optimizers, plain values, RNG states) and encrypts module
parameters and optimizer state in a background thread. The caller must call
``pending.wait()`` before the next ``optimizer.step()`` or any other in-place
change to parameters or optimizer state. A second save (or a restore, info,
verify, close) waits for a pending one first.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hmac
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..counters import Counter
from ..crypto import TAG_SIZE, Aead, MasterKey, aad, counter_nonce, hkdf
from ..errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    PliniusError,
    RollbackError,
    StateMismatchError,
    StorageError,
    WrongKeyError,
    storage_error,
)
from ..pmem import Region, RegionLike
from ..rng import RNGState
from . import _format as L
from ._codec import TORCH_DTYPES
from ._flatten import FlattenMemo, TensorSrc, flatten
from ._restore import plan_restore

__all__ = [
    "CHUNK_BYTES",
    "THREADS",
    "Mirror",
    "MirrorInfo",
    "PendingSave",
    "RNGState",
    "TensorInfo",
]

# Knobs. A tensor is sealed in AES-GCM pieces of at most CHUNK_BYTES (one call
# is capped at 2**31 - 1 bytes; smaller pieces also let two threads share a big
# tensor). Saves and restores above PARALLEL_MIN_BYTES use THREADS threads.
CHUNK_BYTES = 64 << 20
THREADS = min(2, os.cpu_count() or 1)
PARALLEL_MIN_BYTES = 8 << 20
# Persist ranges closer than this are persisted as one (fewer msync calls).
_MERGE_GAP = 4096

_DOMAIN_MANIFEST = 1  # nonce domain of the root (counter 0) and body (counter 1)
_DOMAIN_TENSOR = 2  # tensor i, chunk c: domain 2 + c, counter i
_DATASET_MAGIC = b"PLINIUSD"


@dataclass(frozen=True)
class TensorInfo:
    """A committed tensor as the manifest describes it."""

    name: str
    kind: str  # "torch" or "numpy"
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class MirrorInfo:
    """What :meth:`Mirror.info` reports about the committed generation."""

    generation: int
    step: int | None
    num_tensors: int
    tensor_bytes: int
    file_bytes: int
    saved_at: float | None
    is_pmem: bool
    path: str | None
    region_id: str
    counter_expected: int | None
    counter_bound: str = ""
    format_version: int = L.FORMAT_VERSION
    created_at: float = 0.0
    verified: bool = False


class PendingSave:
    """A save running in the background (from :meth:`Mirror.save_async`)."""

    def __init__(self, future: Future[None], step: int) -> None:
        self._future = future
        self._observed = False
        self.step = step

    def wait(self, timeout: float | None = None) -> None:
        """Block until the save is committed; re-raise its error if it failed."""
        try:
            self._future.result(timeout)
        except TimeoutError:
            raise
        except BaseException:
            self._observed = True
            raise
        self._observed = True

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._future.done()

    def __repr__(self) -> str:
        return f"PendingSave(step={self.step}, done={self.done()})"


@dataclass
class _Job:
    nbytes: int
    run: Callable[[], None]


class Mirror:
    """An encrypted, crash-consistent mirror of a training state in a region.

    ``path_or_region``: a path (the file is created atomically if missing, else
    opened) or a :class:`~plinius.pmem.RegionLike` used as it is (all zeros:
    a new mirror is initialised in it). ``key``: the master key.
    ``readonly``: open for :meth:`restore`, :meth:`info`, :meth:`verify` only.
    ``counter``: a trusted monotonic counter (:mod:`plinius.counters`) that
    catches a rolled-back file; it is advanced after a commit when
    ``counter_every`` commits (None: never by count) or ``counter_interval_s``
    seconds have passed since the last advance. ``threads``: encryption threads.
    """

    def __init__(
        self,
        path_or_region: str | os.PathLike[str] | RegionLike,
        key: MasterKey,
        *,
        readonly: bool = False,
        counter: Counter | None = None,
        counter_every: int | None = 1,
        counter_interval_s: float | None = None,
        threads: int | None = None,
    ) -> None:
        if not isinstance(key, MasterKey):
            raise ConfigError("key must be a plinius MasterKey (MasterKey.load(path))")
        if counter_every is not None and (type(counter_every) is not int or counter_every < 1):
            raise ConfigError("counter_every must be a positive integer or None")
        if counter_interval_s is not None and not (counter_interval_s > 0):
            raise ConfigError("counter_interval_s must be a positive number of seconds or None")
        if counter is not None and counter_every is None and counter_interval_s is None:
            raise ConfigError("with a counter, give counter_every or counter_interval_s (or both)")
        wears = counter is not None and getattr(counter, "wears", False)
        if wears and counter_every == 1 and counter_interval_s is None:
            warnings.warn(
                "advancing a wearing counter on every commit wears it out quickly; "
                "pass counter_every=K or counter_interval_s=T",
                stacklevel=2,
            )
        self._key = key
        self._readonly = readonly
        self._counter = counter
        self._counter_every = counter_every
        self._counter_interval = counter_interval_s
        self._threads = max(1, threads if threads is not None else THREADS)
        self._lock = threading.RLock()
        self._pending: PendingSave | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._driver: ThreadPoolExecutor | None = None
        self._lock_fd = -1
        self._closed = False
        self._aad_cache: dict[tuple[Any, ...], bytes] = {}
        self._body = L.BodyEncoder()
        self._prefix_cache: tuple[int, bytes] = (-1, b"")
        self._memo = FlattenMemo()  # the state's structure, as the last save saw it
        self._region: RegionLike
        if isinstance(path_or_region, str | os.PathLike):
            self._path: Path | None = Path(path_or_region)
            self._region = self._open_path(self._path)
        else:
            self._path = getattr(path_or_region, "path", None)
            self._region = path_or_region
            if not readonly and not np.frombuffer(self._region.buf, dtype=np.uint8).any():
                self._check_new_allowed()
                self._init_region(self._region)
        try:
            self._load()
            self._check_counter()
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------ opening
    @property
    def _what(self) -> str:
        return str(self._path) if self._path is not None else "the mirror region"

    def _check_new_allowed(self) -> None:
        if self._counter is not None:
            value = self._counter.read()
            if value > 0:
                raise RollbackError(
                    f"{self._what} does not exist (or is empty) but the freshness counter is at "
                    f"{value}: the mirror may have been deleted to roll training back. To start a "
                    "new job on purpose, use a fresh counter (for example a new counter file)"
                )

    def _initial_counter(self) -> int:
        """The counter value a new mirror's generation 0 expects.

        Normally the counter's value, 0 (``_check_new_allowed`` refused any
        other). But a counter that declares ``first_increment_may_jump`` (a TPM
        NV index: once any index on that TPM was deleted, a new one starts
        above the highest value the deleted one had) may go from 0 to any value
        on its first increment. Its base is learned here, by advancing it once
        before generation 0 is committed, and recorded as what generation 0
        expects: every later check stays exact (expected or expected - 1),
        so a rolled-back or deleted mirror is still refused. A crash between
        this increment and the commit leaves no mirror and a counter above 0,
        which is refused like a deleted mirror: nothing was trained yet, and
        the job restarts with a fresh counter.
        """
        if self._counter is None:
            return 0
        value = self._counter.read()
        if value == 0 and getattr(self._counter, "first_increment_may_jump", False):
            value = self._counter.increment()
            if value < 1:
                raise RollbackError(
                    f"the freshness counter read {value} after an increment; it is not "
                    f"monotonic, so it cannot protect {self._what}: use another counter"
                )
        return value

    def _open_path(self, path: Path) -> RegionLike:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise storage_error(exc, f"cannot open {path}") from exc
        if st is None:
            if self._readonly:
                raise StorageError(f"{path} does not exist; nothing to open read-only")
            self._check_new_allowed()
            region = Region.create(path, self._initial_size(), init=self._init_region)
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
            if head == _DATASET_MAGIC:
                raise FormatError(f"{path} is a sealed dataset, not a mirror")
            if head != L.MAGIC:
                raise FormatError(
                    f"{path} is not a plinius mirror (it does not start with {L.MAGIC!r})"
                )
            region = Region.open(path, readonly=self._readonly)
        try:
            self._take_lock(path)
        except BaseException:
            region.close()
            raise
        return region

    def _take_lock(self, path: Path) -> None:
        # One writer at a time: two processes saving into one mirror would
        # overwrite each other's uncommitted slots.
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise storage_error(exc, f"cannot open {path}") from exc
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self._readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"{path} is in use by another process (it is locked); stop that process first"
            ) from exc
        self._lock_fd = fd

    def _initial_size(self) -> int:
        return L.round_up(L.DATA_START + 2 * self._gen0_body_cap(), 4096)

    @staticmethod
    def _gen0_body_cap() -> int:
        return L.round_up(
            len(L.encode_body({"t": "dict", "items": []}, [])) + TAG_SIZE + 1024, L.ALIGN
        )

    def _init_region(self, region: RegionLike) -> None:
        """Write a new mirror whose committed generation 0 is the empty state."""
        if region.size < self._initial_size():
            region.grow(self._initial_size())
        buf = region.buf
        region_id = os.urandom(16)
        mkey = self._key.derive("mirror", region_id)
        buf[: L.HEADER_LEN] = L.pack_superblock(region_id, self._key.fingerprint, time.time(), mkey)
        region.persist(0, L.HEADER_LEN)
        cap = self._gen0_body_cap()
        counter = self._initial_counter()
        root = L.Root(
            generation=0, step=None, saved_at=0.0, counter_expected=counter,
            uses_counter=self._counter is not None, counter_every=self._counter_every or 0,
            counter_interval_s=float(self._counter_interval or 0.0), body_off=L.DATA_START,
            body_len=0, body_other=L.DATA_START + cap, body_cap=cap, body_tag=b"",
            num_tensors=0, tensor_bytes=0, extent_end=region.size,
            chunk_bytes=CHUNK_BYTES,
        )  # fmt: skip
        text = L.encode_body({"t": "dict", "items": []}, [])
        salt = os.urandom(16)
        aead = Aead(hkdf(mkey, salt=salt, info="plinius/v1/mirror/save"))
        self._write_manifest(region, aead, region_id, root, 0, text, salt)
        # The commit word last: until it is valid, the region does not open.
        self._commit(region, 0, 0)

    # ------------------------------------------------------------ reading
    def _load(self) -> None:
        region = self._region
        buf = region.buf
        if region.size < L.DATA_START:
            if bytes(buf[:8]) != L.MAGIC:
                raise FormatError(f"{self._what} is not a plinius mirror")
            raise IntegrityError(f"{self._what} is truncated ({region.size} bytes)")
        page0 = buf[: L.DATA_START]
        sb = L.unpack_superblock(page0, self._what)
        if not hmac.compare_digest(sb.fingerprint, self._key.fingerprint):
            raise WrongKeyError(
                f"{self._what} was written under another master key (key fingerprint "
                f"{sb.fingerprint.hex()}, yours is {self._key.fingerprint.hex()}); use the key "
                "it was created with"
            )
        mkey = self._key.derive("mirror", sb.region_id)
        L.check_superblock_mac(page0, sb, mkey, self._what)
        self._sb = sb
        self._mirror_key = mkey
        self._manifest = self._read_committed()

    def _read_word(self) -> int:
        return int(np.frombuffer(self._region.buf, dtype="<u8", count=1, offset=L.COMMIT_OFFSET)[0])

    def _save_aead(self, salt: bytes) -> Aead:
        return Aead(hkdf(self._mirror_key, salt=salt, info="plinius/v1/mirror/save"))

    def _read_committed(self) -> L.Manifest:
        region = self._region
        buf = region.buf
        gen, slot = L.unpack_commit(self._read_word())
        off = L.ROOT_OFFSETS[slot]
        salt = bytes(buf[off : off + L.ROOT_SALT])
        n = int.from_bytes(buf[off + 16 : off + 20], "little")
        if n != L.ROOT_PLAIN_SIZE + TAG_SIZE:
            raise IntegrityError(
                f"the committed manifest of {self._what} (generation {gen}, slot {slot}) is "
                "damaged: the mirror was tampered with or corrupted; restore it from a trusted copy"
            )
        aead = self._save_aead(salt)
        try:
            plain = aead.decrypt(
                counter_nonce(0, _DOMAIN_MANIFEST),
                buf[off + 20 : off + 20 + n],
                aad("plinius/v1/mirror/root", self._sb.region_id, slot, gen),
            )
        except IntegrityError as exc:
            raise IntegrityError(
                f"the committed manifest of {self._what} (generation {gen}, slot {slot}) fails "
                "authentication: the mirror was tampered with or corrupted; restore it from a "
                "trusted copy"
            ) from exc
        root = L.unpack_root(plain)
        if root.generation != gen:
            raise IntegrityError("the committed manifest names another generation")
        if root.extent_end > region.size:
            raise IntegrityError(
                f"{self._what} is truncated: the committed manifest needs {root.extent_end} bytes, "
                f"the file has {region.size}; restore it from a trusted copy"
            )
        body = buf[root.body_off : root.body_off + root.body_len]
        if not hmac.compare_digest(bytes(body[-TAG_SIZE:]), root.body_tag):
            raise IntegrityError(f"the manifest body of {self._what} was replaced or damaged")
        try:
            text = aead.decrypt(
                counter_nonce(1, _DOMAIN_MANIFEST),
                body,
                aad("plinius/v1/mirror/body", self._sb.region_id, gen),
            )
        except IntegrityError as exc:
            raise IntegrityError(f"the manifest body of {self._what} fails authentication") from exc
        skeleton, entries = L.decode_body(text, root)
        return L.Manifest(root, slot, skeleton, entries, salt)

    def _check_counter(self) -> None:
        root = self._manifest.root
        self._counter_value = root.counter_expected
        self._since_advance = 0
        self._last_advance = time.monotonic()
        if self._counter is None:
            return
        value = self._counter.read()
        expected = root.counter_expected
        where = f"{self._what} (generation {root.generation}, step {root.step})"
        if expected < value:
            raise RollbackError(
                f"{where} expects freshness counter value {expected} but the counter is at "
                f"{value}: this is an older copy of the mirror (a rollback). Put the newest copy "
                "back, or start a new job on purpose with a fresh counter"
            )
        if expected > value + 1:
            raise RollbackError(
                f"{where} expects freshness counter value {expected} but the counter is only at "
                f"{value}: the counter was reset or belongs to another job; use this job's counter"
            )
        if expected == value + 1 and not self._readonly:
            # A crash between a commit and its counter advance: finish the advance.
            self._advance_to(expected)
        self._counter_value = expected if not self._readonly else value

    def _advance_to(self, expected: int) -> None:
        assert self._counter is not None
        value = self._counter.read()
        first = value == 0
        while value < expected:
            value = self._counter.increment()
        if value > expected:
            if first:
                # From 0 straight past the expected value on the very first
                # increment: a counter that starts above zero (a re-created TPM
                # NV index does) but did not say so, so this mirror could not
                # learn its base at creation.
                raise RollbackError(
                    f"the freshness counter jumped from 0 to {value} on its first increment, "
                    f"past the {expected} that {self._what} expects: either another job is "
                    "using the same counter, or the counter starts above zero when first "
                    "incremented and its class must declare first_increment_may_jump = True; "
                    "start the job again with a fresh counter"
                )
            raise RollbackError(
                f"the freshness counter moved to {value}, past the {expected} this mirror expects: "
                "another job is using the same counter; give each job its own"
            )

    # ------------------------------------------------------------ public API
    def restore(self, state: dict[str, Any]) -> int | None:
        """Load the committed state into ``state`` in place; return its step.

        Returns None, touching nothing, if nothing was ever saved (generation 0).
        Raises :class:`StateMismatchError` before writing anything if the saved
        state does not fit ``state``, and :class:`IntegrityError` if any part
        fails authentication; if that happens part-way, the tensors already
        written are zeroed and ``state`` must not be used.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest
            if m.root.generation == 0:
                return None
            return self._restore_locked(m.skeleton, state)

    def restore_model(self, module: torch.nn.Module, name: str = "model") -> int | None:
        """Load only ``state[name]`` of the committed state into ``module``; return the step.

        For evaluation and export, where the optimizer and the rest of the
        training state are not at hand. Same verdicts as :meth:`restore`.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest
            if m.root.generation == 0:
                return None
            for k, v in m.skeleton["items"]:
                if k == {"t": "str", "v": name}:
                    sub = {"t": "dict", "items": [[k, v]]}
                    break
            else:
                raise StateMismatchError(f"the saved state has no {name!r} entry to restore")
            return self._restore_locked(sub, {name: module})

    def save(self, state: dict[str, Any], *, step: int) -> None:
        """Encrypt ``state`` into a new generation; returns once it is committed and durable."""
        self._check_step(step)
        with self._lock:
            self._join_pending()
            self._check_writable()
            skeleton, srcs = flatten(state, memo=self._memo)
            self._save_locked(skeleton, srcs, step)

    def save_async(self, state: dict[str, Any], *, step: int) -> PendingSave:
        """Start a save in the background and return at once.

        What a forward pass may change is copied now; parameters and optimizer
        state are encrypted in the background, so call ``pending.wait()`` before
        the next ``optimizer.step()`` or any in-place change to them.
        """
        self._check_step(step)
        with self._lock:
            self._join_pending()
            self._check_writable()
            skeleton, srcs = flatten(state, capture=True, memo=self._memo)
            if self._driver is None:
                self._driver = ThreadPoolExecutor(1, thread_name_prefix="plinius-save")
            fut = self._driver.submit(self._save_in_background, skeleton, srcs, step)
            pending = PendingSave(fut, step)
            self._pending = pending
            return pending

    def info(self) -> MirrorInfo:
        """The committed generation, step, sizes and where the file lives."""
        with self._lock:
            self._join_pending()
            self._check_open()
            return self._info(verified=False)

    def verify(self) -> MirrorInfo:
        """Authenticate every tensor of the committed generation; write nothing.

        Raises :class:`IntegrityError` at the first failure.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest
            self._precheck_tags(m)
            aead = self._save_aead(m.salt)
            largest = max((min(e.nbytes, m.root.chunk_bytes) for e in m.entries), default=0)
            scratch = np.empty(largest, dtype=np.uint8)
            for i, e in enumerate(m.entries):
                for src, dst, nonce, ad in self._open_pieces(m, i, e, scratch, shared=True):
                    try:
                        aead.decrypt_into(nonce, src, ad, _mv(dst))
                    except IntegrityError as exc:
                        raise IntegrityError(
                            f"tensor {e.name!r} of {self._what} fails authentication: the mirror "
                            "was tampered with or corrupted"
                        ) from exc
            return self._info(verified=True)

    def read_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Decrypted copies of the committed tensors whose name starts with ``prefix``."""
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest
            self._precheck_tags(m)
            aead = self._save_aead(m.salt)
            out: dict[str, torch.Tensor] = {}
            for i, e in enumerate(m.entries):
                if not e.name.startswith(prefix):
                    continue
                if e.kind == "torch":
                    t = torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype])
                    flat = t.reshape(-1).view(torch.uint8).numpy()
                else:
                    arr = np.empty(e.shape, dtype=np.dtype(e.dtype))
                    flat = arr.reshape(-1).view(np.uint8)
                    try:
                        t = torch.from_numpy(arr)
                    except TypeError as exc:
                        raise ConfigError(
                            f"{e.name}: numpy dtype {arr.dtype} has no torch equivalent"
                        ) from exc
                for src, dst, nonce, ad in self._open_pieces(m, i, e, flat):
                    try:
                        aead.decrypt_into(nonce, src, ad, _mv(dst))
                    except IntegrityError as exc:
                        raise IntegrityError(
                            f"tensor {e.name!r} of {self._what} fails authentication"
                        ) from exc
                out[e.name] = t
            return out

    def committed_tensors(self) -> list[TensorInfo]:
        """Name, kind, dtype, shape and size of every committed tensor, in order."""
        with self._lock:
            self._join_pending()
            self._check_open()
            return [
                TensorInfo(e.name, e.kind, e.dtype, e.shape, e.nbytes)
                for e in self._manifest.entries
            ]

    def committed_state_names(self) -> list[str]:
        """The flattened names of the committed tensors (``"model.fc.weight"``, ...)."""
        return [t.name for t in self.committed_tensors()]

    def close(self) -> None:
        """Wait for a pending save, then release the region. Raises a pending save's error."""
        if self._closed:
            return
        try:
            with self._lock:
                self._join_pending()
        finally:
            self._release()

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            # Already failing: do not hide that error behind a pending save's.
            with contextlib.suppress(Exception):
                self.close()
            self._release()

    def __repr__(self) -> str:
        mode = "ro" if self._readonly else "rw"
        return f"Mirror({self._what!r}, {mode})"

    # ------------------------------------------------------------ save internals
    def _restore_locked(self, skeleton: dict[str, Any], state: dict[str, Any]) -> int | None:
        m = self._manifest
        plan = plan_restore(skeleton, m.entries, state)
        self._precheck_tags(m)
        aead = self._save_aead(m.salt)
        jobs: list[_Job] = []
        attempted: list[np.ndarray[Any, Any]] = []
        failed: list[BaseException] = []
        stop = threading.Event()
        for d in plan.dsts:
            e = m.entries[d.index]
            for src, dst, nonce, ad in self._open_pieces(m, d.index, e, d.buf):
                job = _decrypt_job(aead, nonce, src, ad, dst, attempted, failed, stop)
                jobs.append(_Job(len(dst), job))
        self._run(jobs)
        if failed:
            # decrypt_into writes plaintext before it checks the tag: wipe
            # whatever reached the target so that nothing unverified is used.
            for dst in attempted:
                dst[:] = 0
            raise IntegrityError(
                f"a tensor of {self._what} (generation {m.root.generation}) fails "
                "authentication: the mirror was tampered with or corrupted. The target state "
                "was partly overwritten (those tensors are zeroed) and must not be used; "
                "restore the mirror from a trusted copy"
            ) from failed[0]
        plan.finish()
        return m.root.step

    def _check_step(self, step: int) -> None:
        if type(step) is not int or not (-(1 << 63) <= step < (1 << 63)):
            raise ConfigError(f"step must be an int that fits in 64 bits, not {step!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"the mirror {self._what} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise ConfigError(f"the mirror {self._what} was opened read-only; it cannot save")

    def _join_pending(self) -> None:
        p, self._pending = self._pending, None
        if p is None:
            return
        try:
            p._future.result()
        except BaseException:
            if not p._observed:
                p._observed = True
                raise

    def _save_in_background(
        self, skeleton: dict[str, Any], srcs: list[TensorSrc], step: int
    ) -> None:
        # No lock here: every other user of the region joins the pending save
        # first (while holding the lock), so this thread has the region alone.
        self._save_locked(skeleton, srcs, step)

    def _save_locked(self, skeleton: dict[str, Any], srcs: list[TensorSrc], step: int) -> None:
        region = self._region
        m = self._manifest
        gen = m.root.generation + 1
        slot = 1 - m.slot
        chunk = CHUNK_BYTES
        if not (0 < chunk <= (1 << 31) - 1):
            raise ConfigError("CHUNK_BYTES must be between 1 and 2**31 - 1")
        if gen > L.MAX_GENERATION:
            raise ConfigError("this mirror has used every generation number; start a new mirror")
        alloc = L.Allocator(m)
        placed = alloc.place_tensors([(s.name, L.ct_len(s.nbytes, chunk)) for s in srcs])
        entries = [
            L.Entry(s.name, s.kind, s.dtype, s.shape, s.nbytes, slots, cap, cur)
            for s, (slots, cap, cur) in zip(srcs, placed)
        ]
        # Grow before anything refers to the new space: a crash now leaves a
        # longer file whose committed manifest never mentions the tail.
        self._grow_to(alloc.end)
        buf = region.buf
        salt = os.urandom(16)
        aead = self._save_aead(salt)
        prefix = self._prefix(gen)
        jobs: list[_Job] = []
        sealed: list[memoryview] = []  # each piece's sealed slice, its tag last
        ranges: list[tuple[int, int]] = []
        encrypt_into = aead.encrypt_into
        for i, (s, e) in enumerate(zip(srcs, entries)):
            n, off = e.nbytes, e.slots[e.cur]
            if n <= chunk:
                # One piece (nearly every tensor): what _pieces makes, without the lists.
                dst = buf[off : off + n + TAG_SIZE]
                ad = prefix + self._static_aad(i, e, 1)
                run = functools.partial(encrypt_into, _nonce(i), _mv(s.data), ad, dst)
                jobs.append(_Job(n, run))
                sealed.append(dst)
                ranges.append((off, n + TAG_SIZE))
                continue
            for src, dst, nonce, ad in self._pieces(gen, prefix, chunk, i, e, buf, s.data):
                run = functools.partial(encrypt_into, nonce, _mv(src), ad, dst)
                jobs.append(_Job(len(src), run))
                sealed.append(dst)
            ranges.append((off, L.ct_len(n, chunk)))
        # Whatever needs no tag is done before encrypting (which leaves the
        # CPU caches full of ciphertext): the manifest body's text above all.
        pieces = self._body.prepare(skeleton, entries)
        self._run(jobs)
        tags = [bytes(d[-TAG_SIZE:]) for d in sealed]  # in the order of the pieces
        k = 0
        for e in entries:
            c = L.nchunks(e.nbytes, chunk)
            e.tags = tags[k : k + c]
            k += c
        # IMPORTANT: the tensors are durable before the manifest that names them
        # is written, and that before the commit word that makes it current.
        _persist_ranges(region, ranges)
        text = self._body.fill(pieces, entries)
        body_off, body_other, body_cap = alloc.place_body(len(text) + TAG_SIZE)
        self._grow_to(alloc.end)
        counter_expected, advance = self._next_counter()
        root = L.Root(
            generation=gen, step=step, saved_at=time.time(), counter_expected=counter_expected,
            uses_counter=self._counter is not None, counter_every=self._counter_every or 0,
            counter_interval_s=float(self._counter_interval or 0.0), body_off=body_off,
            body_len=0, body_other=body_other, body_cap=body_cap, body_tag=b"",
            num_tensors=len(entries), tensor_bytes=sum(e.nbytes for e in entries),
            extent_end=max(alloc.end, region.size), chunk_bytes=chunk,
        )  # fmt: skip
        self._write_manifest(region, aead, self._sb.region_id, root, slot, text, salt)
        self._commit(region, gen, slot)
        self._manifest = L.Manifest(root, slot, skeleton, entries, salt)
        # The superseded root is wiped, so that rewriting the commit word alone
        # cannot roll back to it (a full-file rollback needs the counter).
        old = L.ROOT_OFFSETS[1 - slot]
        region.buf[old : old + 64] = bytes(64)
        region.persist(old, 64)
        if advance:
            self._advance_to(counter_expected)
            self._counter_value = counter_expected
            self._since_advance = 0
            self._last_advance = time.monotonic()
        else:
            self._since_advance += 1

    def _grow_to(self, end: int) -> None:
        if end > self._region.size:
            self._region.grow(L.round_up(end, 1 << 16))

    def _next_counter(self) -> tuple[int, bool]:
        if self._counter is None:
            return self._counter_value, False
        by_count = (
            self._counter_every is not None and self._since_advance + 1 >= self._counter_every
        )
        by_time = (
            self._counter_interval is not None
            and time.monotonic() - self._last_advance >= self._counter_interval
        )
        if by_count or by_time:
            return self._counter_value + 1, True
        return self._counter_value, False

    def _write_manifest(
        self,
        region: RegionLike,
        aead: Aead,
        region_id: bytes,
        root: L.Root,
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
            L.pack_root(root),
            aad("plinius/v1/mirror/root", region_id, slot, root.generation),
        )
        roff = L.ROOT_OFFSETS[slot]
        record = salt + len(sealed).to_bytes(4, "little") + sealed
        buf[roff : roff + len(record)] = record
        region.persist(roff, len(record))

    def _commit(self, region: RegionLike, gen: int, slot: int) -> None:
        # The commit point: ONE aligned 8-byte store (a numpy uint64 element),
        # never a byte-wise write that a crash could tear.
        word = np.frombuffer(region.buf, dtype="<u8", count=1, offset=L.COMMIT_OFFSET)
        word[0] = L.pack_commit(gen, slot)
        del word
        region.persist(L.COMMIT_OFFSET, 8)

    # ------------------------------------------------------------ crypto plumbing
    def _pieces(
        self,
        gen: int,
        prefix: bytes,
        chunk: int,
        i: int,
        e: L.Entry,
        buf: memoryview,
        data: np.ndarray[Any, Any],
        shared: bool = False,
    ) -> list[tuple[Any, Any, bytes, bytes]]:
        """Per chunk of tensor ``i``: (plaintext, sealed slice, nonce, aad) to encrypt, or
        the sealed slice and plaintext destination through ``_open_pieces``.

        ``prefix`` is ``aad(purpose, region id, generation)``; the rest of the
        AAD binds the tensor's index, name, kind, dtype, shape and size, and the
        chunk's index and count (concatenated TLV fields, as ``crypto.aad``).
        """
        n = L.nchunks(e.nbytes, chunk)
        static = self._static_aad(i, e, n)
        out = []
        for c in range(n):
            lo = c * chunk
            size = min(chunk, e.nbytes - lo)
            off = e.offset + c * (chunk + TAG_SIZE)
            out.append(
                (
                    data[:size] if shared else data[lo : lo + size],
                    buf[off : off + size + TAG_SIZE],
                    counter_nonce(i, _DOMAIN_TENSOR + c),
                    # (a one-piece tensor's cached AAD already ends with chunk 0's)
                    prefix + static + (_chunk_aad(c) if n > 1 else b""),
                )
            )
        return out

    def _static_aad(self, i: int, e: L.Entry, n: int) -> bytes:
        """The AAD after the prefix: the tensor's fields, and for a one-piece
        tensor (``n == 1``) its chunk's too (cached: a save needs one per tensor)."""
        k = (i, e.name, e.kind, e.dtype, e.shape, e.nbytes, n)
        cached = self._aad_cache.get(k)
        if cached is None:
            cached = aad(i, e.name, e.kind, e.dtype, e.shape, e.nbytes, n)
            if n == 1:
                cached += _chunk_aad(0)
            if len(self._aad_cache) > 1 << 16:
                self._aad_cache.clear()
            self._aad_cache[k] = cached
        return cached

    def _prefix(self, gen: int) -> bytes:
        """``aad(purpose, region id, gen)``, the start of every tensor AAD of generation ``gen``."""
        if self._prefix_cache[0] != gen:
            self._prefix_cache = (gen, aad("plinius/v1/mirror/tensor", self._sb.region_id, gen))
        return self._prefix_cache[1]

    def _open_pieces(
        self, m: L.Manifest, i: int, e: L.Entry, dst: np.ndarray[Any, Any], shared: bool = False
    ) -> list[tuple[memoryview, Any, bytes, bytes]]:
        """(sealed slice, plaintext destination, nonce, aad) per chunk of committed tensor ``i``."""
        prefix = self._prefix(m.root.generation)
        pieces = self._pieces(
            m.root.generation, prefix, m.root.chunk_bytes, i, e, self._region.buf, dst, shared
        )
        return [(sealed, plain, nonce, ad) for plain, sealed, nonce, ad in pieces]

    def _precheck_tags(self, m: L.Manifest) -> None:
        # The tags stored beside the ciphertext must be the ones the manifest
        # lists: catches swapped or replayed tensors before anything is written.
        buf = self._region.buf
        chunk = m.root.chunk_bytes
        for e in m.entries:
            for tag, end in zip(e.tags, _tag_ends(e, chunk)):
                if not hmac.compare_digest(bytes(buf[end - TAG_SIZE : end]), tag):
                    raise IntegrityError(
                        f"tensor {e.name!r} of {self._what} was replaced or damaged (its tag is "
                        "not the one the committed manifest lists); nothing was restored. Restore "
                        "the mirror from a trusted copy"
                    )

    def _run(self, jobs: list[_Job]) -> None:
        """Run jobs on up to ``threads`` threads (the caller's among them), split by bytes."""
        total = sum(j.nbytes for j in jobs)
        if self._threads == 1 or total < PARALLEL_MIN_BYTES or len(jobs) < 2:
            for j in jobs:
                j.run()
            return
        groups = _split(jobs, self._threads)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads - 1, thread_name_prefix="plinius-aead")
        futures = [self._pool.submit(_run_all, g) for g in groups[1:]]
        err: BaseException | None = None
        try:
            _run_all(groups[0])
        except BaseException as exc:
            err = exc
        for f in futures:
            try:
                f.result()
            except BaseException as exc:
                err = err or exc
        if err is not None:
            raise err

    def _info(self, verified: bool) -> MirrorInfo:
        r = self._manifest.root
        return MirrorInfo(
            generation=r.generation,
            step=r.step,
            num_tensors=r.num_tensors,
            tensor_bytes=r.tensor_bytes,
            file_bytes=self._region.size,
            saved_at=r.saved_at if r.generation > 0 else None,
            is_pmem=self._region.is_pmem,
            path=str(self._path) if self._path is not None else None,
            region_id=self._sb.region_id.hex(),
            counter_expected=r.counter_expected if r.uses_counter else None,
            counter_bound=counter_bound(r.uses_counter, r.counter_every, r.counter_interval_s),
            created_at=self._sb.created_at,
            verified=verified,
        )

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ex in (self._driver, self._pool):
            if ex is not None:
                ex.shutdown(wait=True)
        memo = getattr(self, "_memo", None)
        if memo is not None:
            memo.clear()
        region = getattr(self, "_region", None)
        if region is not None:
            with contextlib.suppress(PliniusError, BufferError, ValueError):
                region.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def counter_bound(uses_counter: bool, every: int, interval: float) -> str:
    """How far back a rolled-back copy could go undetected, in words."""
    if not uses_counter:
        return "no freshness counter: a rolled-back copy of the file would not be detected"
    if every == 1:
        return "counter advanced on every commit: any rolled-back copy is detected"
    parts = []
    if every > 1:
        parts.append(f"{every - 1} commits")
    if interval > 0:
        parts.append(f"{interval:g} seconds of commits")
    return "a rolled-back copy is detected unless it is at most " + " or ".join(parts) + " old"


@functools.lru_cache(maxsize=4096)
def _chunk_aad(c: int) -> bytes:
    return aad(c)


@functools.lru_cache(maxsize=1 << 16)
def _nonce(i: int) -> bytes:
    """The nonce of tensor ``i``'s first chunk (``_pieces`` makes the same)."""
    return counter_nonce(i, _DOMAIN_TENSOR)


def _tag_ends(e: L.Entry, chunk: int) -> list[int]:
    """Offsets just past each chunk's tag in the entry's current slot."""
    n = L.nchunks(e.nbytes, chunk)
    return [
        e.offset + c * (chunk + TAG_SIZE) + min(chunk, e.nbytes - c * chunk) + TAG_SIZE
        for c in range(n)
    ]


def _decrypt_job(
    aead: Aead,
    nonce: bytes,
    src: memoryview,
    ad: bytes,
    dst: np.ndarray[Any, Any],
    attempted: list[np.ndarray[Any, Any]],
    failed: list[BaseException],
    stop: threading.Event,
) -> Callable[[], None]:
    def run() -> None:
        if stop.is_set():
            return
        attempted.append(dst)
        try:
            aead.decrypt_into(nonce, src, ad, _mv(dst))
        except IntegrityError as exc:
            failed.append(exc)
            stop.set()

    return run


def _mv(a: Any) -> memoryview:
    """A memoryview of a numpy array's memory (no copy)."""
    return memoryview(a)


def _run_all(jobs: list[_Job]) -> None:
    for j in jobs:
        j.run()


def _split(jobs: list[_Job], n: int) -> list[list[_Job]]:
    """``n`` groups of nearly equal bytes: each job, largest first, to the least loaded group."""
    groups: list[list[_Job]] = [[] for _ in range(n)]
    loads = [0] * n
    for j in sorted(jobs, key=lambda j: -j.nbytes):
        g = loads.index(min(loads))
        groups[g].append(j)
        loads[g] += j.nbytes
    return [g for g in groups if g]


def _persist_ranges(region: RegionLike, ranges: list[tuple[int, int]]) -> None:
    merged: list[list[int]] = []
    for off, n in sorted(ranges):
        if merged and off <= merged[-1][1] + _MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], off + n)
        else:
            merged.append([off, off + n])
    for lo, hi in merged:
        region.persist(lo, hi - lo)
