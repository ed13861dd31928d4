"""Capture and restore the global random generators, as one Stateful object.

Put an :class:`RNGState` in the mirrored state (``{"rng": RNGState()}``) and a
restore puts Python's, NumPy's and torch's generators back where the save
found them: a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState"]


class RNGState:
    """Captures and restores the global random generators.

    Python's ``random``, NumPy's legacy global generator, torch's CPU generator
    (and CUDA generators when CUDA is available), and any private
    ``torch.Generator`` passed as ``generators={"name": gen}``. Put one in the
    mirrored state: ``{"rng": RNGState()}``.
    """

    def __init__(self, generators: Mapping[str, torch.Generator] | None = None) -> None:
        self.generators = dict(generators or {})

    def state_dict(self) -> dict[str, Any]:
        """The generators' current states (copies)."""
        import random

        name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
        version, internal, gauss = random.getstate()
        sd: dict[str, Any] = {
            # Python's Mersenne Twister state is 625 ints: one tensor, not 625
            # plain values to walk and encode on every save.
            "python": {
                "version": int(version),
                "state": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss,
            },
            "numpy": {
                "name": str(name),
                "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():  # pragma: no cover - CPU build here
            sd["cuda"] = list(torch.cuda.get_rng_state_all())
        sd["generators"] = {k: g.get_state() for k, g in self.generators.items()}
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Set every generator from a :meth:`state_dict`."""
        import random

        py = sd["python"]
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((py["version"], internal, py["gauss_next"]))
        n = sd["numpy"]
        key = np.asarray(n["key"].numpy(), dtype=np.uint32)
        np.random.set_state((n["name"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(sd["torch"])
        if "cuda" in sd:  # pragma: no cover - CPU build here
            torch.cuda.set_rng_state_all(sd["cuda"])
        for k, g in self.generators.items():
            g.set_state(sd["generators"][k])

    def __repr__(self) -> str:
        return f"RNGState(generators={sorted(self.generators)})"
