"""Batches for hand-written training loops that resume exactly: :class:`ResumableLoader`.

A plain ``torch.utils.data.DataLoader`` cannot be mirrored: it has no
position, and ``iter(loader)`` draws a seed from torch's *global* generator
(for its workers, even when there are none), so a loader re-created after a
crash shifts every later dropout mask. :class:`ResumableLoader` is the
replacement::

    loader = ResumableLoader(ds, batch_size=64, seed=0, num_workers=2)
    state = {"model": model, "optim": optimizer, "rng": RNGState(), "data": loader}
    step = mirror.restore(state) or 0
    while loader.epoch < epochs:
        for x, y in loader:            # the rest of the epoch, from where it stopped
            ...                        # forward, backward, optimizer.step()
            step += 1
            mirror.save(state, step=step)

:class:`BatchStream` is the engine it shares with :func:`plinius.fit`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, StateMismatchError
from . import SealedDataset, SealedSampler, ShuffleMode

__all__ = ["Batch", "BatchStream", "ResumableLoader", "collate_tuple"]

Batch = tuple[torch.Tensor, ...]


def collate_tuple(items: Sequence[Any]) -> Batch:
    """Records collated by ``default_collate`` into a tuple of fields.

    Args:
        items: The records of one batch (each a tuple of fields, or one value).

    Returns:
        One stacked tensor (or collated value) per field.
    """
    collated = torch.utils.data.default_collate(list(items))
    return tuple(collated) if isinstance(collated, list | tuple) else (collated,)


def _seed_of(*parts: int) -> int:
    """A 64-bit seed from integers of any size (SeedSequence mixes them)."""
    import numpy as np

    words = np.random.SeedSequence([p % (1 << 64) for p in parts]).generate_state(2, np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


class _SeededBatches(Dataset[Any]):
    """Fetches a batch of ``(seed, epoch, batch, index)`` items with the global
    generators of the (worker) process seeded from ``(seed, epoch, batch)``."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __getitems__(self, items: list[tuple[int, int, int, int]]) -> list[Any]:
        import random

        import numpy as np

        seed, epoch, batch, _ = items[0]
        s = _seed_of(seed, epoch, batch)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        torch.manual_seed(s)
        idx = [i for *_, i in items]
        if isinstance(self.dataset, SealedDataset):
            # One decryption per batch; collate expects a list of records.
            fields = self.dataset.get_batch(idx)
            return [tuple(f[k] for f in fields) for k in range(len(idx))]
        return [self.dataset[i] for i in idx]

    def __getitem__(self, item: tuple[int, int, int, int]) -> Any:
        return self.__getitems__([item])[0]


