"""Encrypted, authenticated storage for ``torch.distributed.checkpoint`` (DCP).

::

    import torch.distributed.checkpoint as dcp
    from plinius.dcp import PliniusReader, PliniusWriter

    dcp.save(state_dict, storage_writer=PliniusWriter("ckpt/", key))
    dcp.load(state_dict, storage_reader=PliniusReader("ckpt/", key))

or, so that a failure surfaces as the plinius error rather than DCP's
``CheckpointException``: ``plinius.dcp.save(state_dict, "ckpt/", key)`` and
``plinius.dcp.load(...)``, ``plinius.dcp.async_save(...)``.

Every rank writes its items into its own data file, AES-256-GCM under a key
derived from a random per-save checkpoint id, each piece bound by AAD to the
checkpoint, file, offset, item and piece. The coordinator commits the
checkpoint by writing the sealed metadata (temporary file, fsync, rename, fsync
of the directory) only after every rank's data is durable; then it removes the
data files of the checkpoint it superseded. A crash before the rename leaves
the previous checkpoint whole: new data files have new names. Resharding is
DCP's: any number of ranks can load what any number saved. Bytes are in
``_format`` and docs/FORMAT.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.state_dict_loader import load as _dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as _dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as _dcp_save
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .._fsutil import fsync_dir, write_atomic
from ..counters import Counter
from ..crypto import TAG_SIZE, Aead, MasterKey, aad, counter_nonce
from ..errors import (
    ConfigError,
    IntegrityError,
    PliniusError,
    RollbackError,
    StorageError,
    WrongKeyError,
    storage_error,
)
from . import _format as fmt
from ._write import write_file

__all__ = [
    "METADATA_NAME",
    "CheckpointInfo",
    "PliniusReader",
    "PliniusWriter",
    "async_save",
    "load",
    "plinius_errors",
    "read_info",
    "save",
]

METADATA_NAME = fmt.METADATA_NAME
_DATA_NAME = re.compile(r"^[0-9a-f]{32}-[0-9]+\.pdcp$")


@dataclass(frozen=True)
class CheckpointInfo:
    """What the committed metadata of a checkpoint directory says (authenticated)."""

    path: str
    checkpoint_id: str
    sequence: int
    files: tuple[str, ...]
    counter_expected: int | None


@dataclass(frozen=True)
class _Table:
    """``Metadata.storage_data``: the checkpoint id and where each item lives."""

    ckpt_id: bytes
    items: dict[MetadataIndex, fmt.ItemInfo]


def _check_key(key: object) -> MasterKey:
    if not isinstance(key, MasterKey):
        raise ConfigError("key must be a plinius MasterKey (MasterKey.load(path))")
    return key


def _aead(key: MasterKey, ckpt_id: bytes) -> Aead:
    return key.aead("dcp", ckpt_id)


def _meta_aad(header: bytes) -> bytes:
    return aad("plinius/dcp/metadata", header)


def _read_exact(fd: int, offset: int, n: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _read_committed(
    directory: Path, key: MasterKey, counter: Counter | None
) -> tuple[Metadata, CheckpointInfo] | None:
    """The committed metadata of ``directory``, authenticated; None when there is none.

    Also checks that every data file it names is there and belongs to this
    checkpoint (its authenticated header names the same checkpoint id), so a
    metadata file copied from another checkpoint, or put back from an older
    save of this one, is refused here, before any tensor is read.
    """
    path = directory / METADATA_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_error(exc, f"cannot read DCP checkpoint metadata {path}") from exc
    head = fmt.unpack_meta_header(raw, str(path))
    if head.fingerprint != key.fingerprint:
        raise WrongKeyError(
            f"{path} was written under another master key; give the key it was saved with"
        )
    body_ct = raw[fmt.META_HEADER.size :]
    if len(body_ct) != head.body_len:
        raise IntegrityError(f"{path} is truncated or extended; restore it from a good copy")
    aead = _aead(key, head.ckpt_id)
    try:
        body = aead.decrypt(fmt.meta_nonce(), body_ct, _meta_aad(head.raw))
    except IntegrityError:
        raise IntegrityError(
            f"{path} failed authentication: it was modified or corrupted; "
            "restore the checkpoint from a good copy"
        ) from None
    md, extra = fmt.decode_metadata(body, str(path))
    info = CheckpointInfo(
        path=str(directory),
        checkpoint_id=head.ckpt_id.hex(),
        sequence=int(extra["sequence"]),
        files=tuple(extra["files"]),
        counter_expected=extra["counter_expected"],
    )
    _check_fresh(info, counter, path)
    for name in info.files:
        _check_data_header(directory, name, head.ckpt_id, aead)
    md = replace(md, storage_data=_Table(head.ckpt_id, md.storage_data))
    return md, info


def _check_fresh(info: CheckpointInfo, counter: Counter | None, path: Path) -> None:
    if counter is None:
        return
    value = counter.read()
    expected = info.counter_expected
    if expected is None:
        raise RollbackError(
            f"{path} was saved without a freshness counter, but one was given; "
            "a checkpoint saved with the counter was expected"
        )
    # value + 1: the save committed but a crash came before the counter advanced.
    if expected < value:
        raise RollbackError(
            f"{path} is older than the freshness counter allows (saved at {expected}, "
            f"counter at {value}): the checkpoint directory was rolled back"
        )
    if expected > value + 1:
        raise RollbackError(
            f"{path} expects counter value {expected}, the counter is at {value}: "
            "this checkpoint does not belong with this counter"
        )


def _check_data_header(directory: Path, name: str, ckpt_id: bytes, aead: Aead) -> None:
    if not _DATA_NAME.match(name):
        raise IntegrityError(f"the checkpoint metadata names an invalid data file {name!r}")
    path = directory / name
    n = fmt.DATA_HEADER.size + TAG_SIZE
    try:
        with open(path, "rb") as f:
            raw = f.read(n)
    except FileNotFoundError:
        raise IntegrityError(
            f"data file {path} named by the checkpoint metadata is missing: the metadata "
            "belongs to another or an older checkpoint, or files were removed"
        ) from None
    except OSError as exc:
        raise storage_error(exc, f"cannot read DCP data file {path}") from exc
    if len(raw) < n:
        raise IntegrityError(f"data file {path} is truncated; restore it from a good copy")
    index, file_ckpt = fmt.unpack_data_header(raw, str(path))
    if index != _file_index(name):
        raise IntegrityError(f"data file {path} holds file {index} of its checkpoint, not its own")
    header = raw[: fmt.DATA_HEADER.size]
    try:
        aead.decrypt(
            counter_nonce(0, _file_index(name)),
            raw[fmt.DATA_HEADER.size :],
            fmt.data_header_aad(header, name),
        )
    except IntegrityError:
        why = (
            "it belongs to another checkpoint"
            if file_ckpt != ckpt_id
            else "it was modified or belongs to another checkpoint"
        )
        raise IntegrityError(
            f"data file {path} failed authentication ({why}); restore the checkpoint "
            "from a good copy"
        ) from None


def read_info(path: str | os.PathLike[str], key: MasterKey) -> CheckpointInfo | None:
    """Authenticate the committed metadata of a checkpoint directory; None if there is none.

    Args:
        path: the checkpoint directory.
        key: the master key it was saved under.

    Returns:
        Its checkpoint id, sequence number and data files.

    Raises:
        WrongKeyError, IntegrityError, FormatError, StorageError: see :class:`PliniusReader`.
    """
    found = _read_committed(Path(path), _check_key(key), None)
    return None if found is None else found[1]


class PliniusWriter(StorageWriter):
    """A DCP ``StorageWriter`` that keeps the checkpoint encrypted and authenticated.

    Args:
        path: the checkpoint directory (created if missing). A later save into
            the same directory replaces the checkpoint atomically.
        key: the master key.
        counter: an optional trusted freshness counter (:mod:`plinius.counters`),
            advanced after each commit; a :class:`PliniusReader` given it then
            refuses a rolled-back directory.
        thread_count: threads per rank that encrypt and write its data file,
            as in DCP's ``FileSystemWriter``: 1 (the default) encrypts and
            writes in series; 2 encrypts the next batch while the previous one
            is written; more encrypt several batches ahead. The file's bytes
            are the same whatever the count. AES-GCM (several GB/s a core with
            AES-NI) is rarely what a save waits for: more threads pay only
            with idle cores and a disk faster than one core's AES-GCM
            (docs/BENCHMARKS.md).

    Raises (from ``dcp.save``, wrapped by DCP in ``CheckpointException``; use
    :func:`save` or :func:`plinius_errors` to get them as they are):
        WrongKeyError: the directory holds a checkpoint saved under another key
            (nothing is written).
        IntegrityError: its committed metadata fails authentication (nothing
            is written: remove the directory or choose another).
        StorageError: the file system refused.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: MasterKey,
        *,
        counter: Counter | None = None,
        thread_count: int = 1,
    ) -> None:
        super().__init__()
        self._path = Path(path)
        self._key = _check_key(key)
        self._counter = counter
        if isinstance(thread_count, bool) or not isinstance(thread_count, int) or thread_count < 1:
            raise ConfigError(f"thread_count must be a positive integer, not {thread_count!r}")
        self._threads = thread_count
        self._is_coordinator = False
        self._ckpt_id = b""
        self._previous: CheckpointInfo | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save; ``checkpoint_id``, when given, is the directory."""
        if checkpoint_id is not None:
            self._path = Path(checkpoint_id)
        self._ckpt_id = b""
        self._previous = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Note the role and create the directory."""
        self._is_coordinator = is_coordinator
        try:
            self._path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"cannot create checkpoint directory {self._path}") from exc

    def storage_meta(self) -> StorageMeta | None:
        """The checkpoint directory, as DCP records it."""
        return StorageMeta(checkpoint_id=str(self._path))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Unchanged: the coordinator assigns files."""
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Refuse a checkpoint this key may not replace; draw the checkpoint id; a file per rank."""
        # Before any rank writes: a checkpoint under another key, or one that
        # fails authentication, is never replaced.
        found = _read_committed(self._path, self._key, None)
        self._previous = None if found is None else found[1]
        self._ckpt_id = os.urandom(16)
        old = () if found is None else found[1].files
        return [
            replace(p, storage_data=fmt.FileSpec(self._ckpt_id, i, old))
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Encrypt this rank's items into its own data file and make it durable."""
        spec = plan.storage_data
        if not isinstance(spec, fmt.FileSpec):
            raise ConfigError("the save plan was not prepared by a PliniusWriter coordinator")
        aead = _aead(self._key, spec.ckpt_id)
        results = write_file(self._path, spec, plan.items, planner, aead, self._threads)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit: seal and atomically rename the metadata; then drop superseded files."""
        items = {r.index: r.storage_data for rank in results for r in rank}
        files = sorted({i.file for i in items.values()})
        prev = self._previous
        expected = None if self._counter is None else self._counter.read() + 1
        extra = {
            "sequence": 1 if prev is None else prev.sequence + 1,
            "files": files,
            "counter_expected": expected,
        }
        body = fmt.encode_metadata(metadata, items, extra)
        header = fmt.pack_meta_header(self._key.fingerprint, self._ckpt_id, len(body) + TAG_SIZE)
        sealed = _aead(self._key, self._ckpt_id).encrypt(fmt.meta_nonce(), body, _meta_aad(header))
        # IMPORTANT: every rank's data file is durable (write_data fsyncs it and
        # the directory) before this rename, which is the commit point.
        write_atomic(self._path / METADATA_NAME, header + sealed, what="DCP checkpoint metadata")
        if self._counter is not None:
            self._counter.increment()
        _remove_unreferenced(self._path, set(files))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Any path can name a checkpoint directory."""
        return isinstance(checkpoint_id, str | os.PathLike)


def _remove_unreferenced(directory: Path, keep: set[str]) -> None:
    """Remove data files the committed metadata does not name (superseded or orphaned)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if _DATA_NAME.match(entry.name) and entry.name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        fsync_dir(directory)


class PliniusReader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints written by :class:`PliniusWriter`.

    Every item is authenticated before DCP sees its bytes; resharding (loading
    with another number of ranks than saved) is DCP's and works as with its
    own reader.

    Args:
        path: the checkpoint directory.
        key: the master key it was saved under.
        counter: the freshness counter the writer advanced, if any.

    Raises (from ``dcp.load``, wrapped by DCP in ``CheckpointException``; use
    :func:`load` or :func:`plinius_errors` to get them as they are):
        StorageError: there is no committed checkpoint in ``path``.
        WrongKeyError: it was saved under another key.
        IntegrityError: the metadata or an item fails authentication, or a data
            file is missing, truncated or from another checkpoint.
        RollbackError: the directory is older than ``counter`` allows.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: MasterKey,
        *,
        counter: Counter | None = None,
    ) -> None:
        super().__init__()
        self._path = Path(path)
        self._key = _check_key(key)
        self._counter = counter
        self._table: _Table | None = None
        self.failure: PliniusError | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load; ``checkpoint_id``, when given, is the directory."""
        if checkpoint_id is not None:
            self._path = Path(checkpoint_id)
        self._table = None

    # No *args/**kwargs: DCP then does not retry with a rank-local metadata file.
    def read_metadata(self) -> Metadata:  # type: ignore[override]
        """Authenticate the committed metadata and the data files' headers."""
        try:
            found = _read_committed(self._path, self._key, self._counter)
            if found is None:
                raise StorageError(
                    f"{self._path} holds no committed plinius DCP checkpoint "
                    f"(no {METADATA_NAME}); check the path"
                )
        except PliniusError as exc:
            # DCP turns a failed metadata read into an AssertionError that
            # keeps only the text: remember the error for plinius_errors().
            self.failure = exc
            raise
        return found[0]

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """Take the item table from the (authenticated) metadata."""
        table = metadata.storage_data
        if not isinstance(table, _Table):
            raise ConfigError("the metadata was not read by a PliniusReader")
        self._table = table

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Unchanged."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Unchanged."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Authenticate and decrypt each requested item, then hand it to the planner."""
        table = self._table
        if table is None:
            raise ConfigError("read_data before set_up_storage_reader")
        aead = _aead(self._key, table.ckpt_id)
        per_file: dict[str, list[ReadItem]] = {}
        for req in plan.items:
            per_file.setdefault(_info(table, req).file, []).append(req)
        for name, reqs in per_file.items():
            path = self._path / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise storage_error(exc, f"cannot open DCP data file {path}") from exc
            try:
                cached: tuple[MetadataIndex, torch.Tensor] | None = None
                for req in sorted(reqs, key=lambda r: _info(table, r).offset):
                    info = _info(table, req)
                    if req.type == LoadItemType.BYTE_IO:
                        raw = _decrypt_item(fd, path, table.ckpt_id, info, req, "bytes", aead)
                        planner.load_bytes(req, io.BytesIO(raw.tobytes()))
                        continue
                    # Resharding asks for several slices of one stored chunk:
                    # decrypt it once.
                    if cached is None or cached[0] != req.storage_index:
                        raw = _decrypt_item(fd, path, table.ckpt_id, info, req, "tensor", aead)
                        cached = (req.storage_index, _as_tensor(raw, info, path))
                    src = _narrow(cached[1], req)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != src.size():
                        raise IntegrityError(
                            f"{path}: item {req.storage_index.fqn} has shape "
                            f"{tuple(src.shape)}, the load plan wants {tuple(target.shape)}"
                        )
                    target.copy_(src)
                    planner.commit_tensor(req, target)
            finally:
                os.close(fd)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Any path can name a checkpoint directory."""
        return isinstance(checkpoint_id, str | os.PathLike)


def _info(table: _Table, req: ReadItem) -> fmt.ItemInfo:
    try:
        return table.items[req.storage_index]
    except KeyError:
        raise IntegrityError(
            f"the checkpoint has no stored item {req.storage_index.fqn} at "
            f"{tuple(req.storage_index.offset or ())}"
        ) from None


def _decrypt_item(
    fd: int,
    path: Path,
    ckpt_id: bytes,
    info: fmt.ItemInfo,
    req: ReadItem,
    kind: str,
    aead: Aead,
) -> np.ndarray[Any, np.dtype[np.uint8]]:
    need = fmt.stored_length(info.nbytes)
    try:
        stored = _read_exact(fd, info.offset, need)
    except OSError as exc:
        raise storage_error(exc, f"cannot read DCP data file {path}") from exc
    if len(stored) != need:
        raise IntegrityError(f"data file {path} is truncated; restore it from a good copy")
    out = np.empty(info.nbytes, dtype=np.uint8)
    src = memoryview(stored)
    pos = 0
    for p, (o, n) in enumerate(fmt.piece_spans(info.nbytes)):
        try:
            aead.decrypt_into(
                counter_nonce(info.nonce + p, _file_index(info.file)),
                src[pos : pos + n + TAG_SIZE],
                fmt.item_aad(ckpt_id, info, req.storage_index, p, kind),
                out[o : o + n].data,
            )
        except IntegrityError:
            out.fill(0)  # never let unauthenticated plaintext out
            raise IntegrityError(
                f"{path}: item {req.storage_index.fqn} failed authentication (modified, "
                "swapped or from another checkpoint); restore the checkpoint from a good copy"
            ) from None
        pos += n + TAG_SIZE
    return out


def _file_index(name: str) -> int:
    return int(name[: -len(fmt.DATA_SUFFIX)].rpartition("-")[2])


def _as_tensor(raw: np.ndarray[Any, Any], info: fmt.ItemInfo, path: Path) -> torch.Tensor:
    if info.dtype is None or info.shape is None:
        raise IntegrityError(f"{path}: a tensor item without dtype or shape")
    dtype = fmt.dtype_of(info.dtype)
    t = torch.from_numpy(raw).view(dtype) if raw.nbytes else torch.empty(0, dtype=dtype)
    if t.numel() != int(np.prod(info.shape, dtype=np.int64)):
        raise IntegrityError(f"{path}: a tensor item's size does not match its shape")
    return t.reshape(info.shape)


def _narrow(t: torch.Tensor, req: ReadItem) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
        if start < 0 or length < 0 or start + length > t.shape[dim]:
            raise IntegrityError("a load request reaches outside the stored tensor chunk")
        t = t.narrow(dim, start, length)
    return t


# ---------------------------------------------------------------- convenience
def _plinius_cause(exc: CheckpointException) -> PliniusError | None:
    for failure in exc.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, PliniusError):
            return cause
    return None


