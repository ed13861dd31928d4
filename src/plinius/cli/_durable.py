"""``plinius train --durable-dir``: the durable tier's options, restore line and failure report."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..counters import Counter
from ..crypto import MasterKey
from ..errors import ConfigError, PliniusError
from ..job import EventLog

if TYPE_CHECKING:  # pragma: no cover
    from ..mirror import DurableCopy

__all__ = ["DEFAULT_EVERY", "durable_owns", "durable_path", "open_durable"]

DEFAULT_EVERY = 100  # steps between copies when neither period is given


def durable_path(
    directory: Path | None, every: int | None, interval: float | None, mirror: Path
) -> Path | None:
    """The durable copy's path (``DIR/<mirror's name>``), or None without ``--durable-dir``.

    Raises:
        click.UsageError: ``--durable-every``/``--durable-interval`` without ``--durable-dir``.
        ConfigError: the directory does not exist.
    """
    if directory is None:
        stray = [f for f, v in (("--durable-every", every), ("--durable-interval", interval)) if v]
        if stray:
            verb = "needs" if len(stray) == 1 else "need"
            raise click.UsageError(f"{' and '.join(stray)} {verb} --durable-dir")
        return None
    if not directory.is_dir():  # before the key, data and model are loaded
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ConfigError(f"the durable directory {directory} {what}; create it first")
    return directory / mirror.name


def durable_owns(mirror: Path) -> Callable[[str], bool]:
    """Which names the durable directory owns: the copy (the mirror's name), its temporary files."""
    prefix = f".{mirror.name}."  # temp_prefix() for an ordinary name; longer ones are cut

    def owns(name: str) -> bool:
        return name == mirror.name or (name.startswith(prefix) and name.endswith(".tmp"))

    return owns


def open_durable(
    copy_path: Path | None,
    every: int | None,
    interval: float | None,
    mirror_path: Path,
    key: MasterKey,
    counter: Counter | None,
    events: EventLog,
) -> tuple[DurableCopy | None, Callable[[], None]]:
    """Start the durable tier; restore the mirror from the copy if the PM mirror is gone.

    Prints (stderr) one line when it restores: which step, and that the steps
    after it are lost and will be trained again. A PM mirror that exists wins.

    Returns:
        The tier (None without ``--durable-dir``), and a function the training
        thread calls to report the first failed copy once (stderr and events).

    Raises:
        ConfigError: the directory is missing or not writable.
        RollbackError: with a counter, the copy is older than the counter allows.
        PliniusError: the copy cannot be restored.
    """
    if copy_path is None:
        return None, lambda: None
    from ..mirror import DurableCopy, restore_durable  # torch: only once a job runs

    failed: list[PliniusError] = []
    durable = DurableCopy(
        copy_path.parent,
        copy_path.name,
        every=every if every is not None or interval is not None else DEFAULT_EVERY,
        interval_s=interval,
        on_error=failed.append,  # reported by the training thread, not the writer's
    )
    if not mirror_path.exists() and copy_path.exists():
        info = restore_durable(copy_path, mirror_path, key, counter=counter)
        when = (
            datetime.datetime.fromtimestamp(info.saved_at, datetime.UTC).isoformat(
                timespec="seconds"
            )
            if info.saved_at is not None
            else "before any step"
        )
        step = info.step if info.step is not None else 0
        click.echo(
            f"restored step {step} from the durable copy {copy_path} (written {when}); "
            f"steps after {step} are lost and will be trained again",
            err=True,
        )
        events.write("durable_restored", step=info.step, path=str(copy_path), saved_at=when)

    def report() -> None:
        if failed:
            exc = failed.pop()
            click.echo(f"warning: {exc}", err=True)
            events.write("durable_error", error=str(exc))

    return durable, report
