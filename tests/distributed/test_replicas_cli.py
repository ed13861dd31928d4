"""``plinius train --replicas``: two torchrun agents stand for two machines, each its own directory.

The machine loss is the issue's: the non-host agent and its worker are
SIGKILLed, its mirror directory deleted, and a new agent started at once with
an empty directory; the job must resume from the last globally committed step
and end bit-for-bit equal to an uninterrupted run. Bad ``--replicas`` values
and a set across machines without replicas are refused in one line, said
once, and create nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plinius.bench.multiproc import set_differences
from plinius.crypto import MasterKey

from ..cli.conftest import sealed_job
from ..conftest import assert_one_line_error, run_cli
from .conftest import agent_cmd, finish, free_port, run, start_agent, stop

# Without it a replacement agent never completes the rendezvous (README: Several machines).
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture
def scratch() -> Iterator[dict[str, Path]]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-replcli-", dir=base))
    try:
        yield sealed_job(d, records=600)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _train(job: dict[str, Path], mirror: Path, steps: int, *more: str | Path) -> list[str]:
    return [
        "-m", "plinius", "train", "--key", str(job["key"]), "--data", str(job["data"]),
        "--mirror", str(mirror), "--model", "mlp", "--steps", str(steps), "--batch-size", "24",
        "--no-progress", *(str(m) for m in more),
    ]  # fmt: skip


def _two_machines(
    job: dict[str, Path], name: str, steps: int, *more: str
) -> tuple[subprocess.Popen[str], subprocess.Popen[str], str, int]:
    """The host agent (machine A) and the other (machine B), each with its own directory."""
    d, port = job["dir"], free_port()
    run_id = f"{name}-{port}"
    a = start_agent(
        _train(job, d / f"{name}-A", steps, *more, "--events", d / f"{name}.events"),
        port=port, run_id=run_id, log=d / f"{name}-A.log", host=True, env=ENV,
    )  # fmt: skip
    b = start_agent(
        _train(job, d / f"{name}-B", steps, *more),
        port=port, run_id=run_id, log=d / f"{name}-B.log", host=False, env=ENV,
    )  # fmt: skip
    return a, b, run_id, port


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.endswith("}")]


def _logs(job: dict[str, Path], name: str) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(job["dir"].glob(f"{name}-*.log")))


@pytest.mark.slow
def test_a_lost_machine_resumes_from_the_replicas_bit_identical(
    scratch: dict[str, Path],
) -> None:
    job, d, steps = scratch, scratch["dir"], 400
    a, b, _, _ = _two_machines(job, "ref", steps, "--replicas", "1")
    assert finish([a, b], 240) == [0, 0], _logs(job, "ref")

    a, b, run_id, port = _two_machines(job, "loss", steps, "--replicas", "1")
    b2: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 180
        while not any(e["event"] == "step" and e["step"] >= 40 for e in _events(d / "loss.events")):
            assert time.monotonic() < deadline and a.poll() is None, _logs(job, "loss")
            time.sleep(0.05)
        stop(b)  # machine B is lost: its agent, its worker and its persistent memory
        shutil.rmtree(d / "loss-B")
        b2 = start_agent(
            _train(job, d / "loss-B", steps, "--replicas", "1"),
            port=port, run_id=run_id, log=d / "loss-B2.log", host=False, env=ENV,
        )  # fmt: skip
    finally:
        codes = finish([a] + ([b2] if b2 is not None else []), 240)
    assert codes == [0, 0], _logs(job, "loss")
    # The survivor learnt of the loss from a failed collective: said as such, not as a bug.
    survivor = (d / "loss-A.log").read_text()
    assert "internal error" not in survivor, survivor[-3000:]
    assert "error: another process of this torchrun job was lost" in survivor
    events = _events(d / "loss.events")
    resumed = [e["step"] for e in events if e["event"] == "resumed"]
    assert len(resumed) == 2 and resumed[0] is None and resumed[1] >= 40, resumed
    assert [e["step"] for e in events if e["event"] == "step"][-1] == steps
    key = MasterKey.load(job["key"])
    # Each machine's mirror holds what the uninterrupted run's does, bit for bit; the
    # replicas are ciphertext under fresh salts and another job id, so they differ anyway.
    for m in ("A", "B"):
        diffs = set_differences(d / f"loss-{m}", d / f"ref-{m}", key, 1)
        assert diffs == ["local-0/replicas"], (m, diffs)
    # the new machine B holds its own mirror again, and no seed is left behind
    assert sorted(p.name for p in (d / "loss-B").iterdir()) == ["local-0.plm"]
    res = run_cli("inspect", d / "loss-B", "--key", job["key"], "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["replicas"] == 1 and doc["world_size"] == 2 and doc["step"] == steps
    res = run_cli("inspect", d / "loss-A", "--key", job["key"])
    assert "replicas         kept" in res.stdout and "1 here, 2 in the job" in res.stdout


@pytest.mark.slow
def test_two_machines_without_replicas_are_refused_once(scratch: dict[str, Path]) -> None:
    job, d = scratch, scratch["dir"]
    port = free_port()
    procs = []
    for m, host in (("A", True), ("B", False)):
        with open(d / f"norep-{m}.log", "wb") as log:
            cmd = agent_cmd(port, f"norep-{port}", host, restarts=0)
            procs.append(
                subprocess.Popen(
                    cmd + _train(job, d / f"norep-{m}", 12),
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"},
                    start_new_session=True,
                    text=True,
                )
            )
    codes = finish(procs, 240)
    assert all(c != 0 for c in codes), codes
    errors = [
        ln
        for m in "AB"
        for ln in (d / f"norep-{m}.log").read_text().splitlines()
        if ln.startswith("error:")
    ]
    assert len(errors) == 1, _logs(job, "norep")
    assert "spans 2 machines: open it with replicas (plinius train --replicas 1" in errors[0]
    assert not (d / "norep-A").exists() and not (d / "norep-B").exists()


@pytest.mark.slow
def test_a_bad_replicas_value_is_said_once_under_torchrun(scratch: dict[str, Path]) -> None:
    job = scratch
    res = run(_train(job, job["mirror"], 12, "--replicas", "2"), nproc=2, timeout=240)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "--replicas 2: give 1" in errors[0]
    assert not job["mirror"].exists()


@pytest.mark.parametrize(
    ("value", "needle"),
    [("1", "nothing to replicate to"), ("2", "--replicas 2: give 1"), ("-1", "give 1")],
)
def test_replicas_without_torchrun_or_out_of_range_are_refused(
    scratch: dict[str, Path], value: str, needle: str
) -> None:
    job = scratch
    res = run_cli(*_train(job, job["mirror"], 4, "--replicas", value)[2:])
    assert_one_line_error(res, needle)
    assert not job["mirror"].exists()