@contextlib.contextmanager
def plinius_errors(reader: PliniusReader | None = None) -> Iterator[None]:
    """Re-raise a DCP failure caused by plinius as that plinius error.

    DCP wraps what a storage layer raises in a ``CheckpointException`` (and a
    failed metadata read in an ``AssertionError`` holding only its text; give
    the ``reader`` to get that one back)::

        reader = PliniusReader(path, key)
        with plinius_errors(reader):
            dcp.load(sd, storage_reader=reader)
    """
    if reader is not None:
        reader.failure = None
    root = logging.getLogger()  # DCP's loader logs a failed metadata read there
    root.addFilter(_drop_plinius_tracebacks)
    try:
        yield
    except CheckpointException as exc:
        cause = _plinius_cause(exc)
        if cause is None and reader is not None:
            cause = reader.failure
        if cause is None:
            raise
        raise cause from exc
    finally:
        root.removeFilter(_drop_plinius_tracebacks)


def _drop_plinius_tracebacks(record: logging.LogRecord) -> bool:
    """Drop DCP's warning (with traceback) about an error plinius reports itself."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, PliniusError)


def save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    key: MasterKey,
    *,
    counter: Counter | None = None,
    **kwargs: Any,
) -> None:
    """``dcp.save`` into an encrypted checkpoint directory; plinius errors raised as they are.

    Args:
        state_dict: what to save (DCP's rules: tensors, DTensors, Stateful objects, values).
        path: the checkpoint directory.
        key: the master key.
        counter: see :class:`PliniusWriter`.
        **kwargs: passed to ``torch.distributed.checkpoint.save`` (``process_group``, ...).
    """
    with plinius_errors():
        _dcp_save(state_dict, storage_writer=PliniusWriter(path, key, counter=counter), **kwargs)


def async_save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    key: MasterKey,
    *,
    counter: Counter | None = None,
    **kwargs: Any,
) -> Any:
    """``dcp.async_save`` into an encrypted checkpoint directory.

    Returns DCP's future; call :func:`plinius_errors` around its ``result()``
    to get a plinius error as it is.
    """
    with plinius_errors():
        return _dcp_async_save(
            state_dict, storage_writer=PliniusWriter(path, key, counter=counter), **kwargs
        )


def load(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    key: MasterKey,
    *,
    counter: Counter | None = None,
    **kwargs: Any,
) -> None:
    """``dcp.load`` from an encrypted checkpoint directory, in place; plinius errors as they are.

    Args:
        state_dict: the target (DCP loads in place, resharding as needed).
        path: the checkpoint directory.
        key: the master key.
        counter: see :class:`PliniusReader`.
        **kwargs: passed to ``torch.distributed.checkpoint.load``.
    """
    reader = PliniusReader(path, key, counter=counter)
    with plinius_errors(reader):
        _dcp_load(state_dict, storage_reader=reader, **kwargs)
