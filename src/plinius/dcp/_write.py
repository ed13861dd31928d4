"""One rank's data file: its items sealed in pieces, encrypted while the previous batch is written.

The pieces (``_format.piece_spans``) are gathered, in plan order, into batches
of about :data:`BATCH_BYTES` (a bigger piece is a batch of its own). Round by
round, one thread writes the batches sealed in the previous round while the
others seal the next ones into reusable buffers: AES-GCM and ``os.write`` both
release the GIL, so on a disk slower than AES-GCM the encryption hides behind
the writes. With one thread (the default: on the shared 2-core development
machine a second thread's hand-offs cost more than the encryption they hide)
the rounds run in series. The bytes are those of
docs/FORMAT.md whatever the thread count: only the order of work changes.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from .._fsutil import drop_cached, fsync_dir
from .._workers import Job, Runner
from ..crypto import TAG_SIZE, Aead, counter_nonce
from ..errors import storage_error
from . import _format as fmt

__all__ = ["BATCH_BYTES", "write_file"]

# Knob: sealed bytes per batch (one write call). Big enough that a round's
# thread hand-off is noise, small enough that the buffers in flight (two per
# encrypting thread) stay a few MiB; a piece above it is a batch of its own.
BATCH_BYTES = 8 << 20

_Bytes = np.ndarray[Any, np.dtype[np.uint8]]


@dataclass
class _Batch:
    """Pieces to seal into one buffer: (plaintext, nonce, AAD) each, and the sealed size."""

    pieces: list[tuple[memoryview, bytes, bytes]] = field(default_factory=list)
    nbytes: int = 0


def _tensor_bytes(t: torch.Tensor) -> _Bytes:
    """The bytes of the projection DCP hands us (any device, maybe a non-contiguous view)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def _batches(
    name: str,
    spec: fmt.FileSpec,
    items: list[WriteItem],
    planner: SavePlanner,
    offset: int,
    results: list[WriteResult],
) -> Iterator[_Batch]:
    """The file's pieces from ``offset`` on, in batches; each item's result into ``results``.

    Runs on the caller's thread (``resolve_data`` is the planner's, and may copy
    a tensor off its device); the plaintext views keep their tensors alive
    until the batch is sealed.
    """
    nonce = 1  # nonce counter 0 of the file's domain is the header's tag
    batch = _Batch()
    for item in items:
        data = planner.resolve_data(item)
        if isinstance(data, io.BytesIO):
            src = np.frombuffer(data.getbuffer(), dtype=np.uint8)
            kind, dtype, shape = "bytes", None, None
        else:
            src = _tensor_bytes(data)
            kind, dtype, shape = "tensor", str(data.dtype), tuple(data.shape)
        info = fmt.ItemInfo(name, offset, src.nbytes, nonce, dtype, shape)
        spans = fmt.piece_spans(src.nbytes)
        for p, (o, n) in enumerate(spans):
            if batch.pieces and batch.nbytes + n + TAG_SIZE > BATCH_BYTES:
                yield batch
                batch = _Batch()
            ad = fmt.item_aad(spec.ckpt_id, info, item.index, p, kind)
            batch.pieces.append(
                (src[o : o + n].data, counter_nonce(nonce + p, spec.file_index), ad)
            )
            batch.nbytes += n + TAG_SIZE
        need = fmt.stored_length(src.nbytes)
        results.append(WriteResult(index=item.index, size_in_bytes=need, storage_data=info))
        offset += need
        nonce += len(spans)
    if batch.pieces:
        yield batch


def _seal(aead: Aead, batch: _Batch, out: _Bytes) -> None:
    pos = 0
    for src, nonce, ad in batch.pieces:
        end = pos + len(src) + TAG_SIZE
        aead.encrypt_into(nonce, src, ad, out[pos:end].data)
        pos = end


def _write_sealed(fd: int, sealed: list[tuple[_Bytes, int]]) -> None:
    for buf, n in sealed:
        _write_all(fd, buf[:n].data)


def _buffer(free: list[_Bytes], n: int) -> _Bytes:
    """A buffer of at least ``n`` bytes, reused when one is free (no page faults again)."""
    if free:
        buf = free.pop()
        if buf.nbytes >= n:
            return buf
    return np.empty(max(n, BATCH_BYTES), dtype=np.uint8)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` at the file position (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_pieces(fd: int, batches: Iterator[_Batch], aead: Aead, threads: int) -> None:
    """Seal and write ``batches`` in order, ``threads - 1`` sealed ahead of each write."""
    ahead = max(1, threads - 1)
    runner = Runner(threads)
    free: list[_Bytes] = []
    sealed: list[tuple[_Bytes, int]] = []  # sealed last round, written this round
    try:
        while True:
            nxt = list(itertools.islice(batches, ahead))
            if not nxt and not sealed:
                return
            outs = [_buffer(free, b.nbytes) for b in nxt]
            jobs = [
                Job(b.nbytes, functools.partial(_seal, aead, b, out)) for b, out in zip(nxt, outs)
            ]
            if sealed:
                total = sum(n for _, n in sealed)
                jobs.append(Job(total, functools.partial(_write_sealed, fd, sealed)))
            runner.run(jobs)
            free.extend(buf for buf, _ in sealed)
            sealed = [(out, b.nbytes) for b, out in zip(nxt, outs)]
    finally:
        runner.shutdown()


def write_file(
    directory: Path,
    spec: fmt.FileSpec,
    items: list[WriteItem],
    planner: SavePlanner,
    aead: Aead,
    threads: int,
) -> list[WriteResult]:
    """Seal this rank's ``items`` into its data file, fsync it and the directory.

    Args:
        directory: the checkpoint directory.
        spec: the checkpoint id and this rank's file index.
        items: the plan's items, written in this order.
        planner: resolves each item to its tensor or bytes.
        aead: the checkpoint key.
        threads: 1 seals and writes in series; more seal ahead of the writes.

    Returns:
        DCP's results, each with its :class:`_format.ItemInfo`.

    Raises:
        StorageError: the file could not be created or written (it is removed).
    """
    if not items:
        return []
    name = fmt.data_file_name(spec.ckpt_id, spec.file_index)
    path = directory / name
    header = fmt.data_header(spec.ckpt_id, spec.file_index)
    head_tag = aead.encrypt(
        counter_nonce(0, spec.file_index), b"", fmt.data_header_aad(header, name)
    )
    results: list[WriteResult] = []
    # The committed files stay on disk until the commit; only their cached
    # pages go (see drop_cached: the new file's writes then run at rewrite speed).
    for old in spec.superseded:
        drop_cached(directory / old)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise storage_error(exc, f"cannot create DCP data file {path}") from exc
    try:
        _write_all(fd, header + head_tag)
        start = len(header) + len(head_tag)
        batches = _batches(name, spec, items, planner, start, results)
        _write_pieces(fd, batches, aead, threads)
        os.fsync(fd)  # once per file: the commit needs it durable, not each write
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(exc, OSError):
            raise storage_error(exc, f"cannot write DCP data file {path}") from exc
        raise
    os.close(fd)
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise storage_error(exc, f"cannot sync checkpoint directory {directory}") from exc
    return results
