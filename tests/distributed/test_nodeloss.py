"""Losing a whole machine, with real torchrun: each process keeps its own mirror directory.

With ``--machine-per-process`` every process of the job keeps its mirror in a
directory of its own, standing for its own machine's persistent memory. One
process commits step 15, deletes its directory and dies (SIGKILL) while the
other's save of step 15 is stalled; torchrun restarts the group. The lost
"machine" comes back empty: the job must resume at the last globally committed
step (14) from the survivor's mirror and the lost process's sealed replica,
and end bit-for-bit equal to an uninterrupted run.

The issue's own setting is tested too: two torchrun agents with a c10d
rendezvous on 127.0.0.1, one per machine, each with its own mirror directory;
one agent is SIGKILLed with its worker mid-run, its directory deleted, and a
new agent started with an empty one.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plinius.crypto import MasterKey
from plinius.mirror import Mirror

from .conftest import finish, free_port, result, run, start_agent, stop, worker_args

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


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_agents_one_lost_with_its_mirror_resumes_bit_identical(
    scratch: Path, reference: dict[str, object]
) -> None:
    """Two agents (two machines): agent B is killed with its worker mid-run and its
    mirror directory deleted; a new agent B starts empty. The job resumes where it
    was globally committed (from A's mirror and B's replica, kept by A) and ends
    bit-for-bit as the uninterrupted run."""
    d = scratch
    port, rid = free_port(), "nodeloss"
    for name in ("pids-a", "pids-b", "pids-b2"):
        (d / name).mkdir()
    slow = {"WORKER_STEP_SLEEP": "0.05"}
    out = d / "loss.json"

    def agent(name: str, host: bool, pids: str) -> subprocess.Popen[str]:
        args = worker_args(d / name, d / "k.key", out, *MACHINE_PER_PROCESS)
        env = {**slow, "WORKER_PIDS": str(d / pids)}
        return start_agent(args, port=port, run_id=rid, log=d / f"{name}.log", host=host, env=env)

    a = agent("A", True, "pids-a")
    procs = [a]
    try:
        procs.append(agent("B", False, "pids-b"))
        _wait_for(d / "pids-b" / "0.pid", 120)
        time.sleep(1.0)  # a few steps committed, training under way
        assert procs[1].poll() is None
        stop(procs[1])  # the machine is lost: agent and worker, SIGKILL
        shutil.rmtree(d / "B")  # and its persistent memory with it
        procs.append(agent("B", False, "pids-b2"))
        codes = finish(procs[::2], timeout=240)
    finally:
        for p in procs:
            stop(p)
    logs = (d / "A.log").read_text()[-3000:] + (d / "B.log").read_text()[-3000:]
    assert codes == [0, 0], logs
    got, want = result(out), reference
    resumed = got["resumed_from"]
    assert isinstance(resumed, int) and 0 < resumed < 40, logs  # the loss landed mid-run
    assert got["losses"] == want["losses"]
    assert got["digests"] == want["digests"]
    # the new machine holds its own mirror again, and no seed is left behind
    assert sorted(p.name for p in (d / "B" / "machine-0").iterdir()) == ["local-0.plm"]
