"""``crash-test --nproc`` and ``demo --nproc`` (torchrun underneath), and the bench's DDP section.

Bad input is refused in one line before anything starts (no torchrun needed);
a real campaign kills random workers of a 2-process torchrun job and ends bit
for bit equal to an uninterrupted 2-process run; the DDP section runs in its
smallest configuration. No test here asserts a timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plinius.bench import BenchConfig, run_bench
from plinius.bench.multiproc import check_nproc, stop_job, worker_pids
from plinius.errors import ConfigError
from tests.cli.conftest import sealed_job
from tests.conftest import assert_one_line_error, run_cli

CORES = os.cpu_count() or 1


@pytest.mark.parametrize(
    ("nproc", "batch", "needle"),
    [
        (0, 32, "at least 1 process"),
        (-2, 32, "at least 1 process"),
        (CORES + 1, 32, f"more than this machine's {CORES} cores"),
    ],
)
def test_check_nproc_refuses(nproc: int, batch: int, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_nproc(nproc, batch)


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
def test_check_nproc_batch_must_divide() -> None:
    with pytest.raises(ConfigError, match="does not divide by --nproc 2; use a multiple of 2"):
        check_nproc(2, 33)
    check_nproc(2, 32)
    check_nproc(1, 33)


def _bad_nproc_cases() -> list[tuple[list[str], str]]:
    cases = [
        (["--nproc", "0"], "at least 1 process"),
        (["--nproc", str(CORES + 1)], "cores"),
    ]
    if CORES >= 2:
        cases.append((["--nproc", "2", "--batch-size", "33"], "does not divide by --nproc 2"))
    return cases


@pytest.mark.parametrize(("args", "needle"), _bad_nproc_cases())
def test_crash_test_bad_nproc_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    wd = tmp_path / "wd"
    res = run_cli(
        "crash-test", "--key", tmp_path / "k.key", "--data", tmp_path / "d.pld",
        "--mirror", tmp_path / "m", "--workdir", wd, *args,
    )  # fmt: skip
    assert_one_line_error(res, needle)
    assert not (tmp_path / "m").exists() and not wd.exists()  # nothing made


@pytest.mark.parametrize(("args", "needle"), _bad_nproc_cases())
def test_demo_bad_nproc_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    wd = tmp_path / "wd"
    res = run_cli("demo", "--workdir", wd, *args)
    assert_one_line_error(res, needle)
    assert not wd.exists()


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
def test_crash_test_nproc_refuses_the_trace_schedule(tmp_path: Path) -> None:
    res = run_cli(
        "crash-test", "--key", tmp_path / "k.key", "--data", tmp_path / "d.pld",
        "--mirror", tmp_path / "m", "--nproc", "2", "--batch-size", "32", "--schedule", "trace",
    )  # fmt: skip
    assert_one_line_error(res, "random schedule only", code=2)


# A stand-in agent: it starts two "workers" in their own sessions (as torchrun
# does), each of which starts a child of its own, then waits.
_AGENT = """
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
inner = f"import subprocess, time; subprocess.Popen({sleep!r}); time.sleep(300)"
ws = [subprocess.Popen([sys.executable, "-c", inner], start_new_session=True) for _ in range(2)]
print(" ".join(str(w.pid) for w in ws), flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_stop_job_kills_every_worker_and_what_they_started() -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", _AGENT], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert agent.stdout is not None
        workers = sorted(int(p) for p in agent.stdout.readline().split())
        assert worker_pids(agent.pid) == workers
        time.sleep(0.5)  # the workers' children start
        grandchildren = [
            int(c)
            for w in workers
            for c in Path(f"/proc/{w}/task/{w}/children").read_text().split()
        ]
        assert len(grandchildren) == 2
    finally:
        stop_job(agent)
    assert agent.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(_alive, workers + grandchildren)):
        time.sleep(0.05)
    assert not any(map(_alive, workers + grandchildren))
    agent.stdout.close()


