"""What a mirror records about its job, for ``inspect``, ``ls`` and ``evaluate``.

A mirror written by ``plinius train`` (``fit``) keeps, in its encrypted and
authenticated manifest, the job's settings (``state["job"]``: the ``--model``
given, batch size, seed, learning rate, classes, ...), its total steps and the
id of the sealed dataset it trains on. ``evaluate`` rebuilds the model from it
and says whether the data it scores is that training set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..dist import SetView
    from ..mirror import Mirror

__all__ = ["is_cfg_path", "job_of", "job_text", "model_for_evaluation", "scored_on"]


def job_of(m: Mirror | SetView) -> dict[str, Any]:
    """What the open mirror ``m`` records about its job (``None`` where it records nothing).

    Returns:
        ``model`` (the ``--model`` it trained), ``total_steps``, ``dataset_id``
        and ``settings`` (every recorded setting: batch size, seed, lr, ...).
    """
    settings = m.committed_value("job")
    settings = dict(settings) if isinstance(settings, dict) else None
    total = m.committed_value("total_steps")
    dataset_id = m.committed_value("dataset_id")
    model = settings.get("model") if settings else None
    return {
        "model": model if isinstance(model, str) else None,
        "total_steps": total if type(total) is int else None,
        "dataset_id": dataset_id if isinstance(dataset_id, str) else None,
        "settings": settings,
    }


def job_text(job: dict[str, Any]) -> str:
    """``model mlp, 300 steps in all, trained on dataset ID``: a job in one line."""
    text = f"model {job['model']}"
    if job["total_steps"] is not None:
        text += f", {job['total_steps']} steps in all"
    if job["dataset_id"] is not None:
        text += f", trained on dataset {job['dataset_id']}"
    return text


def is_cfg_path(model: str) -> bool:
    """Whether a ``--model`` value names a Darknet cfg file rather than a built-in model."""
    return model.endswith(".cfg") or os.sep in model


def model_for_evaluation(given: str | None, job: dict[str, Any], mirror: Path) -> str:
    """The model ``evaluate`` builds: ``--model`` if given, else the one the job recorded.

    A cfg's text is not in the mirror (only the path it was given as), so a job
    trained from a cfg needs ``--model`` again.

    Raises:
        ConfigError: no model given or recorded; a cfg job without ``--model``;
            a built-in model other than the recorded one.
    """
    recorded: str | None = job["model"]
    if given is not None:
        if recorded is not None and not is_cfg_path(recorded) and given != recorded:
            raise ConfigError(
                f"the job in {mirror} trained model {recorded!r}, not {given!r}; "
                "omit --model to use the job's own"
            )
        return given
    if recorded is None:
        raise ConfigError(
            f"{mirror} records no model (it was not written by 'plinius train'); pass --model"
        )
    if is_cfg_path(recorded):
        raise ConfigError(
            f"the job in {mirror} trained the Darknet cfg {recorded}, whose text the mirror "
            "does not keep; pass --model with that cfg file"
        )
    return recorded


def scored_on(data: Path, records: int, dataset_id: str, trained_on: str | None) -> str:
    """The line that says which data ``evaluate`` scored, and whether it was held out."""
    if trained_on is None:
        return (
            f"scored on {data} ({records} records, dataset {dataset_id}); the mirror does "
            "not record its training set: whether these records were held out is unknown"
        )
    if dataset_id == trained_on:
        return f"scored on the training data ({records} records): this is not a held-out estimate"
    return (
        f"scored on {data} ({records} records, dataset {dataset_id}), not the job's training "
        f"set ({trained_on}); held out only if no record of it was in the training set"
    )
