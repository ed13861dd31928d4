"""Losing a whole machine, with real torchrun: each process keeps its own mirror directory.

With ``--machine-per-process`` every process of the job keeps its mirror in a
directory of its own, standing for its own machine's persistent memory. One
process commits step 15, deletes its directory and dies (SIGKILL) while the
other's save of step 15 is stalled; torchrun restarts the group. The lost
"machine" comes back empty: the job must resume at the last globally committed
step (14) from the survivor's mirror and the lost process's sealed replica,
and end bit-for-bit equal to an uninterrupted run.

(Two torchrun agents with a c10d rendezvous, one per machine, are the issue's
setting; a replaced agent rejoining the rendezvous hangs in torch's c10d
rendezvous here, so the suite runs one agent with two directories.)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from plinius.crypto import MasterKey

from .conftest import result, run, worker_args

pytestmark = pytest.mark.slow


@pytest.fixture
def scratch() -> Iterator[Path]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-nodeloss-", dir=base))
    MasterKey.generate().save(d / "k.key")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_lost_machine_resumes_from_the_replicas_bit_identical(scratch: Path) -> None:
    d = scratch
    more = ("--steps", "40", "--replicas", "1", "--machine-per-process")
    ref = run(worker_args(d / "ref", d / "k.key", d / "ref.json", *more), nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    res = run(
        worker_args(d / "loss", d / "k.key", d / "loss.json", *more),
        nproc=2,
        restarts=2,
        env={
            "WORKER_SLOW_SAVE": "15",
            "WORKER_DIE_AFTER_COMMIT": "15:1",
            "WORKER_WIPE_ON_DIE": "1",
        },
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = result(d / "loss.json"), result(d / "ref.json")
    assert got["resumed_from"] == 14
    # the lost machine holds its own mirror again, and no seed is left behind
    assert sorted(p.name for p in (d / "loss" / "machine-1").iterdir()) == ["local-1.plm"]
    assert got["losses"] == want["losses"]
    assert got["digests"] == want["digests"]
    assert len(set(got["digests"])) == 1


def test_a_lost_machine_without_replicas_is_refused(scratch: Path) -> None:
    d = scratch
    more = ("--steps", "40", "--machine-per-process")
    res = run(
        worker_args(d / "loss", d / "k.key", d / "loss.json", *more),
        nproc=2,
        restarts=1,
        env={"WORKER_DIE_AFTER_COMMIT": "15:1", "WORKER_WIPE_ON_DIE": "1"},
    )
    assert res.returncode != 0
    assert "spans 2 machines: open it with replicas" in res.stderr
