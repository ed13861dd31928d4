"""``plinius bench``'s replicas section: the smallest run end to end, and its arithmetic.

Two real torchrun jobs (one agent of 2 processes, then two agents standing for
two machines, one of them lost and replaced); no timing is asserted, only that
every part was measured, what was computed adds up, and nothing is left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from plinius.bench import BenchConfig, run_bench
from plinius.bench.replicas import loss_times

CORES = os.cpu_count() or 1


def _tiny(out: Path, pm: Path, disk: Path) -> BenchConfig:
    cfg = BenchConfig.preset(True, out=out, pm_dir=pm, disk_dir=disk, command="test")
    cfg.sections = ("replicas",)
    cfg.replicas_model = "cnn-tiny"
    cfg.replicas_batch = 16
    cfg.replicas_steps = 2
    cfg.replicas_rounds = 1
    cfg.replicas_kills = 1
    cfg.replicas_gap_steps = 3
    cfg.replicas_tail_steps = 5
    cfg.replicas_ckpt_repeats = 1
    cfg.replicas_ckpt_every = (10, 100)
    cfg.threads = 1
    cfg.plots = False
    return cfg


def test_presets_keep_the_section_short() -> None:
    here = Path(".")
    quick = BenchConfig.preset(True, out=here, pm_dir=here, disk_dir=here)
    full = BenchConfig.preset(False, out=here, pm_dir=here, disk_dir=here)
    assert "replicas" in quick.sections and "replicas" in full.sections
    assert quick.replicas_kills == 1 and full.replicas_kills == 3
    assert quick.replicas_model == full.replicas_model == "cnn-10mb"


@pytest.mark.slow
@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
def test_replicas_section_smallest_configuration(tmp_path: Path, shm_dir: Path) -> None:
    out, disk = tmp_path / "out", tmp_path / "disk"
    disk.mkdir()
    run_bench(_tiny(out, shm_dir, disk), progress=False)
    assert list(shm_dir.iterdir()) == [] and list(disk.iterdir()) == []
    d = json.loads((out / "results.json").read_text())["replicas"]
    assert d["model"] == "cnn-tiny"
    assert set(d["iteration_s"]) == {"none", "mirror", "replicas"}
    # 2 measured steps of 1 round per mode (of 6: warm-up, first layouts, last save left out)
    assert all(len(v) == 2 and min(v) > 0 for v in d["iteration_runs_s"].values())
    assert d["two_agents_step_s"] > 0
    # The step gate carries 16 bytes a step; with replicas, each process's sealed replica too.
    gate = d["gate_bytes_per_step"]
    assert gate["none"] == gate["mirror"] == 16
    assert d["replica_bytes_per_step"] == gate["replicas"] - 16 > 5000  # the RNG states at least
    assert 0 < d["replica_bytes_per_step"] < d["mirror_tensor_bytes"]
    assert d["seal_s"] > 0
    assert d["kills"] == 1 and len(d["losses"]) == 1
    (loss,) = d["losses"]
    assert loss["resumed_from"] >= 3  # the kill came after 3 steps: they were kept
    assert loss["seed_bytes"] >= d["mirror_tensor_bytes"]  # the survivor's whole mirror
    parts = ("torch", "startup", "plinius", "first_step")
    assert all(loss[k] > 0 for k in parts)
    assert abs(sum(loss[k] for k in parts) - loss["total"]) < 1e-6
    c = d["checkpoint"]
    assert c["save_s"] > 0 and c["load_s"] > 0 and c["bytes"] > 0
    q, step = d["loss_s"], d["iteration_s"]["none"]
    for b, n in zip(d["baseline"], (10, 100), strict=True):
        want = q["torch"] + q["startup"] + c["load_s"] + (n / 2 + 1) * step
        assert b["every"] == n and b["lost_s"] == pytest.approx(want)
        assert b["write_pct_per_step"] == pytest.approx(100 * c["save_s"] / n / step)
    md = (out / "results.md").read_text()
    assert "## 8. Replicas across machines (two torchrun agents)" in md
    assert "keep_alive_interval=1,keep_alive_max_attempt=2" in md


def _worker(start: float, seeded: bool, step: int = 7) -> list[dict[str, object]]:
    """A new worker's events: started at ``start``; the job's first step ends at 110."""
    return [
        {"ev": "init", "t": start + 1.0, "started": start},
        {"ev": "open_start", "t": start + 2.0},
        {"ev": "open_end", "t": start + 2.5, "seeded": seeded, "seed_bytes": 9 if seeded else None},
        {"ev": "resumed", "t": start + 2.75, "step": step},
        {"ev": "step", "t": 110.0, "step": step + 1},
    ]


def test_loss_times_split_the_kill_to_the_next_step() -> None:
    got = loss_times(100.0, [_worker(103.0, False), _worker(104.0, True)])
    assert got == {
        "torch": 4.0,  # the last new worker's process start
        "startup": 2.0,  # to the last open_mirror_set call
        "open": 0.5,  # the seeded (replaced) machine's
        "restore": 0.25,
        "plinius": 0.75,
        "first_step": 3.25,  # from the last restore to the job's first step
        "total": 10.0,
        "resumed_from": 7,
        "seed_bytes": 9,
    }


def test_loss_times_need_every_phase_and_a_seeded_machine() -> None:
    assert loss_times(100.0, [_worker(103.0, False)]) is None
    assert loss_times(100.0, [_worker(103.0, False), _worker(104.0, False)]) is None
    cut = _worker(104.0, True)[:-1]  # killed before its first step
    assert loss_times(100.0, [_worker(103.0, False), cut]) is None


def test_a_failed_job_names_the_workers_error(tmp_path: Path) -> None:
    from plinius.bench.multiproc import job_failure

    log = tmp_path / "a.log"
    log.write_text(
        "starting\nValueError: the worker's own error\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \nend\n"
    )
    err = job_failure("the job failed (exit 1)", [log, tmp_path / "missing.log"])
    assert str(err) == "the job failed (exit 1): ValueError: the worker's own error"
    log.write_text("one\ntwo\nthree\nfour\n")
    assert str(job_failure("it timed out", [log])) == "it timed out: two | three | four"
