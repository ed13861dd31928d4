"""Limits on what a job may ask for, checked where the job starts (CLI, ``fit``, a cfg).

Kept at the bottom of the layers so that the Darknet reader, the models and
the training loop all check against the same numbers.
"""

from __future__ import annotations

import math

from .errors import ConfigError

__all__ = ["MAX_LEARNING_RATE", "check_learning_rate"]

# The largest learning rate a job may use. torch hands the rate, or what the
# optimizer derives from it (Adam's first step is lr / (1 - beta1): 10x for the
# default beta1), to kernels that convert it to the parameters' dtype, and fails
# in the middle of a step ("value cannot be converted to type float without
# overflow") beyond that dtype's range. float16, the narrowest dtype torch trains
# in, ends at 65504: 1e3 keeps Adam's 10x under it, and no optimizer trains with
# a rate anywhere near it (SGD's are below 10, Adam's below 0.1).
MAX_LEARNING_RATE = 1e3


def check_learning_rate(lr: object, what: str = "the learning rate") -> float:
    """Refuse a learning rate an optimizer cannot use (see :data:`MAX_LEARNING_RATE`).

    Args:
        lr: The rate (a number, or a one-element tensor).
        what: Where it comes from, for the message (``--lr``, say).

    Returns:
        The rate as a float.

    Raises:
        ConfigError: Not a finite number above 0 and at most :data:`MAX_LEARNING_RATE`.
    """
    try:
        value = float(lr)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{what} is {lr!r}, not a number") from None
    if not (math.isfinite(value) and 0 < value <= MAX_LEARNING_RATE):
        raise ConfigError(
            f"{what} is {value:g}, not a usable learning rate: give a number above 0 and at "
            f"most {MAX_LEARNING_RATE:g} (larger rates overflow the optimizer's arithmetic; "
            "common ones are 1e-4 to 1)"
        )
    return value
