"""The record order of training: :class:`SealedSampler` (re-exported by :mod:`plinius.data`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sized
from typing import Any, Literal

import numpy as np
from torch.utils.data import Sampler

from ..errors import ConfigError, StateMismatchError

__all__ = ["DEFAULT_WINDOW_CHUNKS", "SealedSampler", "ShuffleMode"]

DEFAULT_WINDOW_CHUNKS = 4

ShuffleMode = Literal["chunk", "full"] | bool


class SealedSampler(Sampler[int]):
    """Record order for training: from ``(seed, epoch)`` only, resumable exactly.

    Modes (``shuffle``):

    * ``"chunk"`` (default): chunks are put in a random order and grouped in
      windows of ``window_chunks`` (4); the records of each window are shuffled
      together. A batch then touches a few chunks only, each chunk is decrypted
      about once per epoch, and decryption costs what the data weighs. The order
      is less random than a uniform permutation: records of one window are
      drawn close together.
    * ``"full"``: a uniform permutation. Each batch touches up to
      ``batch_size`` chunks, so an epoch decrypts up to ``chunk_records`` times
      the data (cheap for small chunks; see docs/FORMAT.md).
    * ``False``: records in file order.

    Position: iterating (``iter(sampler)``, :meth:`batches`) yields the rest
    of the current epoch from ``consumed`` and does *not* advance it, because a
    DataLoader draws ahead of what the training loop used. The loop calls
    :meth:`advance` with what it really consumed, and :meth:`set_epoch` (which
    resets ``consumed`` to 0) when an epoch is done. ``state_dict()`` carries
    seed, epoch and consumed: a restored sampler yields exactly the rest of the
    order the original would have yielded. ``len(sampler)`` is what remains.

    Args:
        ds_or_len: a :class:`SealedDataset` (its chunking is used), any sized
            dataset, or a record count.
        seed: the order of epoch ``e`` derives from ``(seed, e)`` only.
        shuffle: ``"chunk"``, ``"full"`` or ``False`` (above).
        chunk_records: records per chunk for a plain dataset (default 1, so
            ``"chunk"`` shuffles uniformly there).
        window_chunks: chunks shuffled together in ``"chunk"`` mode.

    Raises:
        ConfigError: a bad argument.
        StateMismatchError: :meth:`load_state_dict` of another dataset's order.

    Example::

        sampler = SealedSampler(ds, seed=0)
        state = {"model": model, "optim": optim, "sampler": sampler}  # mirrored
        for batch in sampler.batches(128):
            ...
            sampler.advance(len(batch))
    """

    def __init__(
        self,
        ds_or_len: Sized | int,
        seed: int = 0,
        shuffle: ShuffleMode = "chunk",
        *,
        chunk_records: int | None = None,
        window_chunks: int = DEFAULT_WINDOW_CHUNKS,
    ) -> None:
        if isinstance(ds_or_len, int) and not isinstance(ds_or_len, bool):
            n = ds_or_len
        elif isinstance(ds_or_len, Sized):
            n = len(ds_or_len)
        else:
            raise ConfigError("SealedSampler needs a dataset or a record count")
        if n < 1:
            raise ConfigError("SealedSampler needs at least one record")
        if chunk_records is None:
            chunk_records = getattr(ds_or_len, "chunk_records", None) or 1
        if type(chunk_records) is not int or chunk_records < 1:
            raise ConfigError("chunk_records must be a positive integer")
        if type(window_chunks) is not int or window_chunks < 1:
            raise ConfigError("window_chunks must be a positive integer")
        if shuffle is not False and shuffle not in ("chunk", "full"):
            raise ConfigError(f"shuffle must be 'chunk', 'full' or False, not {shuffle!r}")
        _check_seed(seed)
        self._n = n
        self._seed = seed
        self._shuffle: ShuffleMode = shuffle
        self._r = min(chunk_records, n)
        self._w = window_chunks
        self._epoch = 0
        self._consumed = 0
        self._full_cache: tuple[int, int, np.ndarray[Any, Any]] | None = None

    # -- position ---------------------------------------------------------
    @property
    def seed(self) -> int:
        """The seed of the order."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._epoch

    @property
    def consumed(self) -> int:
        """Indices of the current epoch the training loop has really used."""
        return self._consumed

    @property
    def num_records(self) -> int:
        """Records per epoch."""
        return self._n

    @property
    def shuffle(self) -> ShuffleMode:
        """``"chunk"``, ``"full"`` or False."""
        return self._shuffle

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (its order derives from the seed and it) at position 0."""
        if type(epoch) is not int or epoch < 0:
            raise ConfigError("the epoch is a non-negative integer")
        self._epoch = epoch
        self._consumed = 0

    def advance(self, n: int) -> None:
        """Record that the training loop really consumed the next ``n`` indices."""
        if type(n) is not int or n < 0:
            raise ConfigError("advance() takes a non-negative number of indices")
        if self._consumed + n > self._n:
            raise ConfigError(
                f"cannot advance by {n}: only {self._n - self._consumed} indices remain in "
                f"epoch {self._epoch}; call set_epoch() for the next epoch"
            )
        self._consumed += n

    def __len__(self) -> int:
        return self._n - self._consumed

    # -- order --------------------------------------------------------------
    def _rng(self, *extra: int) -> np.random.Generator:
        tag = {"chunk": 1, "full": 2}[str(self._shuffle)]
        return np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self._seed, self._epoch, tag, *extra]))
        )

    def _blocks(self, start: int) -> Iterator[np.ndarray[Any, Any]]:
        """The current epoch's order from position ``start``, in blocks."""
        n = self._n
        if start >= n:
            return
        if self._shuffle is False:
            step = 1 << 16
            for a in range(start, n, step):
                yield np.arange(a, min(n, a + step), dtype=np.int64)
        elif self._shuffle == "full":
            key = (self._seed, self._epoch)
            if self._full_cache is None or self._full_cache[:2] != key:
                self._full_cache = (*key, self._rng().permutation(n))
            yield self._full_cache[2][start:]
        else:
            r, w = self._r, self._w
            num_chunks = -(-n // r)
            perm = self._rng().permutation(num_chunks)
            sizes = np.minimum(r, n - perm * r)  # records of each chunk, in window order
            win_sizes = np.add.reduceat(sizes, np.arange(0, num_chunks, w))
            ends = np.cumsum(win_sizes)
            first = int(np.searchsorted(ends, start, side="right"))
            for wi in range(first, len(win_sizes)):
                chunks = perm[wi * w : (wi + 1) * w]
                recs = np.concatenate(
                    [np.arange(c * r, min(n, (c + 1) * r)) for c in chunks.tolist()]
                )
                order = self._rng(wi).permutation(recs)
                begin = int(ends[wi] - win_sizes[wi])
                yield order[max(0, start - begin) :]

    def __iter__(self) -> Iterator[int]:
        for block in self._blocks(self._consumed):
            yield from block.tolist()

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[list[int]]:
        """Lists of ``batch_size`` indices from the current position to the epoch's end.

        Does not advance the position (call :meth:`advance` after using a batch).
        With ``drop_last`` a final short batch is left out.
        """
        if type(batch_size) is not int or batch_size < 1:
            raise ConfigError("batch_size must be a positive integer")
        pending: list[int] = []
        for block in self._blocks(self._consumed):
            pending.extend(block.tolist())
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                del pending[:batch_size]
        if pending and not drop_last:
            yield pending

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch and position, plus the configuration they are valid for (JSON-safe)."""
        return {
            "version": 1,
            "seed": self._seed,
            "epoch": self._epoch,
            "consumed": self._consumed,
            "shuffle": self._shuffle,
            "num_records": self._n,
            "chunk_records": self._r,
            "window_chunks": self._w,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore seed, epoch and position; the configuration must match this sampler's."""
        if not isinstance(state, Mapping):
            raise StateMismatchError("a sampler state is a mapping (from state_dict())")
        if state.get("version") != 1:
            raise StateMismatchError(f"unsupported sampler state version {state.get('version')!r}")
        for name, mine in (
            ("shuffle", self._shuffle),
            ("num_records", self._n),
            ("chunk_records", self._r),
            ("window_chunks", self._w),
        ):
            if state.get(name) != mine or type(state.get(name)) is not type(mine):
                raise StateMismatchError(
                    f"the saved sampler has {name}={state.get(name)!r}, this one {mine!r}: "
                    "it was saved for another dataset or configuration"
                )
        seed, epoch, consumed = state.get("seed"), state.get("epoch"), state.get("consumed")
        try:
            _check_seed(seed)
        except ConfigError as exc:
            raise StateMismatchError(f"invalid saved sampler seed: {exc}") from exc
        if type(epoch) is not int or epoch < 0:
            raise StateMismatchError(f"invalid saved sampler epoch {epoch!r}")
        if type(consumed) is not int or not 0 <= consumed <= self._n:
            raise StateMismatchError(f"invalid saved sampler position {consumed!r}")
        assert isinstance(seed, int)
        self._seed, self._epoch, self._consumed = seed, epoch, consumed

    def __repr__(self) -> str:
        return (
            f"SealedSampler(records={self._n}, seed={self._seed}, shuffle={self._shuffle!r}, "
            f"epoch={self._epoch}, consumed={self._consumed})"
        )


def _check_seed(seed: object) -> None:
    if type(seed) is not int or not 0 <= seed < 1 << 64:
        raise ConfigError(f"the seed is an integer in [0, 2**64), not {seed!r}")
