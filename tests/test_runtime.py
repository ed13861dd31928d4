"""The command line shortens OpenMP's idle spinning before torch loads, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys

from plinius._runtime import OMP_SPIN_COUNT, openmp_settings, tune_openmp


def test_tune_openmp_sets_a_short_spin_count() -> None:
    env: dict[str, str] = {}
    tune_openmp(env)
    assert env == {"GOMP_SPINCOUNT": OMP_SPIN_COUNT}


def test_tune_openmp_keeps_what_the_user_set() -> None:
    for mine in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        env = dict(mine)
        tune_openmp(env)
        assert env == mine


_PROBE = """
import os, sys

class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("GOMP_SPINCOUNT"))
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, Probe())
import plinius.cli
import torch
"""


def _probe(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_the_command_line_sets_it_before_torch_is_imported() -> None:
    assert _probe({}) == f"at torch import: {OMP_SPIN_COUNT}"
    assert _probe({"GOMP_SPINCOUNT": "7"}) == "at torch import: 7"


def test_the_settings_are_reported() -> None:
    s = openmp_settings()
    assert set(s) == {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS"}