def _our_processes(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (what a campaign could leave behind)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in d.joinpath("cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                continue
    return [p for p in found if _alive(p)]


@pytest.mark.slow
@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
def test_crash_test_nproc_2_kills_workers_and_ends_bit_identical(
    tmp_path: Path, shm_dir: Path
) -> None:
    job = sealed_job(shm_dir)
    mirror = shm_dir / "job"
    res = run_cli(
        "crash-test", "--key", job["key"], "--data", job["data"], "--mirror", mirror,
        "--model", "cnn-tiny", "--steps", "60", "--batch-size", "32", "--crashes", "3",
        "--nproc", "2", "--seed", "3", "--workdir", tmp_path / "wd",
    )  # fmt: skip
    assert res.exit_code == 0, res.output + (tmp_path / "wd" / "train.log").read_text()
    assert "3 workers killed, job finished: True (2 processes under torchrun)" in res.output
    assert "bit-for-bit identical to an uninterrupted 2-process run" in res.output
    assert sorted(p.name for p in mirror.iterdir()) == ["local-0.plm", "local-1.plm"]
    assert not (shm_dir / "job.reference").exists()  # the comparison run's set is removed
    # Every group after a kill resumed from the set (or started anew if killed early).
    events = [json.loads(line) for line in (tmp_path / "wd" / "events.jsonl").open()]
    assert sum(e["event"] == "start" for e in events) == 4
    assert [e["step"] for e in events if e["event"] == "step"][-1] == 60
    assert _our_processes(str(mirror)) == []


def _tiny_ddp(out: Path, pm: Path, disk: Path) -> BenchConfig:
    cfg = BenchConfig.preset(True, out=out, pm_dir=pm, disk_dir=disk, command="test")
    cfg.sections = ("ddp",)
    cfg.ddp_model = "cnn-tiny"
    cfg.ddp_batch = 16
    cfg.ddp_steps = 2
    cfg.ddp_rounds = 1
    cfg.ddp_worlds = (2,)
    cfg.ddp_gate_iters = 20
    cfg.threads = 1
    cfg.plots = False
    return cfg


def test_quick_preset_runs_ddp_with_2_processes(tmp_path: Path) -> None:
    quick = BenchConfig.preset(True, out=tmp_path, pm_dir=tmp_path, disk_dir=tmp_path)
    full = BenchConfig.preset(False, out=tmp_path, pm_dir=tmp_path, disk_dir=tmp_path)
    assert "ddp" in quick.sections and quick.ddp_worlds == (2,)
    assert full.ddp_worlds == (2, 3) and quick.ddp_model == full.ddp_model == "cnn-10mb"


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
def test_ddp_section_smallest_configuration(tmp_path: Path, shm_dir: Path) -> None:
    out, disk = tmp_path / "out", tmp_path / "disk"
    disk.mkdir()
    run_bench(_tiny_ddp(out, shm_dir, disk), progress=False)
    assert list(shm_dir.iterdir()) == [] and list(disk.iterdir()) == []
    d = json.loads((out / "results.json").read_text())["ddp"]
    assert d["model"] == "cnn-tiny" and [w["world_size"] for w in d["worlds"]] == [2]
    w = d["worlds"][0]
    assert set(w["iteration_s"]) == {"none", "mirror", "ordered", "counter"}
    # 2 measured steps of 1 round per mode (of 6: warm-up, first layouts, last save left out)
    assert all(len(v) == 2 and min(v) > 0 for v in w["iteration_runs_s"].values())
    assert set(w["overhead_pct"]) == {"mirror", "ordered", "counter"}
    assert "counter_vs_mirror_pct" in w
    assert len(w["gate_runs_s"]) == 20 and w["gate_s"] > 0
    md = (out / "results.md").read_text()
    assert "## 6. Mirroring under DistributedDataParallel (torchrun)" in md
    assert "global commit's all-gather" in md