class BatchStream:
    """Draws batches of indices from a sampler and fetches them: the engine of
    :class:`ResumableLoader` and :func:`plinius.fit`.

    It never advances the sampler: the caller calls ``sampler.advance(n)`` with
    what it really consumed (:attr:`last_size`), so a save never records
    indices a prefetching DataLoader drew. When the sampler's position is not
    where the last batch left it (a restore, ``set_epoch``), the stream starts
    again from the sampler's position.

    Without workers, batches are fetched in this process, and a random
    ``__getitem__`` draws from the global generators (which ``RNGState``
    mirrors). With workers, a DataLoader gets a private generator seeded from
    ``(seed, epoch)`` (never torch's global one) and each batch is fetched with
    the worker's generators seeded from ``(seed, epoch, batch number)``, so a
    random ``__getitem__`` gives the same batch whichever worker fetches it and
    wherever the job resumed.

    Args:
        dataset: A map-style dataset; a :class:`SealedDataset` is read a batch at a time.
        sampler: The order (its seed, epoch and position).
        batch_size: Records per batch.
        num_workers: DataLoader worker processes; 0 reads in this process.
        drop_last: Leave out an epoch's last incomplete batch.
        shard: ``(rank, world_size)``: this process fetches only its share of
            every batch (the ``rank``-th of ``world_size`` equal parts; the
            batch size must divide by ``world_size``). :attr:`last_size` stays
            the whole batch's size: every process advances the sampler alike.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        sampler: SealedSampler,
        batch_size: int,
        num_workers: int,
        *,
        drop_last: bool = True,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        rank, world = shard
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"shard {shard} is not (rank, world size) with 0 <= rank < world")
        if batch_size % world:
            raise ConfigError(
                f"the batch size {batch_size} does not divide by the {world} processes; "
                f"use a batch size that is a multiple of {world}"
            )
        if world > 1 and not drop_last:
            raise ConfigError("a batch shared by several processes needs drop_last")
        self.shard = (rank, world)
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.last_size = 0
        self._it: Iterator[tuple[int, Batch]] | None = None
        # Where the sampler stands when the caller consumed what was fetched.
        self._expect: tuple[int, int] = (-1, -1)

    def _fetch(self, idx: list[int]) -> Batch:
        if isinstance(self.dataset, SealedDataset):
            return tuple(self.dataset.get_batch(idx))
        return collate_tuple([self.dataset[i] for i in idx])

    def _share(self, batch: list[int]) -> list[int]:
        """This process's part of a batch of the whole job (all of it with one process)."""
        rank, world = self.shard
        if world == 1:
            return batch
        n = len(batch) // world
        return batch[rank * n : (rank + 1) * n]

    def _start_epoch_iter(self) -> Iterator[tuple[int, Batch]]:
        whole = list(self.sampler.batches(self.batch_size, drop_last=self.drop_last))
        # Sizes are the whole batches' (what the sampler advances by); the
        # indices fetched are this process's share of each.
        sizes = [len(b) for b in whole]
        index_batches = [self._share(b) for b in whole]
        if self.num_workers <= 0:
            # In this process: a random __getitem__ draws from the global RNGs,
            # which are in the mirror, so a resumed job draws the same numbers.
            return ((n, self._fetch(b)) for n, b in zip(sizes, index_batches))
        # With workers, which worker fetches a batch (and where its RNG stands)
        # depends on where in the epoch the job (re)started. So every batch is
        # fetched with the generators seeded from (seed, epoch, batch number):
        # a random __getitem__ gives the same batch however the job resumed.
        first = self.sampler.consumed // self.batch_size
        numbered = [
            [(self.sampler.seed, self.sampler.epoch, first + k, i) for i in b]
            for k, b in enumerate(index_batches)
        ]
        # A DataLoader draws its base seed from the generator it is given, else
        # from torch's *global* RNG: that would shift every later dropout mask.
        gen = torch.Generator()
        gen.manual_seed(_seed_of(self.sampler.seed, self.sampler.epoch))
        loader = torch.utils.data.DataLoader(
            _SeededBatches(self.dataset),
            batch_sampler=numbered,
            num_workers=self.num_workers,
            collate_fn=collate_tuple,
            generator=gen,
        )
        # A DataLoader keeps the batch order: sizes and batches pair up.
        return zip(sizes, loader)

    def next_in_epoch(self) -> Batch | None:
        """The next batch of the sampler's epoch, or ``None`` when the epoch is used up.

        Sets :attr:`last_size` to the batch's number of records.
        """
        s = self.sampler
        if self._it is None or (s.epoch, s.consumed) != self._expect:
            self._it = None  # ends the old DataLoader's workers before new ones start
            self._expect = (s.epoch, s.consumed)
            self._it = self._start_epoch_iter()
        item = next(self._it, None)
        if item is None:
            self._it = None
            return None
        n, batch = item
        self.last_size = n
        self._expect = (self._expect[0], self._expect[1] + n)
        return batch

    def next(self) -> Batch:
        """The next batch; moves the sampler to the next epoch when this one is used up.

        Raises:
            ConfigError: Not one batch fits in an epoch.
        """
        for _ in range(2):
            batch = self.next_in_epoch()
            if batch is not None:
                return batch
            self.sampler.set_epoch(self.sampler.epoch + 1)
        raise ConfigError(
            f"the dataset has fewer records than one batch ({self.batch_size}); "
            "use a smaller --batch-size"
        )


