"""What the framework integrations share: a dict as a Stateful, deferred RNG, the job check.

A framework's mirrored state is :func:`job_state`: the job (checked on resume),
the model (restored in place, strictly), the framework's checkpoint dict (a
:class:`DictState`) and the global random generators (a :class:`DeferredRNG`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..counters import Counter
from ..crypto import MasterKey
from ..errors import ConfigError, StateMismatchError
from ..mirror import Mirror
from ..rng import RNGState

__all__ = [
    "DeferredRNG",
    "DictState",
    "MirrorSettings",
    "check_job",
    "job_state",
    "restore_dict",
    "resume_job",
]


class DictState:
    """A framework's checkpoint dict as a Stateful the mirror saves and restores.

    ``state_dict()`` asks ``provide`` for the dict at save time. On restore the
    target is a template of the saved top-level keys (the mirror's lenient
    rule for Stateful objects: below them, tensors and containers are built
    from the saved state), and the restored dict lands in :attr:`loaded`.
    """

    def __init__(
        self,
        provide: Callable[[], dict[str, Any]] | None = None,
        keys: list[str] | None = None,
    ) -> None:
        self._provide = provide
        self._keys = keys or []
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The dict to save, or (when restoring) the template of its keys."""
        if self._provide is not None:
            return self._provide()
        return dict.fromkeys(self._keys)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Keep the restored dict."""
        self.loaded = dict(sd)


class DeferredRNG:
    """The global generators, saved now and put back only when :meth:`apply` is called.

    A framework draws random numbers between the restore and the first resumed
    step (building iterators, sanity checks) that the uninterrupted run drew
    long before; applying the saved state just before that step keeps the
    step's draws (dropout masks) identical.
    """

    def __init__(self) -> None:
        self._rng = RNGState()
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The generators' current states."""
        return self._rng.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Keep ``sd`` until :meth:`apply`."""
        self._pending = sd

    def apply(self) -> bool:
        """Set the generators from the restored state (once); whether there was one."""
        if self._pending is None:
            return False
        self._rng.load_state_dict(self._pending)
        self._pending = None
        return True


class MirrorSettings:
    """What every framework's mirror callback is given, checked once (Lightning's, HF's)."""

    def _configure(
        self,
        path: str | os.PathLike[str],
        key: MasterKey,
        every_n_steps: int,
        job: str | None,
        counter: Counter | None,
    ) -> None:
        """Check and keep the callback's settings.

        Raises:
            ConfigError: ``every_n_steps`` is not a positive integer, or ``key``
                is not a :class:`~plinius.crypto.MasterKey`.
        """
        if type(every_n_steps) is not int or every_n_steps < 1:
            raise ConfigError("every_n_steps must be a positive integer")
        if not isinstance(key, MasterKey):
            raise ConfigError("key must be a plinius MasterKey (MasterKey.load(path))")
        self.path = Path(path)
        self._key = key
        self._every = every_n_steps
        self._name = job
        self._counter = counter
        self._mirror: Mirror | None = None
        self._rng = DeferredRNG()


def check_job(mirror: Mirror, job: dict[str, Any], where: str | os.PathLike[str]) -> None:
    """Refuse a mirror written by another job (another framework, module or name).

    Raises:
        StateMismatchError: the mirror's saved ``"job"`` differs from ``job``.
    """
    saved = mirror.committed_value("job")
    if saved != job:
        raise StateMismatchError(
            f"mirror {where} holds the state of another job ({_describe(saved)}), not of "
            f"this one ({_describe(job)}); give this run its own mirror path"
        )


def _describe(job: Any) -> str:
    if not isinstance(job, dict):
        return "not a framework integration's job" if job is not None else "no job recorded"
    return ", ".join(f"{k}={v}" for k, v in sorted(job.items()))


def restore_dict(
    mirror: Mirror, state: dict[str, Any], holder_name: str
) -> tuple[int | None, dict[str, Any] | None]:
    """Restore ``state`` (whose ``holder_name`` entry is a :class:`DictState`) from the mirror.

    The holder's template is given the saved top-level keys first (they are a
    plain value of the saved state, ``holder_name + "_keys"``).

    Returns:
        The saved step and the restored dict; ``(None, None)`` if nothing was saved.
    """
    keys = mirror.committed_value(holder_name + "_keys")
    if keys is None:
        return None, None
    holder = DictState(keys=list(keys))
    state = {**state, holder_name: holder, holder_name + "_keys": keys}
    step = mirror.restore(state)
    return step, holder.loaded


def job_state(
    job: dict[str, Any], model: Any, holder_name: str, ckpt: dict[str, Any], rng: DeferredRNG
) -> dict[str, Any]:
    """The state a framework integration saves: job, model, checkpoint dict, RNG.

    The dict's top-level keys are saved as a plain value too (``holder_name +
    "_keys"``), so :func:`restore_dict` can build the template.
    """
    return {
        "job": job,
        "model": model,
        holder_name: DictState(lambda: ckpt),
        holder_name + "_keys": list(ckpt),
        "rng": rng,
    }


def resume_job(
    mirror: Mirror,
    job: dict[str, Any],
    model: Any,
    holder_name: str,
    rng: DeferredRNG,
    where: str | os.PathLike[str],
) -> tuple[int | None, dict[str, Any] | None]:
    """Restore what :func:`job_state` saved: the model in place, the RNG deferred.

    Returns:
        The saved step and the checkpoint dict; ``(None, None)`` if the mirror
        holds nothing yet.

    Raises:
        StateMismatchError: another job's mirror, or the model's parameters
            changed (raised before anything is written).
    """
    if mirror.info().generation == 0:
        return None, None
    check_job(mirror, job, where)
    return restore_dict(mirror, {"job": job, "model": model, "rng": rng}, holder_name)
