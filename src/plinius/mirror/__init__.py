"""The encrypted, crash-consistent mirror of the training state in persistent memory.

::

    state = {"model": model, "optim": optimizer, "sched": scheduler, "rng": RNGState(), "epoch": 3}
    with Mirror("/dev/shm/job.plm", key) as mirror:
        step = mirror.restore(state)          # None if never saved; else loads in place
        mirror.save(state, step=step)         # returns once committed and persisted
        pending = mirror.save_async(state, step=step)
        ...                                   # forward/backward may run meanwhile
        pending.wait()                        # before the next optimizer.step()

The state is flattened into tensors and a JSON skeleton (``_flatten``); each save
encrypts every tensor straight from its memory into the region, into the slot
of its pair that the committed manifest does not reference, persists, writes
the sealed manifest, persists, then flips the commit word (one aligned 8-byte
store) and persists it. The format is in ``_format`` and docs/FORMAT.md.

**The save_async rule.** ``save_async`` copies at once everything a forward
pass may change (module buffers such as BatchNorm statistics, tensors outside
modules and optimizers, plain values, RNG states) and encrypts module
parameters and optimizer state in a background thread. The caller must call
``pending.wait()`` before the next ``optimizer.step()`` or any other in-place
change to parameters or optimizer state. A second save (or a restore, info,
verify, close) waits for a pending one first.

The package, by idea: ``_format`` (the bytes), ``_file`` (creating, opening,
locking the file; its manifests and commit word), ``_pieces`` (tensors to
sealed pieces and the threads that run them), ``_rollback`` (the freshness
counter), ``_codec``/``_flatten``/``_restore`` (the state as a skeleton and
tensors, and back). This module orders them: the commit protocol.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..counters import Counter
from ..crypto import TAG_SIZE, Aead, MasterKey
from ..errors import ConfigError, IntegrityError, PliniusError, StateMismatchError
from ..pmem import RegionLike
from ..rng import RNGState
from . import _format as fmt
from ._codec import TORCH_DTYPES, decode_plain, describe, has_refs
from ._durable import DurableCopy, restore_durable
from ._file import (
    FileLock,
    MirrorHeader,
    commit,
    describe_file,
    grow_to,
    identify,
    init_region,
    open_file,
    read_committed,
    read_previous,
    save_aead,
    take_lock,
    wipe_root,
    write_manifest,
)
from ._flatten import FlattenMemo, TensorSrc, flatten
from ._pieces import (
    PARALLEL_MIN_BYTES,
    THREADS,
    Job,
    Pieces,
    Runner,
    check_stored_tags,
    decrypt_job,
    first_nonce,
    memory_of,
    persist_ranges,
)
from ._restore import plan_restore
from ._rollback import Freshness, SetFreshness, counter_bound

__all__ = [
    "CHUNK_BYTES",
    "CommittedCopy",
    "DurableCopy",
    "PARALLEL_MIN_BYTES",
    "THREADS",
    "Mirror",
    "MirrorHeader",
    "MirrorInfo",
    "PendingSave",
    "RNGState",
    "SetFreshness",
    "TensorInfo",
    "counter_bound",
    "describe_file",
    "exclusive_lock",
    "restore_durable",
]

# Public names report their public home, not the private module that defines them.
MirrorHeader.__module__ = counter_bound.__module__ = describe_file.__module__ = __name__
SetFreshness.__module__ = __name__
DurableCopy.__module__ = restore_durable.__module__ = __name__

# Knobs. A tensor is sealed in AES-GCM pieces of at most CHUNK_BYTES (one call
# is capped at 2**31 - 1 bytes; smaller pieces also let two threads share a big
# tensor). Saves and restores above PARALLEL_MIN_BYTES use THREADS threads
# (both in ``_pieces``).
CHUNK_BYTES = 64 << 20


@dataclass(slots=True, init=False, unsafe_hash=True)
class TensorInfo(fmt.TensorMeta):
    """A committed tensor as the manifest describes it (read-only).

    Attributes:
        name: the flattened name (``"model.fc.weight"``).
        kind: ``"torch"`` or ``"numpy"``.
        dtype: a torch dtype name or a numpy dtype string.
        shape: the tensor's shape.
        nbytes: its size in bytes.
    """

    def __init__(
        self, name: str, kind: str, dtype: str, shape: tuple[int, ...], nbytes: int
    ) -> None:
        for k, v in (("name", name), ("kind", kind), ("dtype", dtype), ("shape", shape),
                     ("nbytes", nbytes)):  # fmt: skip
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")


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
    format_version: int = fmt.FORMAT_VERSION
    created_at: float = 0.0
    verified: bool = False


@dataclass(frozen=True)
class CommittedCopy:
    """A committed generation's file bytes, from :meth:`Mirror.copy_committed`.

    Attributes:
        buffer: the buffer holding them (its first ``nbytes`` bytes).
        nbytes: how many bytes were copied.
        file_size: the size the file copy must have (zeros past ``nbytes``).
        generation: the committed generation.
        step: its step (None: nothing saved yet).
        saved_at: when it was saved (Unix seconds; None for generation 0).
    """

    buffer: np.ndarray[Any, Any]
    nbytes: int
    file_size: int
    generation: int
    step: int | None
    saved_at: float | None


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
    ``keep_previous``: keep the previous committed generation readable until the
    next save starts (one process of a multi-process job, whose processes agree
    on the newest step all of them hold: see :mod:`plinius.dist`); the caller
    then saves only once every process has committed the current generation.
    ``set_freshness``: with ``keep_previous``, the mirror set's counter policy
    (:class:`SetFreshness`, made by :func:`plinius.dist.open_mirror_set`),
    instead of ``counter``.
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
        keep_previous: bool = False,
        set_freshness: SetFreshness | None = None,
    ) -> None:
        if not isinstance(key, MasterKey):
            raise ConfigError("key must be a plinius MasterKey (MasterKey.load(path))")
        if counter_every is not None and (type(counter_every) is not int or counter_every < 1):
            raise ConfigError("counter_every must be a positive integer or None")
        if counter_interval_s is not None and not (counter_interval_s > 0):
            raise ConfigError("counter_interval_s must be a positive number of seconds or None")
        if keep_previous and counter is not None:
            # Going back to the previous generation would read as a rollback to the
            # counter; the set's freshness is another design (not per process).
            raise ConfigError(
                "a mirror that keeps its previous generation (one process of a multi-process "
                "job) does not check a counter itself: give the counter to the mirror set "
                "(plinius.dist.open_mirror_set(..., counter=...)), which protects every process"
            )
        if set_freshness is not None and (counter is not None or not keep_previous):
            raise ConfigError("set_freshness is for a member of a mirror set (keep_previous)")
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
        self._keep_previous = keep_previous
        self._threads = max(1, threads if threads is not None else THREADS)
        self._lock = threading.RLock()
        self._pending: PendingSave | None = None
        self._runner = Runner(self._threads)
        self._driver: ThreadPoolExecutor | None = None
        self._file_lock: FileLock | None = None
        self._closed = False
        self._body = fmt.BodyEncoder()
        self._memo = FlattenMemo()  # the state's structure, as the last save saw it
        file = Path(path_or_region) if isinstance(path_or_region, str | os.PathLike) else None
        self._path = file if file is not None else getattr(path_or_region, "path", None)
        self._fresh = (
            set_freshness
            if set_freshness is not None
            else Freshness(
                counter, counter_every, counter_interval_s, readonly=readonly, label=self._label
            )
        )
        self._region: RegionLike
        self._in_use = 0  # where the committed manifest's extents end
        if isinstance(path_or_region, str | os.PathLike):
            self._region, self._file_lock = open_file(
                Path(path_or_region),
                readonly=readonly,
                before_create=self._fresh.check_new_allowed,
                init=self._init_region,
            )
        else:
            self._region = path_or_region
            if not readonly and not np.frombuffer(self._region.buf, dtype=np.uint8).any():
                self._fresh.check_new_allowed()
                self._init_region(self._region)
        # Only what the manifest uses is pre-faulted: by a writer at once, by a
        # reader once it reads tensors (a region object without ``populate``
        # is in memory already).
        self._populate = getattr(self._region, "populate", None)
        try:
            self._load()
            self._fresh.check_and_catch_up(self._manifest.root)
            if not readonly:
                # A writer pre-faults now, not in its first save: first-touch
                # page faults cost more than AES-GCM on the same bytes.
                self._prefault(self._in_use)
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------ opening
    @property
    def _label(self) -> str:
        """How messages name this mirror: its path, or "the mirror region"."""
        return str(self._path) if self._path is not None else "the mirror region"

    def _init_region(self, region: RegionLike) -> None:
        """Write a new mirror whose committed generation 0 is the empty state."""
        fresh = self._fresh
        init_region(
            region,
            self._key,
            counter_expected=fresh.initial_value,
            uses_counter=fresh.uses_counter,
            counter_every=fresh.every or 0,
            counter_interval_s=float(fresh.interval_s or 0.0),
            chunk_bytes=CHUNK_BYTES,
        )

    def _load(self) -> None:
        self._sb, self._mirror_key = identify(self._region, self._key, self._label)
        self._sealing = Pieces(self._sb.region_id)
        self._manifest = read_committed(
            self._region, self._mirror_key, self._sb.region_id, self._label
        )
        self._in_use = fmt.in_use_end(self._manifest)

    def _prefault(self, end: int) -> None:
        """Pre-fault the region up to ``end`` (once: cheap when it already is)."""
        if self._populate is not None:
            self._populate(end)

    # ------------------------------------------------------------ public API
    def restore(self, state: dict[str, Any], *, step: int | None = None) -> int | None:
        """Load the committed state into ``state`` in place; return its step.

        Returns None, touching nothing, if nothing was ever saved (generation 0).
        Raises :class:`StateMismatchError` before writing anything if the saved
        state does not fit ``state``, and :class:`IntegrityError` if any part
        fails authentication; if that happens part-way, the tensors already
        written are zeroed and ``state`` must not be used.

        ``step``: restore this step, the committed one or the previous one
        still held (:meth:`held_steps`). A writable mirror that goes back to
        the previous generation makes it the committed one again (one commit
        word store), and the newer one is dropped: what a multi-process job
        does when its processes agree on the newest step all of them hold.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest if step is None else self._manifest_at(step)
            if m.root.generation == 0:
                return None
            if m is self._manifest:
                return self._restore_locked(m, m.skeleton, state)
            if not self._readonly:
                self._check_writable()
            done = self._restore_locked(m, m.skeleton, state)
            if not self._readonly:
                self._go_back_to(m)
            return done

    def held_steps(self) -> list[int | None]:
        """The steps this mirror can restore: the committed one, then the previous one if held.

        ``None`` stands for generation 0 (nothing saved). A mirror opened with
        ``keep_previous`` holds the previous generation until its next save
        starts (``[3, 2]``; after its first save ``[1, None]``); others, and
        one whose previous root a crash tore or someone wiped, hold only the
        committed one (``[3]``).
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            prev = self._previous()
            held = [self._manifest.root.step]
            if prev is not None:
                held.append(prev.root.step)
            return held

    def held_counter_values(self) -> list[int | None]:
        """The freshness-counter value each held generation expects, as :meth:`held_steps`.

        ``None`` for a generation written without a counter.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            held = [self._manifest]
            prev = self._previous()
            if prev is not None:
                held.append(prev)
            return [m.root.counter_expected if m.root.uses_counter else None for m in held]

    def go_back(self) -> int | None:
        """Make the previous generation the committed one again; return its step.

        The newer generation is dropped (one commit-word store, then its root
        is wiped). What a process of a multi-process job does when the others
        did not commit its newest step. Nothing is decrypted: restore next.

        Raises:
            StateMismatchError: the previous generation is not held.
        """
        with self._lock:
            self._join_pending()
            self._check_writable()
            prev = self._previous()
            if prev is None:
                raise StateMismatchError(
                    f"{self._label} holds only step {self._manifest.root.step}: there is no "
                    "previous step to go back to"
                )
            self._go_back_to(prev)
            return prev.root.step

    def restore_model(
        self, module: torch.nn.Module, name: str = "model", *, step: int | None = None
    ) -> int | None:
        """Load only ``state[name]`` of the committed state into ``module``; return the step.

        For evaluation and export, where the optimizer and the rest of the
        training state are not at hand. Same verdicts as :meth:`restore`.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest if step is None else self._manifest_at(step)
            if m.root.generation == 0:
                return None
            for k, v in m.skeleton["items"]:
                if k == {"t": "str", "v": name}:
                    sub = {"t": "dict", "items": [[k, v]]}
                    break
            else:
                raise StateMismatchError(f"the saved state has no {name!r} entry to restore")
            return self._restore_locked(m, sub, {name: module})

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

    def info(self, *, step: int | None = None) -> MirrorInfo:
        """The committed generation, step, sizes and where the file lives.

        ``step``: describe the generation holding this step instead (the
        committed one or the previous one still held).
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest if step is None else self._manifest_at(step)
            return self._info(verified=False, m=m)

    def verify(self, *, step: int | None = None) -> MirrorInfo:
        """Authenticate every tensor of the committed generation; write nothing.

        ``step``: verify the generation holding this step instead.
        Raises :class:`IntegrityError` at the first failure.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest if step is None else self._manifest_at(step)
            self._prefault(self._in_use)
            check_stored_tags(m, self._region.buf, self._label)
            aead = save_aead(self._mirror_key, m.salt)
            largest = max((min(e.nbytes, m.root.chunk_bytes) for e in m.entries), default=0)
            scratch = np.empty(largest, dtype=np.uint8)
            for i, e in enumerate(m.entries):
                self._decrypt_entry(m, i, e, aead, scratch, shared=True)
            return self._info(verified=True, m=m)

    def read_tensors(self, prefix: str = "", *, step: int | None = None) -> dict[str, torch.Tensor]:
        """Decrypted copies of the committed tensors whose name starts with ``prefix``.

        ``step``: read this step, the committed one or the previous one still held.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            m = self._manifest if step is None else self._manifest_at(step)
            self._prefault(self._in_use)
            check_stored_tags(m, self._region.buf, self._label)
            aead = save_aead(self._mirror_key, m.salt)
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
                self._decrypt_entry(m, i, e, aead, flat)
                out[e.name] = t
            return out

    def _decrypt_entry(
        self,
        m: fmt.Manifest,
        i: int,
        e: fmt.Entry,
        aead: Aead,
        dst: np.ndarray[Any, Any],
        shared: bool = False,
    ) -> None:
        """Decrypt committed tensor ``i`` into ``dst`` (``shared``: each piece reuses it)."""
        for src, plain, nonce, ad in self._sealing.open_pieces(
            m, i, e, self._region.buf, dst, shared=shared
        ):
            try:
                aead.decrypt_into(nonce, src, ad, memory_of(plain))
            except IntegrityError as exc:
                raise IntegrityError(
                    f"tensor {e.name!r} of {self._label} fails authentication: the mirror "
                    "was tampered with or corrupted"
                ) from exc

    def committed_tensors(self) -> list[TensorInfo]:
        """Name, kind, dtype, shape and size of every committed tensor, in order."""
        with self._lock:
            self._join_pending()
            self._check_open()
            return [
                TensorInfo(e.name, e.kind, e.dtype, e.shape, e.nbytes)
                for e in self._manifest.entries
            ]

    def committed_value(self, name: str, default: Any = None) -> Any:
        """The plain value saved as ``state[name]`` (``"job"``, ``"total_steps"``, ...).

        Read from the committed manifest, which was authenticated when the
        mirror was opened: no tensor is decrypted.

        Args:
            name: a top-level key of the saved state.
            default: what to return when the state has no such entry, or
                nothing was saved yet.

        Returns:
            The value, decoded as it was saved.

        Raises:
            StateMismatchError: the entry holds tensors or Stateful objects
                (restore those with :meth:`restore`).
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            for k, v in self._manifest.skeleton["items"]:
                if k == {"t": "str", "v": name}:
                    if has_refs(v) or v.get("t") == "stateful":
                        raise StateMismatchError(
                            f"state[{name!r}] holds tensors, not a plain value; restore it"
                        )
                    return decode_plain(v)
            return default

    def copy_committed(self, out: np.ndarray[Any, Any] | None = None) -> CommittedCopy:
        """Copy the committed generation's file bytes into ``out`` (a memcpy; no decryption).

        The bytes ``[0, end of the extents the committed manifest references)``
        are copied; what lies past them is free space, so a file of ``file_size``
        bytes holding these bytes and zeros after them is a valid mirror file of
        this generation (same key, same region id). A pending save is joined
        first. The durable tier (:class:`DurableCopy`) writes such copies to disk.

        Args:
            out: a reusable uint8 buffer; replaced by a larger one when too small.

        Returns:
            The copy: its bytes (a view of the buffer), the file size to give
            it, and the generation, step and save time it holds.
        """
        with self._lock:
            self._join_pending()
            self._check_open()
            n = self._in_use
            if out is None or out.nbytes < n:
                out = np.empty(n, dtype=np.uint8)
            out[:n] = np.frombuffer(self._region.buf, dtype=np.uint8, count=n)
            r = self._manifest.root
            return CommittedCopy(
                buffer=out,
                nbytes=n,
                file_size=max(self._region.size, r.extent_end),
                generation=r.generation,
                step=r.step,
                saved_at=r.saved_at if r.generation > 0 else None,
            )

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
        return f"Mirror({self._label!r}, {mode})"

    # ------------------------------------------------------------ internals
    def _previous(self) -> fmt.Manifest | None:
        """The previous generation's manifest, while its root is intact."""
        return read_previous(
            self._region, self._mirror_key, self._sb.region_id, self._label, self._manifest
        )

    def _manifest_at(self, step: int) -> fmt.Manifest:
        """The manifest (committed or previous) that holds ``step``."""
        m = self._manifest
        if m.root.step == step:
            return m
        prev = self._previous()
        if prev is not None and prev.root.step == step:
            return prev
        held = f"step {m.root.step}" if m.root.generation else "nothing"
        if prev is not None:
            held += f" and step {prev.root.step}"
        raise StateMismatchError(f"{self._label} holds {held}, not step {step}")

    def _go_back_to(self, prev: fmt.Manifest) -> None:
        """Make the previous generation the committed one again and drop the newer one."""
        region = self._region
        dropped = self._manifest.slot
        # IMPORTANT: the commit word first (one 8-byte store), then the wipe: a
        # crash between them leaves the previous generation committed and the
        # dropped root unreachable (its generation is not the one before).
        commit(region, prev.root.generation, prev.slot)
        wipe_root(region, dropped)
        self._manifest = prev
        self._in_use = fmt.in_use_end(prev)

    def _restore_locked(
        self, m: fmt.Manifest, skeleton: dict[str, Any], state: dict[str, Any]
    ) -> int | None:
        # Nothing is written until the saved state fits the target (the plan)
        # and every stored tag is the manifest's (a swapped tensor is caught here).
        plan = plan_restore(skeleton, m.entries, state)
        self._prefault(self._in_use)
        check_stored_tags(m, self._region.buf, self._label)
        aead = save_aead(self._mirror_key, m.salt)
        jobs: list[Job] = []
        attempted: list[np.ndarray[Any, Any]] = []
        failed: list[BaseException] = []
        stop = threading.Event()
        pieces, buf = self._sealing, self._region.buf
        for d in plan.dsts:
            e = m.entries[d.index]
            for src, dst, nonce, ad in pieces.open_pieces(m, d.index, e, buf, d.buf):
                job = decrypt_job(aead, nonce, src, ad, dst, attempted, failed, stop)
                jobs.append(Job(len(dst), job))
        self._runner.run(jobs)
        if failed:
            # decrypt_into writes plaintext before it checks the tag: wipe
            # whatever reached the target so that nothing unverified is used.
            for dst in attempted:
                dst[:] = 0
            raise IntegrityError(
                f"a tensor of {self._label} (generation {m.root.generation}) fails "
                "authentication: the mirror was tampered with or corrupted. The target state "
                "was partly overwritten (those tensors are zeroed) and must not be used; "
                "restore the mirror from a trusted copy"
            ) from failed[0]
        plan.finish()
        return m.root.step

    def _check_step(self, step: int) -> None:
        if type(step) is not int or not (-(1 << 63) <= step < (1 << 63)):
            raise ConfigError(f"step must be an int that fits in 64 bits, not {describe(step)}")

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"the mirror {self._label} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise ConfigError(f"the mirror {self._label} was opened read-only; it cannot save")
        if self._file_lock is not None and self._file_lock.forked:
            raise ConfigError(
                f"the mirror {self._label} was opened by the process this one was forked from; "
                "it holds no lock here: open the mirror anew in this process to save"
            )

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
        if gen > fmt.MAX_GENERATION:
            raise ConfigError("this mirror has used every generation number; start a new mirror")
        alloc = fmt.Allocator(m)
        placed = alloc.place_tensors([(s.name, fmt.ct_len(s.nbytes, chunk)) for s in srcs])
        entries = [
            fmt.Entry(s.name, s.kind, s.dtype, s.shape, s.nbytes, slots, cap, cur)
            for s, (slots, cap, cur) in zip(srcs, placed)
        ]
        # Grow before anything refers to the new space: a crash now leaves a
        # longer file whose committed manifest never mentions the tail.
        grow_to(region, alloc.end)
        self._prefault(alloc.end)  # what this save writes, before it does
        buf = region.buf
        if self._keep_previous:
            # The caller knows every process committed the current generation:
            # the previous one is needed by no one. Wipe its root before its
            # slots are reused, so no crash leaves it naming overwritten data.
            old = fmt.ROOT_OFFSETS[slot]
            if any(buf[old : old + 64]):
                wipe_root(region, slot)
        salt = os.urandom(16)
        aead = save_aead(self._mirror_key, salt)
        sealing = self._sealing
        prefix = sealing.prefix(gen)
        static_aad = sealing.static_aad
        jobs: list[Job] = []
        sealed: list[memoryview] = []  # each piece's sealed slice, its tag last
        ranges: list[tuple[int, int]] = []
        encrypt_into = aead.encrypt_into
        for i, (s, e) in enumerate(zip(srcs, entries)):
            n, off = e.nbytes, e.slots[e.cur]
            if n <= chunk:
                # One piece (nearly every tensor): what Pieces.pieces makes, without the lists.
                dst = buf[off : off + n + TAG_SIZE]
                ad = prefix + static_aad(i, e, 1)
                run = functools.partial(encrypt_into, first_nonce(i), memory_of(s.data), ad, dst)
                jobs.append(Job(n, run))
                sealed.append(dst)
                ranges.append((off, n + TAG_SIZE))
                continue
            for src, dst, nonce, ad in sealing.pieces(prefix, chunk, i, e, buf, s.data):
                run = functools.partial(encrypt_into, nonce, memory_of(src), ad, dst)
                jobs.append(Job(len(src), run))
                sealed.append(dst)
            ranges.append((off, fmt.ct_len(n, chunk)))
        # Whatever needs no tag is done before encrypting (which leaves the
        # CPU caches full of ciphertext): the manifest body's text above all.
        pieces = self._body.prepare(skeleton, entries)
        self._runner.run(jobs)
        tags = [bytes(d[-TAG_SIZE:]) for d in sealed]  # in the order of the pieces
        k = 0
        for e in entries:
            c = fmt.nchunks(e.nbytes, chunk)
            e.tags = tags[k : k + c]
            k += c
        # IMPORTANT: the tensors are durable before the manifest that names them
        # is written, and that before the commit word that makes it current.
        persist_ranges(region, ranges)
        text = self._body.fill(pieces, entries)
        body_off, body_other, body_cap = alloc.place_body(len(text) + TAG_SIZE)
        grow_to(region, alloc.end)
        self._prefault(alloc.end)
        fresh = self._fresh
        # A set member's counter owner advances the counter to the previous
        # save's value here, before this commit (SetFreshness: the ordering).
        fresh.before_commit()
        counter_expected, advance = fresh.next_value()
        root = fmt.Root(
            generation=gen, step=step, saved_at=time.time(), counter_expected=counter_expected,
            uses_counter=fresh.uses_counter, counter_every=fresh.every or 0,
            counter_interval_s=float(fresh.interval_s or 0.0), body_off=body_off,
            body_len=0, body_other=body_other, body_cap=body_cap, body_tag=b"",
            num_tensors=len(entries), tensor_bytes=sum(e.nbytes for e in entries),
            extent_end=max(alloc.end, region.size), chunk_bytes=chunk,
        )  # fmt: skip
        write_manifest(region, aead, self._sb.region_id, root, slot, text, salt)
        commit(region, gen, slot)
        self._manifest = fmt.Manifest(root, slot, skeleton, entries, salt)
        self._in_use = alloc.end
        # The superseded root is wiped, so that rewriting the commit word alone
        # cannot roll back to it (a full-file rollback needs the counter). A
        # process of a multi-process job keeps it until its next save: the job
        # may have to go back to it (a one-step rollback, as a crash makes).
        if not self._keep_previous:
            wipe_root(region, 1 - slot)
        # Last: the counter advances only once the generation expecting it is committed.
        fresh.committed(counter_expected, advance)

    def _info(self, verified: bool, m: fmt.Manifest | None = None) -> MirrorInfo:
        r = (m or self._manifest).root
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
        if self._driver is not None:
            self._driver.shutdown(wait=True)
        self._runner.shutdown()
        memo = getattr(self, "_memo", None)
        if memo is not None:
            memo.clear()
        region = getattr(self, "_region", None)
        if region is not None:
            with contextlib.suppress(PliniusError, BufferError, ValueError):
                region.close()
        if self._file_lock is not None:
            self._file_lock.release()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold a mirror file's writer lock, without blocking, for the ``with`` block.

    The lock a writing :class:`Mirror` takes: while it is held no job can open
    the file (``plinius rm`` removes a mirror under it).

    Args:
        path: the mirror file.

    Raises:
        StorageError: another process (or a Mirror of this one) has the file
            open, or it cannot be opened.
    """
    lock = take_lock(Path(path), readonly=False)
    try:
        yield
    finally:
        lock.release()
