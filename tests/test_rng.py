"""``plinius.rng``: RNGState's home."""

from __future__ import annotations

import random

import numpy as np
import torch

import plinius
from plinius.rng import RNGState


def test_rng_state_lives_in_plinius_rng() -> None:
    assert plinius.RNGState is RNGState
    assert RNGState.__module__ == "plinius.rng"


def test_rng_state_round_trip() -> None:
    g = torch.Generator().manual_seed(5)
    rng = RNGState(generators={"g": g})
    sd = rng.state_dict()
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    rng.load_state_dict(sd)
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert a == b
