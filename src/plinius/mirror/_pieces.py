"""Tensors to sealed AES-GCM pieces and back.

A tensor is sealed in pieces of at most ``chunk_bytes`` (one AES-GCM call is
capped at 2**31 - 1 bytes; smaller pieces also let two threads share a big
tensor). Piece ``c`` of tensor ``i`` in generation ``g`` has nonce
``counter_nonce(i, 2 + c)`` under the save's own key, and AAD
``aad(purpose, region id, g)`` + ``aad(i, name, kind, dtype, shape, nbytes,
pieces)`` + ``aad(c)``; its tag follows its ciphertext in the slot.
:class:`Pieces` builds (and caches) those per region; ``plinius._workers``'
:class:`Runner` (re-exported here) deals the pieces' jobs to the threads.
"""

from __future__ import annotations

import functools
import hmac
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .._workers import PARALLEL_MIN_BYTES, THREADS, Job, Runner, split_jobs
from ..crypto import TAG_SIZE, Aead, aad, counter_nonce
from ..errors import IntegrityError
from ..pmem import RegionLike
from ._format import Entry, Manifest, nchunks

__all__ = [
    "PARALLEL_MIN_BYTES",
    "THREADS",
    "Job",
    "Pieces",
    "Runner",
    "check_stored_tags",
    "chunk_aad",
    "decrypt_job",
    "first_nonce",
    "memory_of",
    "persist_ranges",
    "split_jobs",
    "tag_ends",
]

# Persist ranges closer than this are persisted as one (fewer msync calls).
_MERGE_GAP = 4096

_DOMAIN_TENSOR = 2  # tensor i, chunk c: domain 2 + c, counter i


@functools.lru_cache(maxsize=4096)
def chunk_aad(c: int) -> bytes:
    """The AAD that ends piece ``c``'s (cached: the same few values every save)."""
    return aad(c)


@functools.lru_cache(maxsize=1 << 16)
def first_nonce(i: int) -> bytes:
    """The nonce of tensor ``i``'s first chunk (:meth:`Pieces.pieces` makes the same)."""
    return counter_nonce(i, _DOMAIN_TENSOR)


def memory_of(a: Any) -> memoryview:
    """A memoryview of a numpy array's memory (no copy), for the AES-GCM calls."""
    return memoryview(a)


def tag_ends(e: Entry, chunk: int) -> list[int]:
    """Offsets just past each chunk's tag in the entry's current slot."""
    n = nchunks(e.nbytes, chunk)
    return [
        e.offset + c * (chunk + TAG_SIZE) + min(chunk, e.nbytes - c * chunk) + TAG_SIZE
        for c in range(n)
    ]


