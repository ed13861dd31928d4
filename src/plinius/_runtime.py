"""Process-wide settings the ``plinius`` command applies before torch loads.

torch's CPU build runs its parallel regions on OpenMP threads (GNU libgomp).
By default an idle libgomp thread spins for about 300,000 iterations (a few
milliseconds here) before it sleeps. A mirror save comes right after
``optimizer.step()``, while those threads still spin on the very cores
AES-GCM needs: measured here, encrypting a 20 MB state took 6.0 ms right after
a training step instead of 3.3 ms. A spin count of 10,000 ends the spinning
within about 0.1 ms and left torch's own step time unchanged (cnn-tiny and
cnn-10mb at batch 128; docs/BENCHMARKS.md has the numbers and commands).

libgomp reads its environment once, when torch loads it, so this must run
before torch is imported; the command line does it first thing. A value the
user set is kept. Library users set the variable themselves (README.md).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# libgomp's idle-spin iterations before a thread sleeps (its default: 300,000).
OMP_SPIN_COUNT = "10000"


def tune_openmp(environ: MutableMapping[str, str] | None = None) -> None:
    """Shorten libgomp's idle spinning unless the user chose a wait policy or spin count."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return  # the user's choice
    env["GOMP_SPINCOUNT"] = OMP_SPIN_COUNT


def openmp_settings() -> dict[str, str | None]:
    """The OpenMP variables of this process (what the benchmark report records)."""
    return {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
