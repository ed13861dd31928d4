"""Shared fixtures: a master key, and scratch directories that are always removed."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from plinius.crypto import MasterKey


@pytest.fixture
def key() -> MasterKey:
    """A fresh random master key."""
    return MasterKey.generate()


@pytest.fixture
def other_key() -> MasterKey:
    """A second, different master key."""
    return MasterKey.generate()


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory in /dev/shm (emulated PM), removed afterwards.

    Falls back to the system temp directory where /dev/shm does not exist.
    """
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-test-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
