"""``plinius train`` under torchrun: what changes when several processes run the job.

Without torchrun nothing here is used. Under it, each process joins the job's
process group, trains its share of every batch in DistributedDataParallel, and
mirrors its own state into the mirror set at ``--mirror`` (a directory:
:mod:`plinius.dist`). Only the process of rank 0 prints progress and writes the
``--events`` file; every error is said once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["TorchrunJob", "check_replicas", "torchrun_job"]


class TorchrunJob:
    """This process's part of a torchrun job of ``plinius train``.

    Attributes:
        rank: the global rank (rank 0 speaks for the job).
        world_size: the number of processes.
        elastic: open the mirror set elastic (``--elastic``).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.elastic = False

    @property
    def speaks(self) -> bool:
        """Whether this process prints and writes events (rank 0 only)."""
        return self.rank == 0

    def check_options(
        self,
        *,
        counter_interval: float | None,
        durable_dir: Path | None,
        init_from: Path | None,
    ) -> None:
        """Refuse the options a multi-process job does not support yet (one line each)."""
        unsupported = [
            # The set advances its counter by count only, the same in every process.
            ("--counter-interval", counter_interval),
            ("--durable-dir", durable_dir),
            ("--init-from", init_from),
        ]
        given = [flag for flag, value in unsupported if value is not None]
        if given:
            raise _said_once(
                ConfigError(f"{', '.join(given)}: not supported under torchrun yet; run without it")
            )

    @contextlib.contextmanager
    def alike(self) -> Iterator[None]:
        """Inside: a ConfigError every process finds alike (a bad option) is said by rank 0 only."""
        try:
            yield
        except ConfigError as exc:
            _said_once(exc)
            raise

    @contextlib.contextmanager
    def one_at_a_time(self, sealed_key: Path | None) -> Iterator[None]:
        """Inside: this machine's processes one after another, when a key is sealed locally.

        Every process obtains the key as one process does (each attests). With
        ``--sealed-key`` the first one released the key and sealed it; the
        others then unseal it, rather than race to create the same sealed files.
        The lock is on the sealed key's directory (nothing is created for it).
        """
        folder = sealed_key.parent if sealed_key is not None else None
        if folder is None or not folder.is_dir():
            yield
            return
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def check_batch(self, batch_size: int) -> None:
        """The whole job's batch must split evenly between the processes.

        Raises:
            ConfigError: it does not.
        """
        if batch_size % self.world_size:
            lower = batch_size - batch_size % self.world_size
            raise _said_once(
                ConfigError(
                    f"--batch-size {batch_size} (the whole job's batch) does not divide by the "
                    f"{self.world_size} processes; use a multiple of {self.world_size}, such as "
                    f"{lower or self.world_size}"
                )
            )

    def start(self) -> None:
        """Join the job's process group."""
        from ..dist import init

        init()

    def wrap(self, module: Any) -> Any:
        """The model in DDP, with gradient sums exact on resume."""
        from ..dist import wrap_ddp

        return wrap_ddp(module)

    def open_mirror(
        self, path: Path, key: Any, *, replicas: int = 0, counter: Any = None, every: int = 1
    ) -> Any:
        """This process's part of the mirror set at ``path`` (with ``replicas``: 0 or 1;
        ``counter``: the set's freshness counter, or None, advanced every ``every`` saves)."""
        from ..dist import open_mirror_set

        return open_mirror_set(
            path,
            key,
            replicas=replicas,
            elastic=self.elastic,
            counter=counter,
            counter_every=every,
        )

    def finish(self) -> None:
        """Leave the process group and end this worker at once (:func:`plinius.dist.finish`)."""
        from ..dist import finish

        finish(0)


def check_replicas(replicas: int, job: TorchrunJob | None) -> None:
    """Refuse a ``--replicas`` that is not 0 or 1, or replicas without torchrun (one line).

    Raises:
        ConfigError: it is refused (under torchrun, said once by rank 0).
    """
    why = None
    if replicas not in (0, 1):
        why = (
            f"--replicas {replicas}: give 1 (every process's sealed replica kept on the other "
            "machines: the job survives the loss of one) or 0 (none)"
        )
    elif replicas and job is None:
        why = (
            "--replicas 1: nothing to replicate to, this is a single process on one machine; "
            "start the job with torchrun on several machines (README: Several machines), or "
            "leave --replicas out"
        )
    if why is not None:
        exc = ConfigError(why)
        raise exc if job is None else _said_once(exc)


def _said_once(exc: ConfigError) -> ConfigError:
    """An error every process finds alike (bad options): rank 0 says it, the others exit."""
    exc.reported_by = 0  # type: ignore[attr-defined]
    return exc


def torchrun_job() -> TorchrunJob | None:
    """This process's torchrun job, or ``None`` when ``plinius`` was not started by torchrun.

    Read from torchrun's environment without importing torch (so that the
    start-up event stays cheap).

    Raises:
        ConfigError: torchrun's variables are there but not understood.
    """
    env = os.environ
    if "LOCAL_RANK" not in env or "WORLD_SIZE" not in env or "TORCHELASTIC_RUN_ID" not in env:
        return None
    try:
        rank, world = int(env.get("RANK", env["LOCAL_RANK"])), int(env["WORLD_SIZE"])
    except ValueError as exc:
        raise ConfigError(f"torchrun's environment is not understood ({exc})") from exc
    return TorchrunJob(rank, world)
