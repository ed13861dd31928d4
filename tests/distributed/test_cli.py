"""``plinius train`` under real torchrun, and the commands that read a mirror set.

One 2-process job is trained once (module fixture); the tests read it, and
copy it to attack it. Every torchrun error must be said once, in one line,
and leave every file as it was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..cli.conftest import sealed_job
from ..conftest import run_cli
from .conftest import run

pytestmark = pytest.mark.slow


def _train(job: dict[str, Path], mirror: Path, nproc: int, *more: str) -> Any:
    args = [
        "-m", "plinius", "train", "--key", job["key"], "--data", job["data"],
        "--mirror", mirror, "--model", "mlp", "--steps", "12", "--batch-size", "24", *more,
    ]  # fmt: skip
    return run(args, nproc=nproc, timeout=240)


@pytest.fixture(scope="module")
def trained() -> Iterator[dict[str, Any]]:
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix="plinius-dcli-", dir=base))
    try:
        job = sealed_job(d)
        res = _train(job, job["mirror"], 2)
        assert res.returncode == 0, res.stderr[-3000:]
        yield {"job": job, "stdout": res.stdout, "stderr": res.stderr}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _snapshot(where: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(where.iterdir())}


def _said_once(res: Any, needle: str) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert needle in lines[0]
    # No traceback from plinius itself (torchrun prints its own failure summary).
    assert "plinius/" not in "".join(
        ln for ln in res.stderr.splitlines() if ln.strip().startswith("File ")
    )


def test_rank_zero_speaks_for_the_job(trained: dict[str, Any]) -> None:
    out = trained["stdout"]
    assert out.count("done: 12 steps of mlp (batch 24, 2 processes") == 1
    assert out.count("starting a new job") == 1


def test_inspect_export_evaluate_read_the_set(trained: dict[str, Any], tmp_path: Path) -> None:
    job = trained["job"]
    res = run_cli("inspect", job["mirror"], "--key", job["key"], "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "mirror-set" and doc["authenticated"]
    assert doc["step"] == 12 and doc["processes"] == 2
    assert doc["world_size"] == 2 and doc["replicas"] == 0
    assert [m["held"] for m in doc["members"]] == [[12, 11], [12, 11]]
    res = run_cli("export", job["mirror"], "--key", job["key"], "--out", tmp_path / "m.st")
    assert res.exit_code == 0, res.output
    assert "of step 12" in res.stdout
    res = run_cli(
        "evaluate", "--key", job["key"], "--data", job["data"], "--mirror", job["mirror"], "--json"
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["step"] == 12


def test_a_batch_that_does_not_split_is_refused(trained: dict[str, Any]) -> None:
    job = trained["job"]
    res = _train(job, job["dir"] / "odd.plm", 2, "--batch-size", "25")
    _said_once(res, "does not divide by the 2 processes")
    assert not (job["dir"] / "odd.plm").exists()


def test_another_world_size_is_refused_and_nothing_is_overwritten(
    trained: dict[str, Any],
) -> None:
    job = trained["job"]
    copy = job["dir"] / "w3.plm"
    shutil.copytree(job["mirror"], copy)
    before = _snapshot(copy)
    res = _train(job, copy, 3, "--steps", "24")
    _said_once(res, "written by 2 processes, this job has 3")
    assert _snapshot(copy) == before


def test_a_missing_process_file_is_refused_and_nothing_is_overwritten(
    trained: dict[str, Any],
) -> None:
    job = trained["job"]
    copy = job["dir"] / "miss.plm"
    shutil.copytree(job["mirror"], copy)
    (copy / "local-1.plm").unlink()
    before = _snapshot(copy)
    res = _train(job, copy, 2, "--steps", "24")
    _said_once(res, "is missing while others hold saved steps")
    assert _snapshot(copy) == before


def test_rm_removes_the_set(trained: dict[str, Any]) -> None:
    job = trained["job"]
    copy = job["dir"] / "gone.plm"
    shutil.copytree(job["mirror"], copy)
    res = run_cli("rm", copy)
    assert res.exit_code == 0, res.output
    assert not copy.exists()


def test_elastic_goes_on_with_another_number_of_processes(trained: dict[str, Any]) -> None:
    # --elastic: the 2-process set goes on in 3 processes, from its step 12
    job = trained["job"]
    copy = job["dir"] / "w3e.plm"
    shutil.copytree(job["mirror"], copy)
    res = _train(job, copy, 3, "--steps", "24", "--elastic")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("resumed after step 12 of 24") == 1
    assert res.stdout.count("done: 24 steps of mlp (batch 24, 3 processes") == 1
    res = run_cli("inspect", copy, "--key", job["key"], "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["step"] == 24 and doc["processes"] == 3
    assert doc["world_changes"] == [[12, 2, 3]]
    res = run_cli("inspect", copy, "--key", job["key"])
    assert "world change     2 -> 3 processes, resumed at step 12" in res.stdout


def test_elastic_needs_torchrun(trained: dict[str, Any]) -> None:
    job = trained["job"]
    res = run_cli(
        "train", "--key", job["key"], "--data", job["data"], "--mirror", job["dir"] / "e.plm",
        "--model", "mlp", "--steps", "4", "--elastic",
    )  # fmt: skip
    assert res.exit_code != 0
    assert "--elastic is for a job under torchrun" in res.output
    assert not (job["dir"] / "e.plm").exists()
