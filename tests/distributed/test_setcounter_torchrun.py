"""The set's freshness counter under real torchrun: attacks refused, crashes never a false alarm.

An attacker keeps copies of the set's directory and puts them back: one
process's file (``local-1.plm``) or the whole set. The crashes are real
SIGKILLs at the counter's worst moments: between its advance and the owner's
commit, and between a commit and the next advance; the job must then resume
and end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plinius.counters import FileCounter
from plinius.crypto import MasterKey
from plinius.dist import describe_set
from plinius.mirror import Mirror

from .conftest import kill_campaign, result, run, worker_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job() -> Iterator[dict[str, Any]]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-dctr-", dir=base))
    key = d / "k.key"
    MasterKey.generate().save(key)
    refs: dict[str, dict[str, Any]] = {}

    def reference(steps: str) -> dict[str, Any]:
        if steps not in refs:
            out = d / f"ref-{steps}.json"
            res = run(worker_args(d / f"ref-{steps}", key, out, "--steps", steps), nproc=2)
            assert res.returncode == 0, res.stderr[-3000:]
            refs[steps] = result(out)
        return refs[steps]

    try:
        yield {"dir": d, "key": key, "reference": reference}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _train(job: dict[str, Any], where: Path, counter: Path | None, steps: int, **kw: Any) -> Any:
    more = ["--counter", str(counter)] if counter is not None else []
    out = job["dir"] / f"{where.name}-{steps}.json"
    args = worker_args(where, job["key"], out, "--steps", str(steps), *more)
    return run(args, nproc=2, **kw), out


def _snapshot(where: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(where.iterdir())}


def test_an_old_file_or_an_old_set_put_back_is_refused(job: dict[str, Any]) -> None:
    d = job["dir"]
    live, ctr = d / "live", d / "live.ctr"
    res, _ = _train(job, live, ctr, 12)
    assert res.returncode == 0, res.stderr[-3000:]
    shutil.copytree(live, d / "kept")  # the attacker's copy, at step 12
    res, out = _train(job, live, ctr, 24)
    assert res.returncode == 0, res.stderr[-3000:]
    assert result(out)["resumed_from"] == 12

    # (a) One process's file put back (its machine came back with an old mirror).
    one = d / "one"
    shutil.copytree(live, one)
    shutil.copy(d / "kept" / "local-1.plm", one / "local-1.plm")
    before = _snapshot(one)
    res, _ = _train(job, one, ctr, 36)
    assert res.returncode != 0
    assert "RollbackError" in res.stderr and f"{one}/local-1.plm" in res.stderr
    assert _snapshot(one) == before

    # (b) The whole set put back: every file is authentic and they agree with
    # each other; only the counter tells.
    whole = d / "whole"
    shutil.copytree(d / "kept", whole)
    before = _snapshot(whole)
    res, _ = _train(job, whole, ctr, 36)
    assert res.returncode != 0
    assert "RollbackError" in res.stderr
    assert "the whole mirror set" in res.stderr
    assert "step 12 expects counter value 12 but the counter is at 23" in res.stderr
    assert _snapshot(whole) == before
    # Without the counter the same old set reads as a good one, at step 12: what
    # the counter is for.
    assert describe_set(whole, MasterKey.load(job["key"]))[1] == 12

    # Another counter (a fresh file) for the job: refused, nothing written.
    before = _snapshot(live)
    res, _ = _train(job, live, d / "other.ctr", 36)
    assert res.returncode != 0
    assert "but the counter is only at 0: the counter was reset or belongs" in res.stderr
    assert _snapshot(live) == before and not (d / "other.ctr").exists()
    # The newest set with its own counter reads as fresh (and goes on: test_cli_counter.py).
    assert describe_set(live, MasterKey.load(job["key"]), counter=FileCounter(ctr))[1] == 24


@pytest.mark.parametrize(
    "env",
    [
        # Rank 0 advanced the counter to 15 (in its save of step 16) and dies
        # before committing step 16; rank 1 may have committed it.
        {"WORKER_DIE_AFTER_ADVANCE": "15"},
        # Rank 0 commits step 15 and dies before the advance (its next save).
        {"WORKER_DIE_AFTER_COMMIT": "15:0"},
        # Rank 1 commits 15 while rank 0's save of 15 (and its advance) stalls.
        {"WORKER_SLOW_SAVE": "15", "WORKER_DIE_AFTER_COMMIT": "15:1"},
    ],
    ids=["after-advance", "after-commit", "one-ahead"],
)
def test_a_kill_on_either_side_of_the_advance_resumes_bit_identical(
    job: dict[str, Any], env: dict[str, str]
) -> None:
    name = "kill-" + "-".join(env.values()).replace(":", "_")
    where, ctr = job["dir"] / name, job["dir"] / f"{name}.ctr"
    res, out = _train(job, where, ctr, 40, restarts=2, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got, ref = result(out), job["reference"]("40")
    assert got["resumed_from"] in (14, 15)
    assert "RollbackError" not in res.stderr
    assert got["losses"] == ref["losses"] and got["digests"] == ref["digests"]
    assert ctr.read_text() == "39\n"  # the last save (40) expects 40: advanced by the next open


def test_random_sigkills_with_the_counter_end_bit_identical(job: dict[str, Any]) -> None:
    d = job["dir"]
    pids = d / "pids"
    pids.mkdir()
    out = d / "campaign.json"
    args = worker_args(d / "campaign", job["key"], out, "--steps", "200")
    res, kills = kill_campaign(
        [*args, "--counter", str(d / "campaign.ctr")],
        nproc=2,
        kills=2,
        pids=pids,
        seed=14,
        env={"WORKER_STEP_SLEEP": "0.005"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert kills == 2, f"only {kills} kills landed before the job ended"
    assert "RollbackError" not in res.stderr
    got, ref = result(out), job["reference"]("200")
    assert got["losses"] == ref["losses"] and got["digests"] == ref["digests"]


def test_a_lost_machine_is_seeded_under_the_counter(job: dict[str, Any]) -> None:
    # Each process keeps its own directory (its own machine). Process 1 commits
    # step 15, loses its directory and dies while rank 0's save of 15 stalls:
    # its machine is rebuilt from the survivor's mirror at step 14, and its new
    # file records the same counter values as the survivor's from then on.
    d = job["dir"]
    where, ctr, out = d / "lost", d / "lost.ctr", d / "lost.json"
    args = worker_args(where, job["key"], out, "--steps", "40", "--replicas", "1")
    env = {"WORKER_DIE_AFTER_COMMIT": "15:1", "WORKER_WIPE_ON_DIE": "1", "WORKER_SLOW_SAVE": "15"}
    res = run([*args, "--machine-per-process", "--counter", str(ctr)], nproc=2, restarts=2, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got, ref = result(out), job["reference"]("40")
    assert got["resumed_from"] == 14
    assert got["losses"] == ref["losses"] and got["digests"] == ref["digests"]
    key = MasterKey.load(job["key"])
    held = []
    for r in (0, 1):
        with Mirror(where / f"machine-{r}" / f"local-{r}.plm", key, readonly=True) as m:
            held.append((m.held_steps(), m.held_counter_values()))
    assert held[0] == held[1] == ([40, 39], [40, 39])
    assert ctr.read_text() == "39\n"
