"""A sparse hole appended to a mirror costs neither memory nor disk (issue 17, item 7).

``truncate -s 1G mirror.plm`` makes the file 1 GiB long for free. Opening it
must map and pre-fault only what the committed manifest uses, never the hole:
on tmpfs a pre-faulted hole is 1 GiB of RAM taken from /dev/shm.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from plinius.crypto import MasterKey
from plinius.mirror import Mirror

HOLE = 1 << 30
SLACK = 16 << 20  # what "a few MB" may grow by: the state, the interpreter's own noise


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")  # pragma: no cover


def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def _state(v: float) -> dict[str, Any]:
    return {"w": torch.full((64, 64), v), "b": torch.full((8,), v), "n": int(v)}


def _holed(shm_dir: Path, key: MasterKey) -> Path:
    path = shm_dir / "holed.plm"
    with Mirror(path, key) as m:
        m.save(_state(1.0), step=1)
        m.save(_state(2.0), step=2)
    os.truncate(path, path.stat().st_size + HOLE)  # what `truncate -s +1G` does
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_sparse_hole_is_never_populated_by_a_reader(shm_dir: Path, key: MasterKey) -> None:
    path = _holed(shm_dir, key)
    blocks, rss = _allocated(path), _rss()
    target = _state(0.0)
    with Mirror(path, key, readonly=True) as m:
        assert m.restore(target) == 2
        assert m.info().file_bytes == path.stat().st_size
        m.verify()
        grew_blocks, grew_rss = _allocated(path) - blocks, _rss() - rss
    assert torch.equal(target["w"], torch.full((64, 64), 2.0)) and target["n"] == 2
    assert grew_blocks < SLACK, f"opening populated {grew_blocks >> 20} MiB of the file"
    assert grew_rss < SLACK, f"opening grew the RSS by {grew_rss >> 20} MiB"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_sparse_hole_is_never_populated_by_a_writer(shm_dir: Path, key: MasterKey) -> None:
    path = _holed(shm_dir, key)
    blocks, rss = _allocated(path), _rss()
    with Mirror(path, key) as m:
        assert m.restore(_state(0.0)) == 2
        for step in (3, 4, 5):
            m.save(_state(float(step)), step=step)
    with Mirror(path, key) as m:  # and again, after commits that recorded the longer file
        m.save(_state(6.0), step=6)
    target = _state(0.0)
    with Mirror(path, key, readonly=True) as m:
        assert m.restore(target) == 6
    grew_blocks, grew_rss = _allocated(path) - blocks, _rss() - rss
    assert torch.equal(target["b"], torch.full((8,), 6.0))
    assert grew_blocks < SLACK, f"saving populated {grew_blocks >> 20} MiB of the file"
    assert grew_rss < SLACK, f"saving grew the RSS by {grew_rss >> 20} MiB"
