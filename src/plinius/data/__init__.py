"""Sealed training datasets: the data owner seals once; training decrypts only what a batch needs.

::

    from plinius.data import seal_dataset, SealedDataset, SealedSampler

    ds_id = seal_dataset("/dev/shm/mnist.pld", key, {"image": X, "label": y})
    with SealedDataset("/dev/shm/mnist.pld", key, expect_id=ds_id) as ds:
        sampler = SealedSampler(ds, seed=0, shuffle="chunk")
        for idx in sampler.batches(128):
            image, label = ds.get_batch(idx)
            ...                               # train on the batch
            sampler.advance(len(idx))         # only now is the batch consumed

File layout (format version 1, little-endian; docs/FORMAT.md is the contract)::

    0    magic b"PLINIUSD" | u32 version | u32 header length H | 16-byte dataset id
         | 16-byte key fingerprint                                        (48 bytes)
    48   header: canonical JSON, H bytes (records, chunking, fields, layout), then
         zero padding
    D-32 HMAC-SHA256 over bytes [0, D-32) under HKDF(master, dataset id, "data-header")
    D    chunks, chunk-major: for chunk c, for field f: ciphertext of the chunk's
         records of f, then the 16-byte GCM tag. D = 48+H+32 rounded up to a multiple of 64.

Each field has its own key, HKDF(master, salt=dataset id, info="data/" + name), so
the counter nonce (the chunk index) never repeats under a key: not across
fields, not across datasets (the dataset id is random per seal). The AAD binds
the dataset id, the field (index and name), the chunk index and its record
count. Reordered, moved, truncated or edited chunks therefore fail
authentication (:class:`IntegrityError`); another key fails the fingerprint
check before anything is decrypted (:class:`WrongKeyError`); a dataset swapped
for another one sealed under the same key has another id (``expect_id``).
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing.context
import operator
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..crypto import MAX_AEAD_BYTES, TAG_SIZE, MasterKey, counter_nonce
from ..errors import (
    ConfigError,
    DatasetIndexError,
    FormatError,
    IntegrityError,
    StorageError,
)
from ..pmem import Region
from ._format import (
    CACHE_BYTES_LIMIT,
    DEFAULT_CACHE_CHUNKS,
    DEFAULT_CHUNK_BYTES,
    DTYPES,
    HEADER_PURPOSE,
    ID_SIZE,
    MAC_SIZE,
    MAGIC,
    MAX_DEFAULT_CHUNK_RECORDS,
    MAX_FIELDS,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    MAX_RECORDS,
    PREFIX,
    SUPPORTED_DTYPES,
    VERSION,
    DatasetKeys,
    FieldInfo,
    Header,
    Layout,
    authenticate_header,
    check_expected,
    check_fingerprint,
    check_name,
    data_offset_for,
    field_aad,
    field_aad_prefix,
    header_json,
    header_mac,
    map_readonly,
    normalize_id,
    parse_header,
    read_prefix,
)
from ._sampler import DEFAULT_WINDOW_CHUNKS, SealedSampler, ShuffleMode

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_WINDOW_CHUNKS",
    "SUPPORTED_DTYPES",
    "FieldInfo",
    "SealedDataset",
    "SealedSampler",
    "ShuffleMode",
    "default_chunk_records",
    "describe_dataset",
    "inspect_dataset",
    "seal_dataset",
]

# Public names report their public home, not the private module that defines them.
FieldInfo.__module__ = SealedSampler.__module__ = __name__


# -- reading -------------------------------------------------------------------


class _Arena:
    """Reusable plaintext buffers for ``slots`` chunks: one array per field.

    Slot k holds its chunk's records of field f in rows ``[k*R, (k+1)*R)`` of
    ``fields[f]``, so the records of a batch whose chunks are all cached are
    gathered with one ``np.take`` per field through ``slot_of`` (chunk ->
    slot, -1 if not cached).
    """

    __slots__ = ("chunk_in", "fields", "last", "slot_of")

    def __init__(self, layout: Layout, slots: int) -> None:
        r = layout.chunk_records
        self.fields = [np.empty((slots * r, b), dtype=np.uint8) for b in layout.record_bytes]
        self.slot_of = np.full(layout.num_chunks, -1, dtype=np.int64)
        self.chunk_in = [-1] * slots
        self.last = np.zeros(slots, dtype=np.int64)  # use tick of each slot (LRU)


class SealedDataset(Dataset[tuple[torch.Tensor, ...]]):
    """A sealed dataset file, as a map-style :class:`torch.utils.data.Dataset`.

    ``ds[i]`` is a tuple of tensors, one per field in field order (the first
    field is the model input, the last the label); ``ds.get_batch(indices)``
    returns the batched tensors and is the fast path. Chunks are authenticated
    when first decrypted; :meth:`verify` checks them all.

    Args:
        path: the file :func:`seal_dataset` (or ``plinius seal``) wrote.
        key: the master key it was sealed under.
        expect_id: the dataset id (32 hex digits) the caller requires; a file
            sealed under the same key but holding another dataset is refused.
        cache_chunks: decrypted chunks kept in an LRU cache (at most 64 MiB).

    Raises:
        WrongKeyError: the file was sealed under another master key.
        IntegrityError: the header fails authentication, or the file is not
            ``expect_id``, or (on reading) a chunk fails authentication.
        FormatError: not a sealed dataset, or an unsupported version.
        StorageError: the file is missing or unreadable.
        ConfigError: a bad argument.

    Only the chunks a batch needs are decrypted, straight from the mapped file
    into reusable buffers, so sequential and chunk-shuffled reading never
    decrypts a chunk twice. Reads from several threads are serialized by an
    internal lock.

    With a :class:`~torch.utils.data.DataLoader`: ``num_workers=0`` or forked
    workers (Linux' default) inherit the mapping; spawn and forkserver workers
    receive the dataset's derived keys (never the master key) when the
    DataLoader starts them. Pickling it anywhere else is refused, so the keys
    cannot end up in a file by accident.

    Example::

        ds = SealedDataset("/dev/shm/mnist.pld", key, expect_id=ds_id)
        images, labels = ds.get_batch([0, 5, 7])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: MasterKey,
        *,
        expect_id: str | None = None,
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
    ) -> None:
        if not isinstance(key, MasterKey):
            raise ConfigError("key must be a plinius MasterKey (see MasterKey.load)")
        if type(cache_chunks) is not int or cache_chunks < 1:
            raise ConfigError("cache_chunks must be a positive integer")
        self._path = Path(path)
        want = normalize_id(expect_id)
        self._mm: mmap.mmap | None = None
        self._buf: memoryview | None = None
        mm = map_readonly(self._path)
        try:
            buf = memoryview(mm)
            try:
                hdr = read_prefix(buf, self._path)
                check_fingerprint(hdr, key.fingerprint, self._path)
                # Derive keys only for names we can trust: from the authenticated header.
                header_key = key.derive(HEADER_PURPOSE, hdr.dataset_id)
                layout = authenticate_header(buf, hdr, header_key, self._path)
                check_expected(hdr.dataset_id, want, self._path)
                keys = DatasetKeys.derive(key, hdr.dataset_id, [f.name for f in layout.fields])
            except BaseException:
                buf.release()
                raise
        except BaseException:
            with contextlib.suppress(BufferError):  # else unmapped when collected
                mm.close()
            raise
        self._setup(mm, buf, hdr, layout, keys, cache_chunks)

    def _setup(
        self,
        mm: mmap.mmap,
        buf: memoryview,
        hdr: Header,
        layout: Layout,
        keys: DatasetKeys,
        cache_chunks: int,
    ) -> None:
        self._mm = mm
        self._buf = buf
        self._hdr = hdr
        self._layout = layout
        self._keys = keys
        self._aad = [
            field_aad_prefix(hdr.dataset_id, f, fi.name) for f, fi in enumerate(layout.fields)
        ]
        chunk_bytes = sum(layout.chunk_records * f.record_bytes for f in layout.fields)
        self._cache_chunks = max(1, min(cache_chunks, CACHE_BYTES_LIMIT // max(1, chunk_bytes)))
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        # Per process: a fresh lock (one inherited through fork may be held by a
        # thread that does not exist in the child) and an empty cache.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._arena: _Arena | None = None  # allocated on first read
        self._tick = 0
        self._decrypted = 0

    # -- metadata ---------------------------------------------------------
    @property
    def path(self) -> Path:
        """The dataset file."""
        return self._path

    @property
    def dataset_id(self) -> str:
        """The random id chosen when the dataset was sealed (32 hex digits)."""
        return self._hdr.dataset_id.hex()

    @property
    def key_fingerprint(self) -> str:
        """The fingerprint of the key it was sealed under (hex)."""
        return self._hdr.fingerprint.hex()

    @property
    def fields(self) -> list[FieldInfo]:
        """The fields in order: name, torch dtype and per-record shape."""
        return list(self._layout.fields)

    @property
    def num_chunks(self) -> int:
        """How many chunks the records are sealed in."""
        return self._layout.num_chunks

    @property
    def chunk_records(self) -> int:
        """Records per chunk (the last chunk may hold fewer)."""
        return self._layout.chunk_records

    @property
    def chunks_decrypted(self) -> int:
        """Diagnostic: chunk decryptions (all fields of a chunk count once) in this process."""
        return self._decrypted

    def __len__(self) -> int:
        return self._layout.records

    # -- reading ----------------------------------------------------------
    def _check_process(self) -> None:
        # Before taking the lock: in a forked child the inherited lock may be
        # held forever by a parent thread that was not copied.
        if self._pid != os.getpid():
            self._reset_process_state()

    def _view(self) -> memoryview:
        if self._buf is None:
            raise StorageError(f"dataset {self._path} is closed")
        return self._buf

    def _decrypt_chunk(self, buf: memoryview, c: int, dst: list[np.ndarray[Any, Any]]) -> None:
        """Authenticate and decrypt chunk ``c`` of every field into ``dst`` (flat byte arrays)."""
        n = self._layout.chunk_len(c)
        nonce = counter_nonce(c)
        for f, (off, plain) in enumerate(self._layout.spans(c)):
            src = buf[off : off + plain + TAG_SIZE]
            try:
                self._keys.aeads[f].decrypt_into(
                    nonce, src, field_aad(self._aad[f], c, n), dst[f][:plain].data
                )
            except IntegrityError as exc:
                del src  # no view into the mapping may live on in the traceback
                raise IntegrityError(
                    f"{self._path}: chunk {c} of field {self._layout.fields[f].name!r} failed "
                    "authentication: tampered with, corrupted or moved; re-seal it from the "
                    "source data"
                ) from exc

    def _fill(self, arena: _Arena, buf: memoryview, c: int, tick: int) -> None:
        """Decrypt chunk ``c`` into the least recently used slot not used at ``tick``."""
        slot = int(np.argmin(arena.last))
        assert arena.last[slot] < tick  # callers never need more chunks at once than slots
        old = arena.chunk_in[slot]
        if old >= 0:
            arena.slot_of[old] = -1
        arena.chunk_in[slot] = -1
        arena.last[slot] = 0
        r = self._layout.chunk_records
        # On failure the slot may hold unauthenticated plaintext: it stays
        # unassigned (and least recently used), so it is never served.
        self._decrypt_chunk(
            buf, c, [a[slot * r : (slot + 1) * r].reshape(-1) for a in arena.fields]
        )
        self._decrypted += 1
        arena.chunk_in[slot] = c
        arena.slot_of[c] = slot
        arena.last[slot] = tick

    def _indices(
        self, indices: Sequence[int] | torch.Tensor | np.ndarray[Any, Any]
    ) -> np.ndarray[Any, Any]:
        """Indices as int64 in ``[0, len)``."""
        if isinstance(indices, torch.Tensor):
            arr = indices.detach().cpu().numpy()
        else:
            arr = np.asarray(indices)
        if arr.ndim != 1:
            raise ConfigError(f"indices must be one-dimensional, not of shape {tuple(arr.shape)}")
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu":  # bool is kind "b": refused too
            raise ConfigError(f"indices must be integers, not {arr.dtype}")
        n = self._layout.records
        if arr.dtype == np.uint64 and int(arr.max()) >= n:  # would wrap in int64
            raise DatasetIndexError(f"index {int(arr.max())} is out of range for {n} records")
        idx = arr.astype(np.int64, copy=False)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 and lo >= -n:
            idx = np.where(idx < 0, idx + n, idx)
            lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            bad = int(arr[np.flatnonzero((idx < 0) | (idx >= n))[0]])
            raise DatasetIndexError(f"index {bad} is out of range for {n} records")
        return idx

    def get_batch(
        self, indices: Sequence[int] | torch.Tensor | np.ndarray[Any, Any]
    ) -> tuple[torch.Tensor, ...]:
        """The records at ``indices`` as one batched tensor per field (the fast path).

        Decrypts each chunk the batch touches once (or finds it in the cache),
        then copies the requested records out.

        Args:
            indices: record numbers; negative ones count from the end.

        Returns:
            One tensor per field, of shape ``(len(indices), *field shape)``,
            freshly allocated and owned by the caller.

        Raises:
            DatasetIndexError: an index out of range (also an ``IndexError``).
            IntegrityError: a chunk fails authentication (nothing of it is returned).
        """
        idx = self._indices(indices)
        lay = self._layout
        b = len(idx)
        outs = [torch.empty(b * rb, dtype=torch.uint8) for rb in lay.record_bytes]
        outs2d = [o.numpy().reshape(b, rb) for o, rb in zip(outs, lay.record_bytes)]
        if b:
            self._check_process()
            with self._lock:
                self._gather(idx, outs2d)
        return tuple(o.view(f.dtype).view(b, *f.shape) for o, f in zip(outs, lay.fields))

    def _gather(self, idx: np.ndarray[Any, Any], outs2d: list[np.ndarray[Any, Any]]) -> None:
        buf = self._view()
        arena = self._arena
        if arena is None:
            arena = self._arena = _Arena(self._layout, self._cache_chunks)
        r = self._layout.chunk_records
        chunks = idx // r
        local = idx - chunks * r
        self._tick += 1
        tick = self._tick
        slots = arena.slot_of[chunks]
        if bool((slots >= 0).all()):  # every chunk cached: one gather per field
            arena.last[slots] = tick
            rows = slots * r + local
            for dst, src in zip(outs2d, arena.fields):
                np.take(src, rows, axis=0, out=dst, mode="clip")
            return
        need = np.unique(chunks)
        k = len(arena.chunk_in)
        # In rounds of at most k chunks (one round unless the batch touches
        # more chunks than the cache holds, as a fully shuffled batch may).
        # The cached chunks of a round are marked used first, so decrypting the
        # missing ones never evicts a chunk the round needs.
        for g in range(0, len(need), k):
            if g:
                self._tick += 1
                tick = self._tick
            group = need[g : g + k]
            have = arena.slot_of[group]
            arena.last[have[have >= 0]] = tick
            for c in group[have < 0].tolist():
                self._fill(arena, buf, c, tick)
            if len(need) <= k:
                sel: slice | np.ndarray[Any, Any] = slice(None)
            else:  # ``need`` is sorted: the round's chunks are a range
                sel = np.flatnonzero((chunks >= group[0]) & (chunks <= group[-1]))
            rows = arena.slot_of[chunks[sel]] * r + local[sel]
            for dst, src in zip(outs2d, arena.fields):
                dst[sel] = src[rows]

    def __getitem__(self, index: Any) -> Any:
        """``ds[i]``: one record as a tuple of tensors. A list, array, tensor or
        slice of indices returns :meth:`get_batch` of them."""
        if isinstance(index, slice):
            return self.get_batch(np.arange(len(self))[index])
        if isinstance(index, torch.Tensor | np.ndarray) and index.ndim == 0:
            index = index.item()
        if isinstance(index, Sequence | torch.Tensor | np.ndarray):
            return self.get_batch(index)
        try:
            i = operator.index(index)
        except TypeError as exc:
            raise ConfigError(f"dataset indices are integers, not {type(index).__name__}") from exc
        batch = self.get_batch([i])
        return tuple(t[0] for t in batch)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """A DataLoader's fetcher calls this per batch: one decryption pass, then views."""
        batch = self.get_batch(indices)
        return [tuple(t[i] for t in batch) for i in range(len(indices))]

    def verify(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Authenticate every chunk of every field.

        Args:
            progress: called as ``progress(chunks done, chunks in all)``.

        Raises:
            IntegrityError: names the first chunk and field that fail.
        """
        lay = self._layout
        self._check_process()
        with self._lock:
            buf = self._view()
            scratch = [np.empty(lay.chunk_records * b, dtype=np.uint8) for b in lay.record_bytes]
            for c in range(lay.num_chunks):
                self._decrypt_chunk(buf, c, scratch)
                if progress is not None:
                    progress(c + 1, lay.num_chunks)

    # -- lifecycle --------------------------------------------------------
    def close(self) -> None:
        """Unmap the file and drop the cached plaintext. Idempotent."""
        self._arena = None
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mm is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._mm.close()
            self._mm = None

    def __enter__(self) -> SealedDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if not hasattr(self, "_layout"):
            return f"SealedDataset({str(self._path)!r}, <not opened>)"
        names = ", ".join(f.name for f in self._layout.fields)
        return (
            f"SealedDataset({str(self._path)!r}, records={len(self)}, fields=[{names}], "
            f"id={self.dataset_id})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Only a DataLoader (or multiprocessing) starting a spawn/forkserver
        # worker may move the dataset to another process: the pickle then goes
        # through a pipe to the child, never to a file. The child gets the
        # derived keys of this dataset only, and re-checks the file it maps.
        if multiprocessing.context.get_spawning_popen() is None:
            raise ConfigError(
                "a SealedDataset holds key material and cannot be pickled; open it again "
                "with SealedDataset(path, key) where it is needed"
            )
        k = self._keys
        return (
            _rebuild,
            (
                str(self._path),
                self._hdr.dataset_id,
                self._hdr.mac,
                k.fingerprint,
                k.header_key,
                list(k.field_keys),
                self._cache_chunks,
            ),
        )


def _rebuild(
    path: str,
    dataset_id: bytes,
    mac: bytes,
    fingerprint: bytes,
    header_key: bytes,
    field_keys: list[bytes],
    cache_chunks: int,
) -> SealedDataset:
    """Reopen a dataset in a spawned worker and check it is the very file the parent opened."""
    p = Path(path)
    ds = SealedDataset.__new__(SealedDataset)
    ds._path = p
    mm = map_readonly(p)
    buf = memoryview(mm)
    try:
        hdr = read_prefix(buf, p)
        check_fingerprint(hdr, fingerprint, p)
        if hdr.mac != mac:  # the host replaced the file between parent and worker
            raise IntegrityError(f"{p} changed after it was opened; refusing to read it")
        layout = authenticate_header(buf, hdr, header_key, p)
        check_expected(hdr.dataset_id, dataset_id, p)
        if len(field_keys) != len(layout.fields):
            raise IntegrityError(f"{p} changed after it was opened; refusing to read it")
    except BaseException:
        buf.release()
        with contextlib.suppress(BufferError):  # else unmapped when collected
            mm.close()
        raise
    ds._setup(mm, buf, hdr, layout, DatasetKeys(fingerprint, header_key, field_keys), cache_chunks)
    return ds


# -- sealing -------------------------------------------------------------------


@dataclass
class _Source:
    name: str
    array: np.ndarray[Any, Any]  # records on dim 0; may be non-contiguous or big-endian
    info: FieldInfo
    is_bfloat16: bool = False


def _as_source(name: str, value: object) -> _Source:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in DTYPES:
            raise ConfigError(
                f"field {name!r} has unsupported dtype {t.dtype}; use one of {', '.join(DTYPES)}"
            )
        if t.is_sparse or t.layout != torch.strided:
            raise ConfigError(f"field {name!r} is not a dense tensor; call .to_dense() first")
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: carry the raw 16-bit words
            arr = t.contiguous().view(torch.int16).numpy()
        else:
            arr = t.resolve_conj().resolve_neg().numpy()
        shape = tuple(t.shape)
    elif isinstance(value, np.ndarray):
        arr = value
        dt = arr.dtype.name
        if arr.dtype.fields is not None or dt not in DTYPES or DTYPES[dt][1] is None:
            raise ConfigError(
                f"field {name!r} has unsupported dtype {arr.dtype}; use one of "
                f"{', '.join(d for d in DTYPES if d != 'bfloat16')} (or a bfloat16 tensor)"
            )
        shape = tuple(arr.shape)
    else:
        raise ConfigError(
            f"field {name!r} is a {type(value).__name__}; give a numpy array or a torch tensor"
        )
    if len(shape) < 1:
        raise ConfigError(f"field {name!r} is a scalar; dimension 0 must index the records")
    if len(shape) - 1 > MAX_NDIM:
        raise ConfigError(f"field {name!r} has more than {MAX_NDIM} dimensions per record")
    if any(d == 0 for d in shape[1:]):
        raise ConfigError(f"field {name!r} has records of zero elements (shape {shape})")
    return _Source(name, arr, FieldInfo(name, DTYPES[dt][0], shape[1:]), dt == "bfloat16")


def _chunk_bytes(src: _Source, a: int, b: int) -> memoryview:
    """Records ``[a, b)`` of a field as contiguous little-endian bytes (copies only that chunk)."""
    part = src.array[a:b]
    if part.dtype.byteorder == ">" or (part.dtype.byteorder == "=" and not _LITTLE):
        part = part.astype(part.dtype.newbyteorder("<"))
    part = np.ascontiguousarray(part)
    return part.reshape(-1).view(np.uint8).data


_LITTLE = np.little_endian


def default_chunk_records(record_bytes: int, records: int) -> int:
    """Records per chunk for ``record_bytes`` bytes per record (all fields): about 256 KiB."""
    r = max(1, min(MAX_DEFAULT_CHUNK_RECORDS, DEFAULT_CHUNK_BYTES // max(1, record_bytes)))
    return min(r, records)


def seal_dataset(
    path: str | os.PathLike[str],
    key: MasterKey,
    fields: Mapping[str, np.ndarray[Any, Any] | torch.Tensor],
    *,
    chunk_records: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Seal ``fields`` into a new sealed dataset file at ``path``.

    The file is built under a temporary name in the same directory, persisted,
    renamed into place and the directory fsynced, so an interrupted seal never
    leaves a file that opens.

    Args:
        path: the file to write (a ``/dev/shm`` path keeps it in emulated PM).
        key: the data owner's master key.
        fields: name -> array or tensor; dimension 0 indexes the records, and
            every field has the same record count. Order is kept: the first
            field is the model input, the last the label.
        chunk_records: records per AES-GCM chunk (default: about 256 KiB a chunk).
        overwrite: replace an existing ``path`` (refused otherwise).
        progress: called as ``progress(records sealed, records in all)``.

    Returns:
        The new dataset id (32 hex digits); a trainer can require it with
        ``SealedDataset(path, key, expect_id=...)``.

    Raises:
        ConfigError: record counts that differ, object or unsupported dtypes,
            no records, bad names; all checked before anything is written.
        StorageError: ``path`` exists (without ``overwrite``), its directory is
            missing, or the disk is full (the temporary file is removed).
    """
    if not isinstance(key, MasterKey):
        raise ConfigError("key must be a plinius MasterKey (see MasterKey.load)")
    if not isinstance(fields, Mapping) or not fields:
        raise ConfigError("give at least one field, e.g. {'image': X, 'label': y}")
    if len(fields) > MAX_FIELDS:
        raise ConfigError(f"at most {MAX_FIELDS} fields are supported")
    sources = [_as_source(check_name(name, "seal_dataset"), v) for name, v in fields.items()]
    counts = {s.name: int(s.array.shape[0]) for s in sources}
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise ConfigError(
            f"all fields need the same number of records (dimension 0); got {listing}"
        )
    records = next(iter(counts.values()))
    if records == 0:
        raise ConfigError("the dataset is empty (0 records); nothing to seal")
    if records > MAX_RECORDS:
        raise ConfigError(f"at most {MAX_RECORDS} records are supported")
    infos = tuple(s.info for s in sources)
    per_record = sum(f.record_bytes for f in infos)
    if chunk_records is None:
        r = default_chunk_records(per_record, records)
    else:
        if type(chunk_records) is not int or chunk_records < 1:
            raise ConfigError("chunk_records must be a positive integer")
        r = min(chunk_records, records)
    biggest = max(f.record_bytes for f in infos)
    if r * biggest + TAG_SIZE > MAX_AEAD_BYTES:
        raise ConfigError(
            f"a chunk of {r} records exceeds AES-GCM's {MAX_AEAD_BYTES}-byte limit; "
            "use a smaller chunk_records"
        )

    p = Path(path)
    if not p.parent.is_dir():
        raise StorageError(
            f"cannot create {p}: directory {p.parent} does not exist; create it first"
        )
    if p.is_dir():
        raise StorageError(f"cannot create {p}: it is a directory; give a file path")
    if p.exists() and not overwrite:
        raise StorageError(f"{p} already exists; choose another path or pass --overwrite")

    dataset_id = os.urandom(ID_SIZE)
    keys = DatasetKeys.derive(key, dataset_id, [f.name for f in infos])
    # The header length depends on the numbers in it (data_offset, file_size):
    # iterate until the layout it describes is the one it is written for.
    hlen = 0
    for _ in range(8):
        layout = Layout(records, r, infos, data_offset_for(hlen))
        hjson = header_json(layout)
        if len(hjson) == hlen:
            break
        hlen = len(hjson)
    else:  # pragma: no cover - the length converges in two or three rounds
        raise FormatError("internal error: the header length does not converge")
    if hlen > MAX_HEADER_BYTES:
        raise ConfigError("the field descriptions are too large for a dataset header")

    prefixes = [field_aad_prefix(dataset_id, f, src.name) for f, src in enumerate(sources)]

    def fill(region: Region) -> None:
        buf = region.buf
        for c in range(layout.num_chunks):
            a = c * r
            n = layout.chunk_len(c)
            nonce = counter_nonce(c)
            for f, (off, length) in enumerate(layout.spans(c)):
                plain = _chunk_bytes(sources[f], a, a + n)
                assert len(plain) == length
                keys.aeads[f].encrypt_into(
                    nonce, plain, field_aad(prefixes[f], c, n), buf[off : off + length + TAG_SIZE]
                )
            if progress is not None:
                progress(a + n, records)
        # IMPORTANT: the header and its MAC are written last, so a temporary
        # file left by a crash never authenticates, even if someone opens it.
        head = PREFIX.pack(MAGIC, VERSION, hlen, dataset_id, keys.fingerprint) + hjson
        signed_len = layout.data_offset - MAC_SIZE
        # The padding up to the MAC is zero in the fresh file; it is signed too.
        signed = head + bytes(signed_len - len(head))
        buf[:signed_len] = signed
        buf[signed_len : layout.data_offset] = header_mac(keys.header_key, signed)
        del buf

    region = Region.create(p, layout.file_size, fill, overwrite=overwrite)
    region.close()
    return dataset_id.hex()


# -- inspection ----------------------------------------------------------------


def describe_dataset(
    path: str | os.PathLike[str], key: MasterKey | None = None, *, verify: bool = True
) -> dict[str, Any]:
    """What a sealed dataset's header says, as plain values (``plinius inspect --json``).

    Args:
        path: the sealed dataset.
        key: with it, the header MAC is checked (and, with ``verify``, every
            chunk); without it the header is read but cannot be authenticated.
        verify: with a key, also authenticate every chunk (reads the whole file).

    Returns:
        A dict with the keys ``kind`` (``"dataset"``), ``path``, ``format_version``,
        ``dataset_id``, ``key_fingerprint`` (hex), ``records``, ``chunk_records``,
        ``chunks``, ``last_chunk_records``, ``fields`` (``name``, ``dtype``,
        ``shape``, ``record_bytes`` each), ``file_bytes`` (what the header
        says), ``actual_bytes`` (the file's size), ``authenticated`` (the
        header) and ``verified`` (every chunk).

    Raises:
        FormatError, WrongKeyError, IntegrityError, StorageError: as :class:`SealedDataset`.
    """
    p = Path(path)
    if key is not None:
        with SealedDataset(p, key) as ds:
            if verify:
                ds.verify()
            lay, hdr = ds._layout, ds._hdr
        size = lay.file_size  # the dataset checked its size on opening
    else:
        mm = map_readonly(p)
        buf = memoryview(mm)
        try:
            hdr = read_prefix(buf, p)
            try:
                lay = parse_header(bytes(buf[hdr.json_slice]), hdr.header_len)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise FormatError(f"{p}: invalid dataset header: {exc}") from exc
            size = len(buf)
        finally:
            buf.release()
            with contextlib.suppress(BufferError):  # else unmapped when collected
                mm.close()
    return {
        "kind": "dataset",
        "path": str(p),
        "format_version": VERSION,
        "dataset_id": hdr.dataset_id.hex(),
        "key_fingerprint": hdr.fingerprint.hex(),
        "records": lay.records,
        "chunk_records": lay.chunk_records,
        "chunks": lay.num_chunks,
        "last_chunk_records": lay.chunk_len(lay.num_chunks - 1),
        "fields": [
            {
                "name": f.name,
                "dtype": f.dtype_name,
                "shape": list(f.shape),
                "record_bytes": f.record_bytes,
            }
            for f in lay.fields
        ],
        "file_bytes": lay.file_size,
        "actual_bytes": size,
        "authenticated": key is not None,
        "verified": key is not None and verify,
    }


def inspect_dataset(path: str | os.PathLike[str], key: MasterKey | None = None) -> list[str]:
    """Lines describing a sealed dataset (what ``plinius inspect`` prints).

    Args:
        path: the sealed dataset.
        key: with it, the header MAC and every chunk are verified; without it
            the header is read but cannot be authenticated, and the lines say so.

    Returns:
        Human-readable lines: id, key fingerprint, fields, size, verification status.

    Raises:
        FormatError, WrongKeyError, IntegrityError, StorageError: as :class:`SealedDataset`.
    """
    d = describe_dataset(path, key)
    if d["verified"]:
        status = [
            "header: authenticated (HMAC-SHA256, key fingerprint matches)",
            f"chunks: all {d['chunks']} x {len(d['fields'])} verified (AES-256-GCM)",
        ]
    else:
        status = ["header: NOT authenticated (no key given; pass --key to verify everything)"]
        if d["actual_bytes"] != d["file_bytes"]:
            status.append(
                f"size: {d['actual_bytes']} bytes, header says {d['file_bytes']}: "
                "truncated or extended"
            )
    lines = [
        f"plinius sealed dataset, format version {d['format_version']}",
        f"path: {d['path']}",
        f"dataset id: {d['dataset_id']}",
        f"key fingerprint: {d['key_fingerprint']}",
        f"records: {d['records']}",
        f"chunking: {d['chunks']} chunks of {d['chunk_records']} records "
        f"(last: {d['last_chunk_records']})",
        "fields:",
    ]
    for f in d["fields"]:
        shape = tuple(f["shape"])
        lines.append(f"  {f['name']}: {f['dtype']} {shape}, {f['record_bytes']} B/record")
    lines.append(f"size: {d['file_bytes']} bytes")
    return lines + status
