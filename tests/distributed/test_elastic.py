"""Elastic world size with real torchrun agents (``--nnodes=1:2``, c10d, gloo, CPU).

Two agents on this host stand for two machines, each with its own mirror
directory (its persistent memory), one process each. What is promised after a
world change, and checked here from every process's per-step trace
(``WORKER_TRACE``, see ``worker.py``):

* the job resumes at the newest step the survivors hold (the last globally
  committed one, or the one after it where the survivor committed it first);
* the model and optimizer restored there are bit for bit those of an
  uninterrupted run at that step, and the losses before it are its losses;
* the data position is a global sample cursor: each step trains exactly the
  records of the uninterrupted run's batch at that step, split among the
  processes there are, each record once; over an epoch every record once;
* after the change the trajectory is *not* the uninterrupted one's (another
  split of each batch, other dropout draws): nothing more is promised of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plinius.crypto import MasterKey

from .conftest import (
    finish,
    free_port,
    result,
    run,
    start_agent,
    stop,
    worker_args,
)

pytestmark = pytest.mark.slow

STEPS = 60  # 3 epochs of 20 batches of 24 (480 records)
PER_EPOCH = 20
RECORDS = 480
MORE = ("--steps", str(STEPS), "--sync")


@pytest.fixture(scope="module")
def job() -> Iterator[dict[str, Any]]:
    """A key, a scratch directory in /dev/shm, and the uninterrupted run's trace (made once)."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-elastic-", dir=base))
    key = d / "k.key"
    MasterKey.generate().save(key)
    made: list[dict[str, Any]] = []

    def reference() -> dict[str, Any]:
        if not made:
            (d / "ref-trace").mkdir()
            res = run(
                worker_args(d / "ref", key, d / "ref.json", *MORE),
                nproc=2,
                env={"WORKER_TRACE": str(d / "ref-trace")},
            )
            assert res.returncode == 0, res.stderr[-3000:]
            made.append({**result(d / "ref.json"), "steps": final_steps(d / "ref-trace")})
        return made[0]

    try:
        yield {"dir": d, "key": key, "reference": reference}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def lines(trace: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(trace.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.endswith("}"):  # a line cut by a kill is not one
                out.append(json.loads(line))
    return out


def final_steps(trace: Path) -> dict[int, dict[str, Any]]:
    """Each step as the job finally trained it: by the last incarnation that fetched it.

    Returns ``{step: {"world", "inc", "idx" (per rank), "loss", "digests"}}``
    (``loss`` and ``digests``: the sets of what its processes saved).
    """
    fetched: dict[int, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    saved: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for x in lines(trace):
        if "step" in x:
            fetched[x["step"]][x["inc"]].append(x)
        elif "saved" in x:
            saved[(x["saved"], x["inc"])].append(x)
    out = {}
    for step, incs in fetched.items():
        inc = max(incs)
        got = incs[inc]
        out[step] = {
            "world": got[0]["world"],
            "inc": inc,
            "idx": {x["rank"]: x["idx"] for x in got},
            "loss": {x["loss"] for x in saved[(step, inc)]},
            "digests": {x["digest"] for x in saved[(step, inc)]},
        }
    return out


def resumes(trace: Path) -> list[dict[str, Any]]:
    """The incarnations in time order: ``{"inc", "world", "resumed", "digests"}``."""
    by: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for x in lines(trace):
        if "resumed" in x:
            by[x["inc"]].append(x)
    return [
        {
            "inc": inc,
            "world": got[0]["world"],
            "resumed": got[0]["resumed"],
            "resumed_by": {x["resumed"] for x in got},
            "digests": {x["digest"] for x in got},
        }
        for inc, got in sorted(by.items())
    ]


def wait_for(what: Callable[[], bool], timeout: float, procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline or all(p.poll() is not None for p in procs):
            raise AssertionError("the job did not get there in time (or ended)")
        time.sleep(0.05)


def steps_in_world(trace: Path, world: int) -> int:
    """The newest step traced by a process of a world of ``world`` processes (0: none)."""
    return max((x["step"] for x in lines(trace) if "step" in x and x["world"] == world), default=0)


def last_step(trace: Path, inc: int) -> int:
    """The newest step the incarnation ``inc`` fetched."""
    return max(x["step"] for x in lines(trace) if "step" in x and x["inc"] == inc)


def check_trajectory(got: dict[int, dict[str, Any]], ref: dict[int, dict[str, Any]]) -> None:
    """Every step trained the reference's batch, each record once, in the world of its time."""
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, g in got.items():
        assert sorted(g["idx"]) == list(range(g["world"])), f"step {step}: ranks {g['idx']}"
        trained = [i for r in sorted(g["idx"]) for i in g["idx"][r]]
        assert len(trained) == len(set(trained)) == 24, f"step {step}: {trained}"
        want = [i for r in sorted(ref[step]["idx"]) for i in ref[step]["idx"][r]]
        # the same records: the global cursor carried over; the same order of the batch too
        assert trained == want, f"step {step} trained other records than the reference"
        # DDP: every process that saved the step holds the same model, the same loss
        assert len(g["digests"]) <= 1 and len(g["loss"]) <= 1
    for e in range(STEPS // PER_EPOCH):
        epoch = [
            i
            for s in range(e * PER_EPOCH + 1, (e + 1) * PER_EPOCH + 1)
            for r in sorted(got[s]["idx"])
            for i in got[s]["idx"][r]
        ]
        assert sorted(epoch) == list(range(RECORDS)), f"epoch {e}: a record twice or skipped"


def check_resume(
    inc: dict[str, Any], trained: dict[int, dict[str, Any]], world: int, last_before: int
) -> int:
    """One world change: the step resumed and what was restored there."""
    assert inc["world"] == world
    assert len(inc["resumed_by"]) == 1  # every process resumed the same step
    step = int(inc["resumed"])
    # the newest step the survivors hold: the last globally committed one, or one past it
    assert last_before - 1 <= step <= last_before + 1, (step, last_before)
    # model and optimizer as they were after that step (every process, seeded ones too)
    assert len(trained[step]["digests"]) == 1
    assert inc["digests"] == trained[step]["digests"]
    return step


def _agent(d: Path, name: str, args: list[str], port: int, i: int, nap: str) -> Any:
    """Agent ``i`` of the job ``name`` (agent 0 hosts the rendezvous), its own directory."""
    return start_agent(
        [*args[:2], str(d / name / f"machine-{i}"), *args[3:]],
        port=port,
        run_id=name,
        log=d / f"{name}-{i}.log",
        host=i == 0,
        nnodes="1:2",
        # Steps a little slower (the result is the same), so that the changes
        # land mid-run however fast the machine is.
        env={"WORKER_TRACE": str(d / f"{name}-trace"), "WORKER_STEP_SLEEP": nap},
    )


def _agents(
    d: Path, name: str, args: list[str], port: int, nap: str
) -> list[subprocess.Popen[str]]:
    return [_agent(d, name, args, port, i, nap) for i in (0, 1)]


def _logs(d: Path, name: str) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(d.glob(f"{name}-*.log")))


def test_scale_down_the_survivor_goes_on_alone(job: dict[str, Any]) -> None:
    d, ref = job["dir"], job["reference"]()
    (d / "down-trace").mkdir()
    args = worker_args(d / "down", job["key"], d / "down.json", *MORE, "--elastic")
    port = free_port()
    host, other = procs = _agents(d, "down", args, port, "0.05")
    try:
        # Both machines train (world 2) for a while; then the non-host one is lost.
        wait_for(lambda: steps_in_world(d / "down-trace", 2) >= 12, 60, procs)
        stop(other)
        codes = finish([host], timeout=90)
    finally:
        for p in procs:
            stop(p)
    assert codes == [0], _logs(d, "down")
    got = result(d / "down.json")
    trained = final_steps(d / "down-trace")
    incs = resumes(d / "down-trace")
    assert [i["world"] for i in incs] == [2, 1], incs
    step = check_resume(incs[1], ref["steps"], 1, last_step(d / "down-trace", incs[0]["inc"]))
    assert got["resumed_from"] == step
    assert got["losses"][:step] == ref["losses"][:step]
    assert {trained[s]["world"] for s in range(step + 1, STEPS + 1)} == {1}
    check_trajectory(trained, ref["steps"])
    assert len(got["digests"]) == 1
    # another split of the batches and other dropout draws: not the reference's end
    assert got["digests"] != ref["digests"][:1]


def test_scale_up_a_machine_that_joins_is_taken_in(job: dict[str, Any]) -> None:
    d, ref = job["dir"], job["reference"]()
    (d / "up-trace").mkdir()
    args = worker_args(d / "up", job["key"], d / "up.json", *MORE, "--elastic")
    port = free_port()
    procs = _agents(d, "up", args, port, "0.15")
    host = procs[0]
    try:
        wait_for(lambda: steps_in_world(d / "up-trace", 2) >= 8, 60, procs)
        stop(procs[1])
        last2 = steps_in_world(d / "up-trace", 2)  # the survivor trains no more in world 2
        # The survivor trains alone a while; then a new machine (empty directory) joins.
        wait_for(lambda: steps_in_world(d / "up-trace", 1) >= last2 + 3, 60, [host])
        shutil.rmtree(d / "up" / "machine-1")  # that machine and its memory are gone
        procs.append(_agent(d, "up", args, port, 2, "0.15"))
        codes = finish([host, procs[2]], timeout=90)
    finally:
        for p in procs:
            stop(p)
    assert codes == [0, 0], _logs(d, "up")
    got = result(d / "up.json")
    trained = final_steps(d / "up-trace")
    incs = resumes(d / "up-trace")
    assert [i["world"] for i in incs] == [2, 1, 2], incs
    down = check_resume(incs[1], ref["steps"], 1, last_step(d / "up-trace", incs[0]["inc"]))
    last1 = last_step(d / "up-trace", incs[1]["inc"])
    # The world-1 trajectory as the survivor trained it (steps after `down`).
    alone = final_steps(d / "up-trace")
    up = check_resume(incs[2], alone, 2, last1)
    assert down < up
    assert got["resumed_from"] == up
    assert got["losses"][:down] == ref["losses"][:down]
    assert {trained[s]["world"] for s in range(down + 1, up + 1)} == {1}
    assert {trained[s]["world"] for s in range(up + 1, STEPS + 1)} == {2}
    check_trajectory(trained, ref["steps"])
    assert len(set(got["digests"])) == 1 and len(got["digests"]) == 2
    # the new machine holds its own mirror, no seed left behind
    assert sorted(p.name for p in (d / "up" / "machine-2").iterdir()) == ["local-0.plm"]


def test_without_elastic_another_world_is_refused(job: dict[str, Any]) -> None:
    d = job["dir"]
    args = worker_args(d / "fixed", job["key"], d / "fixed.json", "--steps", "6")
    first = run(args, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (d / "fixed").iterdir()}
    again = run([*args[:-1], "12"], nproc=1)
    assert again.returncode != 0
    assert "ConfigError: the mirror set" in again.stderr
    assert "has files of more processes than this job's 1 (local-1.plm)" in again.stderr
    assert "open_mirror_set(..., elastic=True)" in again.stderr
    # nothing was overwritten
    assert {p.name: p.read_bytes() for p in (d / "fixed").iterdir()} == before


@pytest.mark.parametrize(("nproc", "replicas"), [(1, "0"), (3, "1")])
def test_elastic_on_one_machine_another_number_of_processes(
    job: dict[str, Any], nproc: int, replicas: str
) -> None:
    # 2 processes, then 1 or 3 (torchrun --nproc-per-node changed). With 1, the
    # file of the local rank the machine no longer has is kept until the new
    # world commits; with 3 (and replicas: the old world's are dropped), the
    # new process is seeded from a survivor.
    d = job["dir"]
    name = f"resize-{nproc}"
    args = worker_args(d / name, job["key"], d / f"{name}.json", "--steps", "6")
    more = ["--sync", "--replicas", replicas]
    first = run([*args, *more], nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    (d / f"{name}-trace").mkdir()
    again = run(
        [*args[:-1], "12", *more, "--elastic"],
        nproc=nproc,
        env={"WORKER_TRACE": str(d / f"{name}-trace")},
    )
    assert again.returncode == 0, again.stderr[-3000:]
    got, ref = result(d / f"{name}.json"), job["reference"]()
    assert got["resumed_from"] == 6
    assert got["losses"][:6] == ref["losses"][:6]
    (inc,) = resumes(d / f"{name}-trace")
    assert inc["world"] == nproc and inc["resumed_by"] == {6}
    assert inc["digests"] == ref["steps"][6]["digests"]
    trained = final_steps(d / f"{name}-trace")
    for step in range(7, 13):
        assert sorted(trained[step]["idx"]) == list(range(nproc))
        split = [i for r in range(nproc) for i in trained[step]["idx"][r]]
        assert split == [i for r in (0, 1) for i in ref["steps"][step]["idx"][r]]
    files = [f"local-{r}.plm" for r in range(nproc)]
    assert sorted(p.name for p in (d / name).iterdir()) == files