class ResumableLoader:
    """Batches for a hand-written training loop, mirrored so that a resume is exact.

    Put it in the mirrored state (it is Stateful) and iterate it: ``for batch
    in loader`` yields the rest of the current epoch, from the position the
    loop reached, then moves to the next epoch (``loader.epoch`` rises by one).
    A batch counts as consumed once the loop receives it, so save *after* the
    step that used it (as every loop does): the saved position is what the loop
    really used, never what worker processes fetched ahead. A ``break`` keeps
    the position; iterating again continues from it.

    The order of epoch ``e`` derives from ``(seed, e)`` only
    (:class:`SealedSampler`). Nothing draws from torch's global generator:
    with workers the DataLoader inside gets a private one seeded from ``(seed,
    epoch)``, and each batch is fetched with the worker's generators seeded
    from ``(seed, epoch, batch number)``, so random augmentation in
    ``__getitem__`` resumes exactly too. Without workers, batches are read in
    this process and a random ``__getitem__`` draws from the global generators:
    mirror them with :class:`~plinius.rng.RNGState`.

    Args:
        dataset: A :class:`SealedDataset` (read a batch at a time, in chunk-aware
            order) or any map-style dataset with a length.
        batch_size: Records per batch.
        seed: Seed of the order (and of the workers' generators), in [0, 2**64).
        shuffle: ``"chunk"`` (default), ``"full"`` or ``False`` (file order);
            see :class:`SealedSampler`.
        drop_last: Leave out an epoch's last incomplete batch.
        num_workers: Worker processes fetching ahead; 0 reads in this process.

    Raises:
        ConfigError: A bad argument, or a dataset with fewer records than one
            batch while ``drop_last`` is set.

    Batches are tuples of tensors, one per field (``default_collate`` for a
    plain dataset). One loop iterates a loader at a time.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: ShuffleMode = "chunk",
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        if type(batch_size) is not int or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, not {batch_size!r}")
        if type(num_workers) is not int or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, not {num_workers!r}")
        if type(drop_last) is not bool:
            raise ConfigError(f"drop_last must be True or False, not {drop_last!r}")
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError("ResumableLoader needs a map-style dataset with a length") from exc
        if drop_last and n < batch_size:
            raise ConfigError(
                f"the dataset has {n} records, fewer than one batch of {batch_size}: use a "
                "smaller batch_size or drop_last=False"
            )
        if isinstance(dataset, SealedDataset):
            sampler = SealedSampler(dataset, seed=seed, shuffle=shuffle)
        else:
            sampler = SealedSampler(n, seed=seed, shuffle=shuffle)
        self._sampler = sampler
        self._stream = BatchStream(dataset, sampler, batch_size, num_workers, drop_last=drop_last)
        self._batch_size = batch_size
        self._drop_last = drop_last

    @property
    def epoch(self) -> int:
        """The current epoch (0 first); iterating to an epoch's end moves to the next."""
        return self._sampler.epoch

    @property
    def consumed(self) -> int:
        """Records of the current epoch the loop has received."""
        return self._sampler.consumed

    @property
    def batch_size(self) -> int:
        """Records per batch."""
        return self._batch_size

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``.

        Raises:
            ConfigError: ``epoch`` is not a non-negative integer.
        """
        self._sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches in a whole epoch (as a DataLoader's ``len``)."""
        n = self._sampler.num_records
        return n // self._batch_size if self._drop_last else -(-n // self._batch_size)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self._stream.next_in_epoch()
            if batch is None:
                self._sampler.set_epoch(self._sampler.epoch + 1)
                return
            # The loop has it now: that is what a save after its step records.
            self._sampler.advance(self._stream.last_size)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch and position, and the batching they are valid for (plain values)."""
        return {
            "version": 1,
            "batch_size": self._batch_size,
            "drop_last": self._drop_last,
            "sampler": self._sampler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; nothing changes if it does not fit.

        Raises:
            StateMismatchError: The state is not a loader's, or was saved with
                another batch size, ``drop_last``, order or dataset size.
        """
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise StateMismatchError("not a ResumableLoader state (version 1, from state_dict())")
        for name, mine in (("batch_size", self._batch_size), ("drop_last", self._drop_last)):
            saved = state.get(name)
            if saved != mine or type(saved) is not type(mine):
                raise StateMismatchError(
                    f"the saved loader has {name}={saved!r}, this one {mine!r}: resume with "
                    "the job's own settings"
                )
        self._sampler.load_state_dict(state.get("sampler"))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"ResumableLoader(records={self._sampler.num_records}, batch_size="
            f"{self._batch_size}, epoch={self.epoch}, consumed={self.consumed})"
        )