class Pieces:
    """The sealed pieces of one region's tensors: where each lies, its nonce and its AAD.

    Holds the caches a save needs to stay cheap: the AAD prefix of the current
    generation and each tensor's static AAD (one per tensor per save).

    Args:
        region_id: the region's 16-byte id (bound into every tensor AAD).
    """

    __slots__ = ("_aad_cache", "_prefix_cache", "region_id")

    def __init__(self, region_id: bytes) -> None:
        self.region_id = region_id
        self._aad_cache: dict[tuple[Any, ...], bytes] = {}
        self._prefix_cache: tuple[int, bytes] = (-1, b"")

    def prefix(self, gen: int) -> bytes:
        """``aad(purpose, region id, gen)``, the start of every tensor AAD of generation ``gen``."""
        if self._prefix_cache[0] != gen:
            self._prefix_cache = (gen, aad("plinius/v1/mirror/tensor", self.region_id, gen))
        return self._prefix_cache[1]

    def static_aad(self, i: int, e: Entry, n: int) -> bytes:
        """The AAD after the prefix: the tensor's fields, and for a one-piece
        tensor (``n == 1``) its chunk's too (cached: a save needs one per tensor)."""
        k = (i, e.name, e.kind, e.dtype, e.shape, e.nbytes, n)
        cached = self._aad_cache.get(k)
        if cached is None:
            cached = aad(i, e.name, e.kind, e.dtype, e.shape, e.nbytes, n)
            if n == 1:
                cached += chunk_aad(0)
            if len(self._aad_cache) > 1 << 16:
                self._aad_cache.clear()
            self._aad_cache[k] = cached
        return cached

    def pieces(
        self,
        prefix: bytes,
        chunk: int,
        i: int,
        e: Entry,
        buf: memoryview,
        data: np.ndarray[Any, Any],
        shared: bool = False,
    ) -> list[tuple[Any, Any, bytes, bytes]]:
        """Per chunk of tensor ``i``: (plaintext, sealed slice, nonce, aad) to encrypt, or
        the sealed slice and plaintext destination through :meth:`open_pieces`.

        ``prefix`` is ``aad(purpose, region id, generation)``; the rest of the
        AAD binds the tensor's index, name, kind, dtype, shape and size, and the
        chunk's index and count (concatenated TLV fields, as ``crypto.aad``).
        With ``shared``, every chunk's plaintext is the start of ``data`` (a
        scratch buffer reused by each chunk).
        """
        n = nchunks(e.nbytes, chunk)
        static = self.static_aad(i, e, n)
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
                    prefix + static + (chunk_aad(c) if n > 1 else b""),
                )
            )
        return out

    def open_pieces(
        self,
        m: Manifest,
        i: int,
        e: Entry,
        buf: memoryview,
        dst: np.ndarray[Any, Any],
        shared: bool = False,
    ) -> list[tuple[memoryview, Any, bytes, bytes]]:
        """(sealed slice, plaintext destination, nonce, aad) per chunk of committed tensor ``i``."""
        prefix = self.prefix(m.root.generation)
        pieces = self.pieces(prefix, m.root.chunk_bytes, i, e, buf, dst, shared)
        return [(sealed, plain, nonce, ad) for plain, sealed, nonce, ad in pieces]


def check_stored_tags(m: Manifest, buf: memoryview, label: str) -> None:
    """Check that the tags stored beside the ciphertext are the ones the manifest lists.

    Args:
        m: the committed manifest.
        buf: the region's memory.
        label: how errors name the mirror.

    Raises:
        IntegrityError: a stored tag differs.
    """
    # Catches swapped or replayed tensors before anything is written.
    chunk = m.root.chunk_bytes
    for e in m.entries:
        for tag, end in zip(e.tags, tag_ends(e, chunk)):
            if not hmac.compare_digest(bytes(buf[end - TAG_SIZE : end]), tag):
                raise IntegrityError(
                    f"tensor {e.name!r} of {label} was replaced or damaged (its tag is "
                    "not the one the committed manifest lists); nothing was restored. Restore "
                    "the mirror from a trusted copy"
                )


def decrypt_job(
    aead: Aead,
    nonce: bytes,
    src: memoryview,
    ad: bytes,
    dst: np.ndarray[Any, Any],
    attempted: list[np.ndarray[Any, Any]],
    failed: list[BaseException],
    stop: threading.Event,
) -> Callable[[], None]:
    """A job that decrypts one piece into ``dst``, noting it in ``attempted`` first.

    A failing tag is appended to ``failed`` and sets ``stop``, so that the
    other jobs skip their pieces; the caller wipes every ``attempted`` buffer.
    """

    def run() -> None:
        if stop.is_set():
            return
        attempted.append(dst)
        try:
            aead.decrypt_into(nonce, src, ad, memory_of(dst))
        except IntegrityError as exc:
            failed.append(exc)
            stop.set()

    return run


def persist_ranges(region: RegionLike, ranges: list[tuple[int, int]]) -> None:
    """Persist every ``(offset, length)`` range, merging those closer than a page."""
    merged: list[list[int]] = []
    for off, n in sorted(ranges):
        if merged and off <= merged[-1][1] + _MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], off + n)
        else:
            merged.append([off, off + n])
    for lo, hi in merged:
        region.persist(lo, hi - lo)
