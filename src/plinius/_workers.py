"""Running jobs on a few threads: the mirror's AES-GCM pieces, the DCP writer's batches.

AES-GCM (``cryptography``), ``os.write`` and ``msync`` release the GIL, so a
second thread really runs beside the caller's. :class:`Runner` deals a list of
jobs to its threads, largest first, each to the less loaded thread, and returns
once all have run; the caller's thread is one of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["PARALLEL_MIN_BYTES", "THREADS", "Job", "Runner", "run_all", "split_jobs"]

# Knobs. Work above PARALLEL_MIN_BYTES is shared among THREADS threads.
THREADS = min(2, os.cpu_count() or 1)
PARALLEL_MIN_BYTES = 8 << 20


@dataclass
class Job:
    """One piece's work: its size in bytes (to share the load) and what runs it."""

    nbytes: int
    run: Callable[[], None]


def run_all(jobs: list[Job]) -> None:
    """Run ``jobs`` in order on this thread."""
    for j in jobs:
        j.run()


def split_jobs(jobs: list[Job], n: int) -> list[list[Job]]:
    """``n`` groups of nearly equal bytes: each job, largest first, to the least loaded group."""
    groups: list[list[Job]] = [[] for _ in range(n)]
    loads = [0] * n
    for j in sorted(jobs, key=lambda j: -j.nbytes):
        g = loads.index(min(loads))
        groups[g].append(j)
        loads[g] += j.nbytes
    return [g for g in groups if g]


class Runner:
    """Runs jobs on up to ``threads`` threads, the caller's among them.

    Args:
        threads: how many threads (at least 1); the pool of the others is
            started on first use.
    """

    __slots__ = ("_pool", "threads")

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def run(self, jobs: list[Job]) -> None:
        """Run ``jobs``, split by bytes; re-raise the first error once all have stopped."""
        total = sum(j.nbytes for j in jobs)
        if self.threads == 1 or total < PARALLEL_MIN_BYTES or len(jobs) < 2:
            for j in jobs:
                j.run()
            return
        groups = split_jobs(jobs, self.threads)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="plinius-aead")
        futures = [self._pool.submit(run_all, g) for g in groups[1:]]
        err: BaseException | None = None
        try:
            run_all(groups[0])
        except BaseException as exc:
            err = exc
        for f in futures:
            try:
                f.result()
            except BaseException as exc:
                err = err or exc
        if err is not None:
            raise err

    def shutdown(self) -> None:
        """Stop the pool's threads (waiting for them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
