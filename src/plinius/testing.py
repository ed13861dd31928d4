"""Test machinery for code built on plinius (as ``trio.testing`` is for trio).

:class:`CrashSimRegion` is a :class:`~plinius.pmem.RegionLike` that keeps what
was written apart from what was persisted, and yields every image a crash
could leave: the tool that proves a commit protocol crash-consistent::

    from plinius import Mirror
    from plinius.testing import CrashSimRegion

    region = CrashSimRegion(1 << 20)
    mirror = Mirror(region, key)
    ...
    for image in region.crash_images():
        Mirror(CrashSimRegion.from_image(image), key)  # the old step or the new, never a blend
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator

import numpy as np

from .errors import StorageError
from .pmem import CACHE_LINE

__all__ = ["CrashSimRegion"]


class CrashSimRegion:
    """An in-memory region that can show what a crash would leave behind.

    It keeps two images: what the program wrote (``buf``) and what is known to
    be persistent. ``persist`` copies the covered 64-byte cache lines from the
    first to the second. A line that differs between them was written but not
    persisted: after a crash it may hold its old or its new contents, whole
    (cache lines are evicted whole; aligned 8-byte stores never tear).
    ``crash_images`` enumerates those outcomes, exhaustively for a few dirty
    lines and by random sampling for many.

    ``on_persist`` (if set) is called *before* each persist takes effect, so a
    test can collect crash images at every persist boundary of a protocol.
    """

    path = None

    def __init__(self, size: int = 0, *, image: bytes | None = None) -> None:
        data = bytes(image) if image is not None else bytes(size)
        self._cur = np.frombuffer(bytearray(data), dtype=np.uint8)
        self._persisted = np.frombuffer(bytearray(data), dtype=np.uint8)
        self._buf: memoryview | None = memoryview(self._cur.data).cast("B")
        self._readonly = False
        self.on_persist: Callable[[CrashSimRegion], None] | None = None
        self.persist_calls = 0

    @classmethod
    def from_image(cls, image: bytes) -> CrashSimRegion:
        """A region whose contents (written and persisted) are ``image``."""
        return cls(image=image)

    @property
    def size(self) -> int:
        """Current size in bytes."""
        return int(self._cur.size)

    @property
    def buf(self) -> memoryview:
        """The written image."""
        if self._buf is None:
            raise StorageError("region is closed")
        return self._buf

    @property
    def readonly(self) -> bool:
        """Always False: the simulator is writable."""
        return self._readonly

    @property
    def is_pmem(self) -> bool:
        """Always False."""
        return False

    def persist(self, offset: int, length: int) -> None:
        """Mark the cache lines covering the range as persisted."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"persist range {offset}+{length} outside region of {self.size}")
        if self.on_persist is not None:
            self.on_persist(self)
        self.persist_calls += 1
        if length == 0:
            return
        lo = offset - offset % CACHE_LINE
        hi = min(self.size, -(-(offset + length) // CACHE_LINE) * CACHE_LINE)
        self._persisted[lo:hi] = self._cur[lo:hi]

    def grow(self, new_size: int) -> None:
        """Extend with zeros; the size change itself is durable at once."""
        if new_size <= self.size:
            return
        cur = np.zeros(new_size, dtype=np.uint8)
        per = np.zeros(new_size, dtype=np.uint8)
        cur[: self.size] = self._cur
        per[: self.size] = self._persisted
        self._cur, self._persisted = cur, per
        self._buf = memoryview(self._cur.data).cast("B")

    def close(self) -> None:
        """Drop the view (images stay readable)."""
        self._buf = None

    def image(self) -> bytes:
        """The written image (what a run without a crash would leave)."""
        return self._cur.tobytes()

    def persisted_image(self) -> bytes:
        """The image if every unpersisted line were lost."""
        return self._persisted.tobytes()

    def dirty_lines(self) -> list[int]:
        """Indices of cache lines written but not persisted."""
        n = self.size
        full = n - n % CACHE_LINE
        a = self._cur[:full].reshape(-1, CACHE_LINE)
        b = self._persisted[:full].reshape(-1, CACHE_LINE)
        lines = np.nonzero((a != b).any(axis=1))[0].tolist()
        if full < n and not np.array_equal(self._cur[full:], self._persisted[full:]):
            lines.append(full // CACHE_LINE)
        return [int(x) for x in lines]

    def crash_image(self, kept: set[int] | frozenset[int]) -> bytes:
        """The image after a crash in which exactly the dirty lines ``kept`` survived."""
        img = self._persisted.copy()
        for line in kept:
            lo = line * CACHE_LINE
            img[lo : lo + CACHE_LINE] = self._cur[lo : lo + CACHE_LINE]
        return img.tobytes()

    def crash_images(
        self, *, exhaustive_limit: int = 10, samples: int = 32, seed: int = 0
    ) -> Iterator[bytes]:
        """Every possible crash image if at most ``exhaustive_limit`` lines are dirty,
        else all-lost, all-kept and ``samples`` random subsets (deterministic per seed)."""
        dirty = self.dirty_lines()
        if len(dirty) <= exhaustive_limit:
            for r in range(len(dirty) + 1):
                for combo in itertools.combinations(dirty, r):
                    yield self.crash_image(frozenset(combo))
            return
        yield self.crash_image(frozenset())
        yield self.crash_image(frozenset(dirty))
        rng = random.Random(seed)
        for _ in range(samples):
            p = rng.random()
            yield self.crash_image(frozenset(x for x in dirty if rng.random() < p))

    def __repr__(self) -> str:
        return f"CrashSimRegion(size={self.size}, dirty_lines={len(self.dirty_lines())})"
