"""`plinius train`, `evaluate`, `crash-test` and `demo`: happy paths, bad input, real SIGKILLs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from plinius.crypto import MasterKey
from tests.cli.conftest import sealed_job
from tests.conftest import assert_one_line_error, run_cli


@pytest.fixture
def job(shm_dir: Path) -> dict[str, Path]:
    return sealed_job(shm_dir)


def _train(job: dict[str, Path], *extra: str) -> list[str]:
    return [
        "train", "--key", str(job["key"]), "--data", str(job["data"]),
        "--mirror", str(job["mirror"]), "--model", "cnn-tiny", "--batch-size", "32",
        "--threads", "1", *extra,
    ]  # fmt: skip


def test_train_then_rerun_resumes_then_evaluate(job: dict[str, Path]) -> None:
    r = run_cli(*_train(job, "--steps", "6"))
    assert r.exit_code == 0, r.output
    assert "starting a new job" in r.output
    assert "done: 6 steps" in r.output
    r = run_cli(*_train(job, "--steps", "6"))
    assert r.exit_code == 0, r.output
    assert "resumed after step 6 of 6" in r.output
    r = run_cli("evaluate", "--key", str(job["key"]), "--data", str(job["data"]),
         "--mirror", str(job["mirror"]), "--model", "cnn-tiny")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "step 6: accuracy" in r.output


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--steps", "0"], 2, "--steps"),
        (["--steps", "3", "--model", "no-such-model"], 1, "error:"),
        (["--steps", "3", "--key-server", "http://127.0.0.1:9"], 1, "not both"),
    ],
)
def test_train_bad_input(job: dict[str, Path], args: list[str], code: int, needle: str) -> None:
    r = run_cli(*_train(job, *args))
    assert r.exit_code == code, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


def test_train_missing_key_and_data(job: dict[str, Path]) -> None:
    args = _train(job, "--steps", "2")
    args[args.index("--key") + 1] = str(job["dir"] / "missing.key")
    r = run_cli(*args)
    assert r.exit_code == 1 and "plinius keygen" in r.output
    assert len(r.output.strip().splitlines()) == 1
    args = _train(job, "--steps", "2")
    args[args.index("--data") + 1] = str(job["dir"] / "missing.pld")
    r = run_cli(*args)
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output


def test_evaluate_without_mirror(job: dict[str, Path]) -> None:
    r = run_cli("evaluate", "--key", str(job["key"]), "--data", str(job["data"]),
         "--mirror", str(job["dir"] / "none.plm"), "--model", "cnn-tiny")  # fmt: skip
    assert r.exit_code == 1 and "train first" in r.output


@pytest.mark.slow
def test_crash_test_command_kills_and_matches(job: dict[str, Path]) -> None:
    """Real SIGKILLs: N steps straight vs the same job killed twice, compared bit for bit."""
    r = run_cli("crash-test", "--key", str(job["key"]), "--data", str(job["data"]),
         "--mirror", str(job["mirror"]), "--steps", "60", "--batch-size", "32",
         "--crashes", "2", "--workdir", str(job["dir"] / "w"))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "2 crashes, job finished: True" in r.output
    assert "bit-for-bit identical to an uninterrupted run: yes" in r.output


@pytest.mark.slow
def test_demo_core_path_small(tmp_path: Path) -> None:
    from plinius.bench.demo import DemoConfig, run_demo

    rep = run_demo(
        DemoConfig(workdir=tmp_path, steps=40, crashes=2, timing_repeats=1, standby=False),
        log=lambda s: None,
    )
    assert rep.crashes == 2
    assert rep.identical, rep.differences
    # A kill in start-up may be followed by another before any step: not every kill is timed.
    assert 1 <= len(rep.lost_cold_ms) <= 2 and not rep.lost_standby_ms
    assert rep.losses_identical
    assert rep.plot is not None and Path(rep.plot).stat().st_size > 1000
    assert rep.mirror_save_ms > 0 and rep.ssd_save_ms > 0
    assert 0.0 <= rep.accuracy_clean <= 1.0
    assert (tmp_path / "report.json").exists()


@pytest.mark.slow
def test_demo_with_the_standby_times_both_recoveries(tmp_path: Path) -> None:
    from plinius.bench.demo import DemoConfig, run_demo

    cfg = DemoConfig(workdir=tmp_path, steps=1500, crashes=1, timing_repeats=1, reference_mb=0)
    rep = run_demo(cfg, log=lambda s: None)
    assert rep.standby and rep.crashes == 1
    assert rep.identical, rep.differences
    assert len(rep.lost_standby_ms) == 1 and len(rep.lost_cold_ms) == 1
    assert rep.resumes[1]["start_to_first_step_s"] is None  # a spare, not a new process
    assert rep.plot is not None


def test_train_with_file_counter_refuses_a_deleted_mirror(job: dict[str, Path]) -> None:
    counter = job["dir"] / "counter"
    r = run_cli(*_train(job, "--steps", "3", "--counter", f"file:{counter}"))
    assert r.exit_code == 0, r.output
    assert int(counter.read_text()) >= 1
    job["mirror"].unlink()  # the host removes the mirror to restart training from scratch
    r = run_cli(*_train(job, "--steps", "3", "--counter", f"file:{counter}"))
    assert r.exit_code == 1, r.output
    assert "error:" in r.output and "Traceback" not in r.output


def test_train_bad_counter_spec(job: dict[str, Path]) -> None:
    r = run_cli(*_train(job, "--steps", "3", "--counter", "sometimes"))
    assert r.exit_code == 1 and "file:PATH" in r.output


@pytest.mark.slow
def test_demo_without_matplotlib_skips_only_the_png(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bare `pip install plinius` has no matplotlib (the `plots` extra): the demo
    # still succeeds, says how to get the loss curve, and draws nothing.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run_cli("demo", "--workdir", str(tmp_path), "--pm-dir", str(shm_dir), "--crashes", "1",
         "--steps", "20", "--batch-size", "32", "--cold")  # fmt: skip
    assert r.exit_code == 0, r.output
    note = "loss curve skipped: matplotlib is not installed (pip install 'plinius[plots]')"
    assert note in r.output.splitlines()
    assert "final state bit-for-bit identical" in r.output
    assert not (tmp_path / "loss_curve.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plot"] is None and note in report["notes"]


def _mlp(job: dict[str, Path], mirror: Path, *extra: str) -> list[str]:
    return [
        "train", "--key", str(job["key"]), "--data", str(job["data"]), "--mirror", str(mirror),
        "--model", "mlp", "--batch-size", "32", "--threads", "1", *extra,
    ]  # fmt: skip


def test_train_more_steps_continues_the_job_and_fewer_is_refused(job: dict[str, Path]) -> None:
    from plinius.bench.crashtest import mirror_differences
    from plinius.mirror import Mirror

    key = MasterKey.load(job["key"])
    # mlp has a constant rate: the extended job is bit for bit the longer one.
    assert run_cli(*_mlp(job, job["mirror"], "--steps", "6")).exit_code == 0
    r = run_cli(*_mlp(job, job["mirror"], "--steps", "9"))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    said = "the job was 6 steps, now 9: it continues after step 6; "
    assert said + "no learning-rate schedule to re-plan" in lines
    assert any(line.startswith("resumed after step 6 of 9 in ") for line in lines)
    straight = job["dir"] / "straight.plm"
    assert run_cli(*_mlp(job, straight, "--steps", "9")).exit_code == 0
    assert mirror_differences(job["mirror"], straight, key) == []
    # Fewer steps than the mirror did: refused, the mirror untouched.
    before = job["mirror"].read_bytes()
    r = run_cli(*_mlp(job, job["mirror"], "--steps", "4"))
    assert_one_line_error(r, "the mirror already did 9 steps of its 9-step job, more than the 4")
    assert job["mirror"].read_bytes() == before
    with Mirror(job["mirror"], key, readonly=True) as m:
        assert m.info().step == 9


def test_train_more_steps_re_plans_the_poly_schedule(job: dict[str, Path]) -> None:
    assert run_cli(*_train(job, "--steps", "6")).exit_code == 0
    r = run_cli(*_train(job, "--steps", "8", "--events", str(job["dir"] / "e.jsonl")))
    assert r.exit_code == 0, r.output
    said = (
        "the job was 6 steps, now 8: it continues after step 6; "
        "the LambdaLR schedule is re-planned for 8 steps"
    )
    assert said in r.stdout.splitlines()
    events = [json.loads(x) for x in (job["dir"] / "e.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e["event"] == "replanned"] == [said]
    assert [e["step"] for e in events if e["event"] == "step"] == [7, 8]


@pytest.mark.slow
def test_extended_job_killed_in_the_extended_part_resumes_exactly(job: dict[str, Path]) -> None:
    """Real SIGKILLs while a 6-step job is extended to 24: bit for bit the unkilled extension."""
    from plinius.bench.crashtest import mirror_differences, run_campaign

    key = MasterKey.load(job["key"])
    a, b = job["dir"] / "a.plm", job["dir"] / "b.plm"
    base = ["--key", str(job["key"]), "--data", str(job["data"]), "--model", "cnn-tiny",
            "--batch-size", "32", "--threads", "1"]  # fmt: skip
    for m in (a, b):
        assert run_cli("train", *base, "--mirror", str(m), "--steps", "6").exit_code == 0
    assert run_cli("train", *base, "--mirror", str(a), "--steps", "24").exit_code == 0
    res = run_campaign(
        [*base, "--mirror", str(b), "--steps", "24"],
        events_path=job["dir"] / "e.jsonl",
        log_path=job["dir"] / "log.txt",
        crashes=2,
        startup_kill_fraction=0.0,
        total_steps=24,
        timeout_s=300,
    )
    assert res.finished and res.crashes == 2
    killed = [r for r in res.runs if r.killed]
    # Each killed run had trained in the extended part (steps 7..24) when it died.
    assert all(r.steps and r.steps[0].step > 6 for r in killed)
    assert res.runs[-1].resumed_from is not None and res.runs[-1].resumed_from >= 6
    assert mirror_differences(a, b, key) == []


def test_train_init_from_fine_tunes_a_new_job(job: dict[str, Path]) -> None:
    from plinius.mirror import Mirror

    key = MasterKey.load(job["key"])
    old, new = job["dir"] / "old.plm", job["dir"] / "new.plm"
    assert run_cli(*_train(job, "--steps", "5", "--mirror", str(old))).exit_code == 0
    before = old.read_bytes()
    r = run_cli(*_train(job, "--steps", "3", "--mirror", str(new), "--init-from", str(old)))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == (
        f"initialised the model from {old} (step 5 of its job); this job has its own "
        "optimizer, schedule, step counter and mirror"
    )
    assert "starting a new job of 3 steps (the mirror was empty)" in lines
    assert "note: freshness not checked" in r.stderr
    assert old.read_bytes() == before
    with Mirror(new, key, readonly=True) as m:
        assert m.info().step == 3
    # A rerun resumes the new job from its own mirror; the old one is not read.
    r = run_cli(*_train(job, "--steps", "3", "--mirror", str(new), "--init-from", str(old)))
    assert r.exit_code == 0, r.output
    assert (
        f"note: --init-from {old} not read: {new} already holds this job (step 3), which resumes"
        in r.stdout
    )


def test_train_init_from_bad_input_leaves_nothing(job: dict[str, Path]) -> None:
    old, new = job["dir"] / "old.plm", job["dir"] / "new.plm"
    assert run_cli(*_train(job, "--steps", "2", "--mirror", str(old))).exit_code == 0
    r = run_cli(*_mlp(job, new, "--steps", "2", "--init-from", str(old)))
    assert_one_line_error(r, f"--init-from {old}: the model it holds does not fit --model mlp")
    r = run_cli(*_train(job, "--steps", "2", "--mirror", str(new), "--num-classes", "3",
                        "--init-from", str(old)))  # fmt: skip
    assert_one_line_error(r, "does not fit --model cnn-tiny (model.", "--num-classes")
    r = run_cli(*_train(job, "--steps", "2", "--mirror", str(new),
                        "--init-from", str(job["dir"] / "none.plm")))  # fmt: skip
    assert_one_line_error(r, "none.plm does not exist")
    r = run_cli(*_train(job, "--steps", "2", "--mirror", str(old), "--init-from", str(old)))
    assert_one_line_error(r, "--init-from", code=2)
    assert not new.exists()
