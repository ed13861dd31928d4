"""``--counter`` for the commands that read a mirror, and what they say about freshness.

Every authentication tag of an old copy of a mirror still verifies: only the
trusted counter the job ran with tells a rolled-back copy from the newest one.
``plinius export``, ``evaluate`` and ``inspect --key`` take the same
``--counter`` spec as ``plinius train`` (built by :func:`plinius.job.make_counter`)
and open the mirror with it, so a rolled-back copy is refused with
:class:`~plinius.errors.RollbackError`. Without ``--counter`` they work, and say
plainly that freshness was not checked (and, when the mirror records that its
job used a counter, how to check it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import RollbackError

if TYPE_CHECKING:  # pragma: no cover
    from ..counters import Counter
    from ..crypto import MasterKey
    from ..dist import SetView
    from ..mirror import Mirror, MirrorInfo

__all__ = [
    "TRAIN_NO_COUNTER_NOTE",
    "counter_option",
    "freshness_line",
    "open_for_reading",
    "reading_counter",
    "require_recorded_counter",
    "train_note",
    "unchecked_note",
]

COUNTER_SPECS = "file:PATH, tpm[:TCTI] or keyserver"

TRAIN_NO_COUNTER_NOTE = (
    "note: no --counter: freshness is unprotected (a rolled-back copy of the mirror is not "
    f"detected); pass --counter ({COUNTER_SPECS}) to enable it"
)


def train_note(info: MirrorInfo) -> str:
    """The one line ``plinius train`` prints at start when it runs without ``--counter``."""
    if info.counter_expected is not None:
        return (
            "note: no --counter: freshness is unprotected, although this mirror's job used a "
            "freshness counter (a rolled-back copy of the mirror is not detected); pass "
            f"--counter ({COUNTER_SPECS}, as before) to check it"
        )
    return TRAIN_NO_COUNTER_NOTE


def counter_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--counter SPEC`` option, with this command's help text."""
    return click.option("--counter", "counter_spec", default=None, help=help_text)


READ_COUNTER_HELP = (
    "The freshness counter the job was trained with (the same spec as 'plinius train "
    f"--counter': {COUNTER_SPECS}): refuse a rolled-back copy of the mirror. Without it, "
    "freshness is not checked."
)


def reading_counter(
    spec: str | None,
    key: MasterKey,
    key_server: str | None,
    key_server_pubkey: str | None,
    job_id: str,
) -> Counter | None:
    """The counter a read-only command checks the mirror against (``None`` without a spec).

    Built as ``plinius train`` builds it, except that a missing TPM index is
    refused rather than read as 0 (nothing is defined or advanced by a reader).

    Raises:
        ConfigError: the spec is not understood or lacks the key server.
    """
    from ..job import make_counter

    counter, _ = make_counter(spec, key, key_server, key_server_pubkey, job_id, create=False)
    return counter


def require_recorded_counter(info: MirrorInfo, spec: str, label: str) -> None:
    """Refuse a ``--counter`` check of a mirror whose committed generation records no counter.

    Such a mirror's freshness cannot be checked: its manifest expects no counter
    value. A job that used a counter and was later resumed without one (a host
    dropping ``--counter``) looks like this.

    Raises:
        RollbackError: the mirror records no counter.
    """
    if info.counter_expected is None:
        raise RollbackError(
            f"{label} was last written without a freshness counter, so --counter {spec} "
            "cannot check it: it may be a rolled-back copy trained on without the counter; "
            "use the newest copy, or omit --counter to read it unchecked"
        )


def open_for_reading(
    path: Path,
    key: MasterKey,
    spec: str | None,
    key_server: str | None,
    key_server_pubkey: str | None,
    job_id: str | None,
) -> Mirror | SetView:
    """Open the mirror at ``path`` read-only, checked against the counter ``spec`` names.

    A mirror set (a directory) is read at its globally committed step, checked as a whole.

    Args:
        path: the mirror file.
        key: the master key.
        spec: the ``--counter`` spec, or ``None`` (then nothing about freshness is checked).
        key_server: the key server's URL (for ``keyserver``).
        key_server_pubkey: its public key, hex (for ``keyserver``).
        job_id: the job (for ``keyserver``; default: the file's name, as ``train``).

    Returns:
        The open mirror; the caller closes it.

    Raises:
        RollbackError: a rolled-back copy, or a mirror that records no counter
            although ``spec`` names one.
        ConfigError: the spec is not understood.
    """
    from ..mirror import Mirror

    counter = reading_counter(spec, key, key_server, key_server_pubkey, job_id or path.name)
    if path.is_dir():
        from ..dist import SetView

        # A set (a multi-process job) is checked against its one counter as a whole.
        return SetView(path, key, counter=counter)
    m = Mirror(path, key, readonly=True, counter=counter)
    if spec is not None:
        try:
            require_recorded_counter(m.info(), spec, str(path))
        except BaseException:
            m.close()
            raise
    return m


def unchecked_note(info: MirrorInfo) -> str:
    """The one-line note of a command that read ``info``'s mirror without ``--counter``."""
    if info.counter_expected is not None:
        return (
            "note: freshness not checked: this mirror's job used a freshness counter; pass "
            f"--counter ({COUNTER_SPECS}, as given to 'plinius train') to check it; "
            "without it a rolled-back copy of the mirror is not detected"
        )
    return (
        "note: freshness not checked: this mirror was written without a freshness counter, "
        "so a rolled-back copy of it cannot be detected"
    )


def freshness_line(info: MirrorInfo, spec: str | None) -> str:
    """What ``plinius inspect --key`` says was checked about freshness."""
    if spec is not None:
        return (
            f"checked against --counter {spec}: this generation expects counter value "
            f"{info.counter_expected} and the counter agrees; not a rolled-back copy"
        )
    if info.counter_expected is not None:
        return (
            "NOT checked: this mirror's job used a freshness counter; pass --counter "
            f"({COUNTER_SPECS}) to check it; until then a rolled-back copy would pass "
            "every check above"
        )
    return (
        "NOT checkable: written without a freshness counter, so a rolled-back copy "
        "of the file would pass every check above"
    )
