"""Losing a whole machine, with real torchrun: each process keeps its own mirror directory.

With ``--machine-per-process`` every process of the job keeps its mirror in a
directory of its own, standing for its own machine's persistent memory. One
process commits step 15, deletes its directory and dies (SIGKILL) while the
other's save of step 15 is stalled; torchrun restarts the group. The lost
"machine" comes back empty: the job must resume at the last globally committed
step (14) from the survivor's mirror and the lost process's sealed replica,
and end bit-for-bit equal to an uninterrupted run.

The issue's own setting (two torchrun agents, one per machine, one SIGKILLed
with its worker and its directory deleted, a new one started empty) runs
through the CLI in test_replicas_cli.py; a set across machines without
replicas is refused there too.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from plinius.crypto import MasterKey
from plinius.mirror import Mirror

from .conftest import result, run, worker_args

pytestmark = pytest.mark.slow


def _scratch() -> Iterator[Path]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-nodeloss-", dir=base))
    MasterKey.generate().save(d / "k.key")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


scratch = pytest.fixture(_scratch)
MACHINE_PER_PROCESS = ("--steps", "40", "--replicas", "1", "--machine-per-process")


@pytest.fixture(scope="module")
def reference() -> Iterator[dict[str, object]]:
    """The uninterrupted run the node-loss runs must end as (one per module: the
    result does not depend on the key or the directories)."""
    for d in _scratch():
        ref = run(
            worker_args(d / "ref", d / "k.key", d / "ref.json", *MACHINE_PER_PROCESS), nproc=2
        )
        assert ref.returncode == 0, ref.stderr[-3000:]
        yield result(d / "ref.json")


def _lose_machine_1(
    d: Path, want: dict[str, object], env: dict[str, str], restarts: int
) -> dict[str, object]:
    """Run the job with ``env``'s hooks (process 1 dies with its directory); check
    it ends as the uninterrupted ``want``; the interrupted run's result."""
    env = {"WORKER_DIE_AFTER_COMMIT": "15:1", "WORKER_WIPE_ON_DIE": "1", **env}
    args = worker_args(d / "loss", d / "k.key", d / "loss.json", *MACHINE_PER_PROCESS)
    res = run(args, nproc=2, restarts=restarts, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = result(d / "loss.json")
    # the lost machine holds its own mirror again, and no seed is left behind
    assert sorted(p.name for p in (d / "loss" / "machine-1").iterdir()) == ["local-1.plm"]
    assert got["losses"] == want["losses"]
    assert got["digests"] == want["digests"]
    assert len(set(got["digests"])) == 1
    return {**got, "output": res.stdout + res.stderr}


def test_a_lost_machine_resumes_from_the_replicas_bit_identical(
    scratch: Path, reference: dict[str, object]
) -> None:
    got = _lose_machine_1(scratch, reference, {"WORKER_SLOW_SAVE": "15"}, restarts=2)
    assert got["resumed_from"] == 14


def test_a_peer_dying_while_the_lost_machine_is_seeded(
    scratch: Path, reference: dict[str, object]
) -> None:
    """The lost machine's process is killed while it receives the survivor's mirror
    (the sender's death is the same case seen from the other side: worker.py's
    WORKER_DIE_SEEDING=donor): the next restart seeds it again, from scratch, and
    the job still ends bit-for-bit as the uninterrupted run."""
    got = _lose_machine_1(scratch, reference, {"WORKER_DIE_SEEDING": "receiver"}, restarts=3)
    assert "dies while seeding" in str(got["output"])  # the hook fired
    assert got["resumed_from"] in (14, 15)  # 15 unless the survivor died mid-save of it


@pytest.mark.parametrize(
    ("how", "said"),
    [("flip", "fails authentication"), ("replay", "holds step 10, not the agreed step")],
)
def test_a_seed_tampered_with_on_the_wire_is_refused(scratch: Path, how: str, said: str) -> None:
    """The survivor's mirror, sent to the lost machine, is changed on the way: a byte
    flipped, or replaced by the survivor's own older file (step 10). The lost process
    refuses it (IntegrityError), no bytes of it are kept, and the survivor's mirror
    still holds the agreed step."""
    d = scratch
    env = {"WORKER_DIE_AFTER_COMMIT": "15:1", "WORKER_WIPE_ON_DIE": "1", "WORKER_TAMPER_SEED": how}
    args = worker_args(d / "loss", d / "k.key", d / "loss.json", *MACHINE_PER_PROCESS)
    res = run(args, nproc=2, restarts=1, env=env)
    assert res.returncode != 0
    assert said in res.stderr and "IntegrityError" in res.stderr, res.stderr[-3000:]
    lost = d / "loss" / "machine-1"
    assert not list(lost.glob(".seed-*"))  # the refused bytes are not kept
    key = MasterKey.load(d / "k.key")
    with Mirror(d / "loss" / "machine-0" / "local-0.plm", key, readonly=True) as survivor:
        assert survivor.held_steps()[0] in (14, 15)
