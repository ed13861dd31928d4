"""plinius: secure and persistent machine-learning training.

The training state (model, optimizer, scheduler, RNG, data position) is
mirrored, encrypted and authenticated, into persistent memory after every
iteration, crash-consistently; training data stays sealed at rest; keys reach
the trusted environment only after attestation::

    from plinius import MasterKey, Mirror, RNGState

    key = MasterKey.load("owner.key")
    state = {"model": model, "optim": optimizer, "rng": RNGState()}
    with Mirror("/dev/shm/job.plm", key) as mirror:
        step = mirror.restore(state)
        ...
        mirror.save(state, step=step)

Heavy modules (torch) are imported lazily, on first use of a name that needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from .errors import (
    AttestationError,
    ConfigError,
    DatasetIndexError,
    FormatError,
    IntegrityError,
    KeyFileError,
    KeyReleaseError,
    PliniusError,
    RollbackError,
    StateMismatchError,
    StorageError,
    WrongKeyError,
)

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_LAZY = {
    "MasterKey": "crypto",
    "Mirror": "mirror",
    "MirrorInfo": "mirror",
    "PendingSave": "mirror",
    "RNGState": "rng",
    "ResumableLoader": "data.loader",
    "seal_dataset": "data",
    "SealedDataset": "data",
    "SealedSampler": "data",
    "fit": "train",
    "FitResult": "train",
    "StepEvent": "train",
    "Counter": "counters",
    "FileCounter": "counters",
}

__all__ = [
    "AttestationError",
    "ConfigError",
    "Counter",
    "DatasetIndexError",
    "FileCounter",
    "FitResult",
    "FormatError",
    "IntegrityError",
    "KeyFileError",
    "KeyReleaseError",
    "MasterKey",
    "Mirror",
    "MirrorInfo",
    "PendingSave",
    "PliniusError",
    "RNGState",
    "ResumableLoader",
    "RollbackError",
    "SealedDataset",
    "SealedSampler",
    "StateMismatchError",
    "StepEvent",
    "StorageError",
    "WrongKeyError",
    "__version__",
    "fit",
    "seal_dataset",
]

if TYPE_CHECKING:  # pragma: no cover
    from .counters import Counter, FileCounter
    from .crypto import MasterKey
    from .data import SealedDataset, SealedSampler, seal_dataset
    from .data.loader import ResumableLoader
    from .mirror import Mirror, MirrorInfo, PendingSave
    from .rng import RNGState
    from .train import FitResult, StepEvent, fit


__getattr__ = lazy_exports(__name__, _LAZY)


def __dir__() -> list[str]:
    return __all__
